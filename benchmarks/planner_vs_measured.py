"""The memory planner's estimate against the measured peak of real training runs.

    python benchmarks/planner_vs_measured.py [--quick] [--device cpu|cuda] [--steps 3]
    python benchmarks/planner_vs_measured.py --real    # the shipped quickstarts on real models, about 6 minutes

For a Llama-shaped model with random weights (4 layers, hidden 256, a 32k vocabulary, saved like
tests/helpers.save_tiny_llama) it trains lora_sft for a few steps in a subprocess per configuration: several
sequence lengths and micro batches, with and without gradient checkpointing. Each run prints its estimate before
loading (`memory estimate on ...`) and writes the measured peak to summary.json (`peak_memory_mb`: the peak RSS on
CPU, torch.cuda.max_memory_allocated on a GPU, which is compared with the estimate less the runtime overhead).
The rows are `text` chunks of exactly the sequence length, so every row is as long as the planner assumes.
Prints a Markdown table and writes it to benchmarks/results/planner_vs_measured-<device>.md (--quick: a few
configurations only, to check the script; the committed table comes from a full run on a quiet machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

FULL = [(seq, micro, ckpt) for seq in (128, 256, 512) for micro in (1, 2) for ckpt in (False, True)]
FULL += [(128, 8, False), (128, 8, True), (256, 4, False), (256, 4, True)]
QUICK = [(512, 2, False), (512, 2, True)]
GIB = 2**30


def build_model(folder: Path) -> Path:
    """A 4-layer, hidden-256 random Llama with a 32k vocabulary and a small BPE tokenizer (ids stay in range)."""
    import torch
    from helpers import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [
        line for f in ("alpaca.jsonl", "chat.jsonl") for line in (REPO / "data/examples" / f).read_text().splitlines()
    ]
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_text(path: Path) -> Path:
    """Long text rows: `text` format splits them into chunks of exactly data.max_length tokens."""
    rng = random.Random(0)
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "this",
        "be",
        "are",
        "or",
    ]
    with path.open("w") as f:
        for _ in range(64):
            f.write(json.dumps({"text": " ".join(rng.choices(words, k=1200))}) + "\n")
    return path


def run(folder: Path, model: Path, data: Path, seq: int, micro: int, ckpt: bool, steps: int, device: str) -> dict:
    out = folder / f"run-{seq}-{micro}-{int(ckpt)}"
    recipe = {
        "task": "causal_lm",
        "output_dir": str(out),
        "model": {"path": str(model)},
        "quant": {"mode": "nf4", "compute_dtype": "auto"},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"format": "text", "train": str(data), "max_length": seq, "shuffle": False},
        "train": {
            "max_steps": steps,
            "micro_batch_size": micro,
            "grad_accum": 1,
            "gradient_checkpointing": ckpt,
            "warmup": 0,
            "logging_steps": 1,
            "save_steps": 1000,
            "eval_before": False,
        },
    }
    path = folder / f"recipe-{seq}-{micro}-{int(ckpt)}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    measured = train(path, [], out, folder, device)
    return {"seq": seq, "micro": micro, "checkpointing": ckpt, **measured}


def train(recipe: Path, patches: list[str], out: Path, cwd: Path, device: str) -> dict:
    """One `python -m lora_sft train` in a subprocess: its printed estimate and the peak in its summary.json."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(REPO))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run even on a GPU machine
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "train", str(recipe), *patches],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
    )
    if proc.returncode != 0:
        raise SystemExit(f"run {recipe.name} {' '.join(patches)} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    terms = dict(re.findall(r"^\s+(\w[\w ]*): ([\d.]+ [GM]iB)", proc.stdout, re.M))
    total = re.search(r"memory estimate on the \w+: ([\d.]+ [GM]iB)", proc.stdout)
    if total is None:
        raise SystemExit(f"run {recipe.name} printed no memory estimate:\n{proc.stdout[-3000:]}")

    def mib(text: str) -> float:
        number, unit = text.split()
        return float(number) * (1024 if unit == "GiB" else 1)

    estimate = mib(total.group(1)) - (mib(terms["runtime"]) if device == "cuda" else 0)
    return {
        "estimate_mib": round(estimate, 1),
        "measured_mib": summary["peak_memory_mb"],
        "measured_kind": summary["peak_memory_kind"],
        "terms_mib": {k: mib(v) for k, v in terms.items()},
    }


# --real: the recipes people run first, as shipped, for a few steps (the peak of a run is reached in its first
# steps: preflight, load, the eval before training and the first optimizer step); the chat quickstart twice, as
# benchmarks/vs_trl.py --model smollm2 trains it (activation recompute on and off)
REAL = [
    ("quickstart (MiniLM classifier)", "recipes/quickstart.yaml", ["train.max_steps=10"]),
    ("chat quickstart (SmolLM2-135M from GGUF)", "recipes/quickstart-chat.yaml", ["train.max_steps=4"]),
    (
        "SmolLM2 benchmark, recompute on",
        "recipes/quickstart-chat.yaml",
        ["train.max_steps=4", "train.gradient_checkpointing=true"],
    ),
    (
        "SmolLM2 benchmark, recompute off",
        "recipes/quickstart-chat.yaml",
        ["train.max_steps=4", "train.gradient_checkpointing=false"],
    ),
    # not a shape the recompute term was calibrated on (that was micro batch 8): half the batch
    (
        "SmolLM2, micro batch 4, recompute on",
        "recipes/quickstart-chat.yaml",
        ["train.max_steps=4", "train.micro_batch_size=4", "train.gradient_checkpointing=true"],
    ),
]


def real_runs(folder: Path, device: str) -> list[dict]:
    rows = []
    for i, (label, recipe, patches) in enumerate(REAL):
        out = folder / f"real-{i}"
        patches = [*patches, f"output_dir={out}", "eval.after_train=false"]
        rows.append(
            {
                "run": label,
                "recipe": recipe,
                "patches": patches[:-2],
                **train(REPO / recipe, patches, out, REPO, device),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], device: str, columns: dict) -> str:
    """A Markdown table: the `columns` (header -> (alignment, a row's cell)), then estimate, measured and error."""
    what = "peak RSS (summary.json peak_memory_mb)" if device == "cpu" else "torch.cuda.max_memory_allocated"
    lines = [
        f"| {' | '.join(columns)} | estimate (MiB) | measured {what} (MiB) | error |",
        f"| {' | '.join(align for align, _ in columns.values())} | ---: | ---: | ---: |",
    ]
    for r in rows:
        err = 100 * (r["estimate_mib"] - r["measured_mib"]) / r["measured_mib"]
        cells = " | ".join(cell(r) for _, cell in columns.values())
        lines.append(f"| {cells} | {r['estimate_mib']:.0f} | {r['measured_mib']:.0f} | {err:+.1f}% |")
    worst = max(abs(r["estimate_mib"] - r["measured_mib"]) / r["measured_mib"] for r in rows)
    lines.append(f"\nworst error: {100 * worst:.1f}% over {len(rows)} runs")
    return "\n".join(lines)


GRID_COLUMNS = {
    "sequence": ("---:", lambda r: str(r["seq"])),
    "micro batch": ("---:", lambda r: str(r["micro"])),
    "checkpointing": (":---:", lambda r: "on" if r["checkpointing"] else "off"),
}
REAL_COLUMNS = {
    "run": ("---", lambda r: r["run"]),
    "recipe + patches": ("---", lambda r: f"`{r['recipe']}` {' '.join(r['patches'])}"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two configurations only (checks the script)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--real",
        action="store_true",
        help="the shipped quickstarts (MiniLM, SmolLM2 from its GGUF) instead of the random Llama grid; "
        "writes planner_vs_measured-real-<device>.md",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="the folder of planner_vs_measured-<device>.md (default benchmarks/results), as vs_trl.py's",
    )
    args = parser.parse_args()
    if args.real:
        with tempfile.TemporaryDirectory(prefix="planner-bench-") as tmp:
            text = table(real_runs(Path(tmp), args.device), args.device, REAL_COLUMNS)
        name = f"planner_vs_measured-real-{args.device}.md"
        header = f"# The memory planner against measured peaks: real models ({args.device})\n\n"
        header += "Each recipe as shipped, a few steps (the peak of a run falls in its first steps), after-training eval off; "
        header += f"measured by `python benchmarks/planner_vs_measured.py --real`{' --device cuda' if args.device == 'cuda' else ''}.\n\n"
    else:
        configs = QUICK if args.quick else FULL
        with tempfile.TemporaryDirectory(prefix="planner-bench-") as tmp:
            folder = Path(tmp)
            os.environ.setdefault("LORA_SFT_CACHE", str(folder / "cache"))
            model = build_model(folder / "model")
            data = write_text(folder / "text.jsonl")
            rows = []
            for seq, micro, ckpt in configs:
                rows.append(run(folder, model, data, seq, micro, ckpt, args.steps, args.device))
                print(json.dumps(rows[-1]), flush=True)
        text = table(rows, args.device, GRID_COLUMNS)
        name = f"planner_vs_measured-{args.device}.md"
        header = f"# The memory planner against measured peaks ({args.device}{', quick' if args.quick else ''})\n\n"
        header += "Model: random Llama, 4 layers, hidden 256, intermediate 688, 32k vocabulary, nf4 + double quant, LoRA r16 all-linear, AdamW.\n\n"
    print(text)
    out = (Path(args.out) if args.out else REPO / "benchmarks" / "results") / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
