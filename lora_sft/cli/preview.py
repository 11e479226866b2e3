"""`preview`: the tokens a run would train on, shown before any weights load.

Trained tokens are coloured in a terminal and wrapped in [[ ]] otherwise; `--json` prints one
object per sample with input_ids, labels (-100 where not trained) and, when packed, position_ids.
"""

from __future__ import annotations

import itertools
import json
import sys

from lora_sft.data import DataBundle
from lora_sft.data.stats import stats_lines
from lora_sft.tokens import IGNORE_INDEX as IGNORE

GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def _runs(labels: list[int]) -> list[tuple[int, int, bool]]:
    """(start, end, trained) for each stretch of tokens that are all trained or all not."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or (labels[i] != IGNORE) != (labels[start] != IGNORE):
            out.append((start, i, labels[start] != IGNORE))
            start = i
    return out


def marked(tokenizer, ids: list[int], labels: list[int], colour: bool = False) -> str:
    """The sample's text with its trained stretches marked: [[trained]] (or coloured)."""
    parts = []
    for a, b, trained in _runs(labels):
        text = tokenizer.decode(ids[a:b], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if colour:
            parts.append(f"{GREEN}{text}{RESET}" if trained else f"{DIM}{text}{RESET}")
        else:
            parts.append(f"[[{text}]]" if trained else text)
    return "".join(parts)


def _samples_of(row: dict) -> list[tuple[int, int]]:
    """Where each sample sits in a (possibly packed) row."""
    positions = row.get("position_ids")
    if positions is None:
        return [(0, len(row["input_ids"]))]
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    return list(itertools.pairwise(starts))


def show(bundle: DataBundle, tokenizer, split: str, n: int, as_json: bool, out=None) -> None:
    out = out or sys.stdout
    data = bundle.train if split == "train" else bundle.eval
    rows = [data[i] for i in range(min(n, len(data)))] if data is not None else []
    if as_json:
        for row in rows:
            keep = {k: row[k] for k in ("input_ids", "labels", "position_ids") if k in row}
            out.write(json.dumps(keep) + "\n")
        print("\n".join(stats_lines(bundle, split)), file=sys.stderr)
        return
    colour = out.isatty()
    print("\n".join(stats_lines(bundle, split)), file=out)
    for k, row in enumerate(rows):
        print(f"\n=== {split} row {k} ({len(row['input_ids'])} tokens) ===", file=out)
        if bundle.labels is not None:
            print(f"label: {bundle.labels[row['labels']]}", file=out)
            print(tokenizer.decode(row["input_ids"], clean_up_tokenization_spaces=False), file=out)
            continue
        for j, (a, b) in enumerate(_samples_of(row)):
            if "position_ids" in row:
                print(f"--- sample {j} ---", file=out)
            print(marked(tokenizer, row["input_ids"][a:b], row["labels"][a:b], colour), file=out)
