"""Padding-free packing: whole samples laid end to end in rows of max_length, best-fit decreasing.

A packed row carries `position_ids` that restart at 0 for each sample and no attention mask:
transformers then builds a block-diagonal causal mask (sdpa, eager) or uses flash-attention's
variable-length path, so no token attends across samples. The first label of each sample is set
to -100: in a packed row it would be the target of the previous sample's last token.
"""

from __future__ import annotations

import bisect

import torch

from ..tokens import IGNORE_INDEX as IGNORE
from ..tokens import mask_first


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to <= capacity: longest first, into the fullest bin it fits."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if space - lengths[i] > 0:
            bisect.insort(free, (space - lengths[i], b))
    return bins


def pack(samples: list[dict], max_length: int) -> tuple[list[dict], float]:
    """Packed rows and the packing efficiency (real tokens / row capacity)."""
    rows = []
    for members in best_fit_decreasing([len(s["input_ids"]) for s in samples], max_length):
        ids, labels, positions = [], [], []
        for i in sorted(members):  # keep the data order inside a row
            s = samples[i]
            ids += s["input_ids"]
            labels += mask_first(s["labels"])
            positions += list(range(len(s["input_ids"])))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    tokens = sum(len(s["input_ids"]) for s in samples)
    return rows, tokens / (len(rows) * max_length) if rows else 0.0


class PackedCollator:
    """Batches packed rows: right-padded, pads form their own 'sample' (positions from 0), loss -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        out: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        real = [len(b["input_ids"]) for b in batch]
        for b in batch:
            extra = width - len(b["input_ids"])
            out["input_ids"].append(b["input_ids"] + [self.pad_id] * extra)
            out["labels"].append(b["labels"] + [IGNORE] * extra)
            out["position_ids"].append(b["position_ids"] + list(range(extra)))
        # Rows have no attention mask (it would turn off the packed-sequence masking), so the real
        # token count travels separately; lora_sft's Trainer removes it before the forward.
        return {k: torch.tensor(v) for k, v in out.items()} | {"num_real_tokens": torch.tensor(real)}
