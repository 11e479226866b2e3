"""The data stage's statistics as text: rows, samples, tokens, trained share, what truncation and the
gates dropped, packing, and a histogram of row lengths. `preview` prints them, `train` logs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lora_sft.data.tokenized import DataBundle
from lora_sft.data.tokenized import lengths as row_lengths


def histogram(lengths: Sequence[int] | np.ndarray, width: int = 40, buckets: int = 8) -> list[str]:
    """Lines of a text histogram of `lengths` in `buckets` equal ranges, bars up to `width` characters."""
    if not len(lengths):
        return []
    values = np.asarray(lengths, dtype=np.int64)
    top = int(values.max())
    step = max(1, -(-top // buckets))
    counts = np.bincount(np.minimum(values // step, buckets - 1), minlength=buckets).tolist()
    most = max(counts)
    return [
        f"  {b * step:>6}-{(b + 1) * step - 1:<6} {'#' * max(1, round(width * counts[b] / most)) if counts[b] else '':<{width}} {counts[b]}"
        for b in range(buckets)
    ]


def stats_lines(bundle: DataBundle, split: str, lengths_histogram: bool = True) -> list[str]:
    """The statistics of one split (`bundle.stats[split]`), and the histogram of its row lengths if asked."""
    s = bundle.stats[split]
    data = bundle.train if split == "train" else bundle.eval
    lines = [
        f"{split}: {s['rows']} rows -> {s['samples']} samples, {s['tokens']} tokens, {s['trained_tokens']} trained ({s['trained_tokens'] / max(s['tokens'], 1):.1%})",
        f"  truncated {s['truncated']}, dropped with no trained token {s['dropped_no_trained_token']}, dropped as too long {s['dropped_too_long']}",
    ]
    if "packing_efficiency" in s:
        lines.append(f"  packed into {s['packed_rows']} rows, packing efficiency {s['packing_efficiency']:.1%}")
    if not lengths_histogram:
        return lines
    lengths = row_lengths(data) if data is not None else np.zeros(0, np.int64)
    return lines + ["  lengths (tokens per row):"] + histogram(lengths)
