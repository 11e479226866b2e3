"""Padding-free packing: whole samples laid end to end in rows of max_length, best-fit decreasing.

A packed row carries `position_ids` that restart at 0 for each sample and no attention mask:
transformers then builds a block-diagonal causal mask (sdpa, eager) or uses flash-attention's
variable-length path, so no token attends across samples. The first label of each sample is set
to -100: in a packed row it would be the target of the previous sample's last token.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lora_sft.tokens import IGNORE_INDEX as IGNORE
from lora_sft.tokens import mask_first


def bins_of(lengths: Sequence[int] | np.ndarray, capacity: int) -> np.ndarray:
    """The bin of each sample, best-fit decreasing: longest first (equal lengths in data order), each into the
    fullest bin it fits (equally full: the first opened), else a new bin. Bins are numbered as they open.
    Open bins are kept by the space they have left (a heap of bin numbers per space), so each sample costs
    a bisection over at most `capacity` space values, whatever the number of samples."""
    sizes = np.asarray(lengths, dtype=np.int64)
    out = np.empty(len(sizes), np.int64)
    spaces: list[int] = []  # the space values some open bin has, ascending
    open_bins: dict[int, list[int]] = {}  # space left -> the bins with that much, a heap
    opened = 0
    for i in np.argsort(-sizes, kind="stable").tolist():
        size = int(sizes[i])
        at = bisect.bisect_left(spaces, size)
        if at < len(spaces):
            space = spaces[at]
            b = heapq.heappop(open_bins[space])
            if not open_bins[space]:
                del open_bins[space], spaces[at]
        else:
            space, b, opened = capacity, opened, opened + 1
        out[i] = b
        if space - size > 0:
            if space - size not in open_bins:
                open_bins[space - size] = []
                bisect.insort(spaces, space - size)
            heapq.heappush(open_bins[space - size], b)
    return out


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each summing to <= capacity (`bins_of`), each bin's samples in the order they were placed."""
    bins = bins_of(lengths, capacity)
    out: list[list[int]] = [[] for _ in range(int(bins.max()) + 1 if len(bins) else 0)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        out[int(bins[i])].append(i)
    return out


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


def pack_columns(samples: pa.Table, bins: np.ndarray) -> pa.Table:
    """`pack` on Arrow columns: `samples` (input_ids, labels) in row order, `bins` the row of each, ascending.
    The same rows: the samples laid end to end, each sample's first label -100, positions restarting at 0."""
    lengths = pc.list_value_length(samples["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    starts = np.cumsum(lengths) - lengths
    ids = pc.list_flatten(samples["input_ids"]).to_numpy(zero_copy_only=False)
    labels = pc.list_flatten(samples["labels"]).to_numpy(zero_copy_only=False).copy()
    labels[starts[lengths > 0]] = IGNORE  # mask_first
    positions = np.arange(len(ids)) - np.repeat(starts, lengths)
    row_ends = (
        np.cumsum(np.bincount(bins - bins[0], weights=lengths).astype(np.int64)) if len(bins) else np.zeros(0, np.int64)
    )
    offsets = pa.array(np.concatenate([[0], row_ends]).astype(np.int32))
    column = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": positions,
    }
    return pa.table({k: pa.ListArray.from_arrays(offsets, pa.array(v.astype(np.int32))) for k, v in column.items()})


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
