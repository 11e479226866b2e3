"""data.streaming: seconds from `train` starting to its first optimizer step, on a large chat JSONL.

    python benchmarks/stream_first_step.py [--rows 1000000] [--no-packing] [--stream-buffer 1000]

Writes N chat rows (data_throughput.write_rows, about 250 tokens each with this tokenizer's merges unlearned for
most words), a tiny random Llama (tests/helpers.save_tiny_llama), and a streamed recipe that trains 1 step; then
times `python -m lora_sft train` in a subprocess until its metrics.jsonl logs step 1. Writing the rows is not
counted. Target (issue 14): a 1M-row source trains its first step within 30 s of start.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def first_step_seconds(recipe: Path, run: Path) -> tuple[float, float]:
    """(seconds until step 1 is logged, seconds until the process ends)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_sft", "train", str(recipe), "--quiet"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = None
    metrics = run / "metrics.jsonl"
    while proc.poll() is None:
        if first is None and metrics.is_file() and '"loss"' in metrics.read_text():
            first = time.perf_counter() - start
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"train failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    end = time.perf_counter() - start
    return (first if first is not None else end), end


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--no-packing", action="store_true")
    ap.add_argument("--stream-buffer", type=int, default=1000)
    ap.add_argument(
        "--out", default=str(REPO / "benchmarks/results"), help="folder for stream-<date>.md; '' writes none"
    )
    args = ap.parse_args()

    from data_throughput import write_rows
    from helpers import build_tokenizer, save_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = folder / "rows.jsonl"
        t0 = time.perf_counter()
        write_rows(rows, args.rows, "messages")
        written = time.perf_counter() - t0
        corpus = [line for f in ("chat.jsonl",) for line in (REPO / "data/examples" / f).read_text().splitlines()]
        model = save_tiny_llama(folder / "model", build_tokenizer(corpus))
        recipe = {
            "task": "causal_lm",
            "output_dir": str(folder / "run"),
            "model": {"path": str(model)},
            "lora": {"rank": 4, "alpha": 8},
            "data": {
                "format": "messages",
                "train": str(rows),
                "max_length": 512,
                "streaming": True,
                "packing": not args.no_packing,
                "stream_buffer": args.stream_buffer,
            },
            "train": {
                "max_steps": 1,
                "micro_batch_size": 4,
                "logging_steps": 1,
                "eval_before": False,
                "gradient_checkpointing": False,
            },
        }
        path = folder / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        first, end = first_step_seconds(path, folder / "run")
        size = rows.stat().st_size
        summary = json.loads((folder / "run" / "summary.json").read_text())
    lines = [
        "| rows | file | packing | stream_buffer | first step | whole run | peak memory |",
        "|---|---|---|---|---|---|---|",
        f"| {args.rows:,} | {size / 2**20:,.0f} MiB | {'on' if not args.no_packing else 'off'} | {args.stream_buffer} "
        f"| {first:.1f} s | {end:.1f} s | {summary['peak_memory_mb']:,.0f} MB |",
    ]
    print("\n".join(lines))
    print(f"(writing the rows took {written:.1f} s, not counted)")
    if args.out:
        machine = f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
        command = " ".join(["python benchmarks/stream_first_step.py", *sys.argv[1:]])
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"stream-{datetime.date.today()}.md"
        head = [] if path.is_file() else ["# data.streaming: seconds from `train` starting to step 1", ""]
        with path.open("a") as f:
            f.write("\n".join([*head, f"`{command}`, {datetime.date.today()}, {machine}:", "", *lines, ""]) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
