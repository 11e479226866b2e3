"""What `export` is asked for: its options as one frozen record (`ExportOptions`, the command's flags), checked with
one-line refusals before anything is loaded, and the export as it then runs (`ExportJob`: the defaults resolved
against the run)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lora_sft import compat
from lora_sft.errors import UserError

ExportDtype = Literal["bf16", "fp16", "fp32"]
# What `export --merged` merges the adapter onto: the 4-bit weights dequantized (the model as trained), or the
# base's original weights (what the 4-bit weights approximate).
MergeOnto = Literal["dequantized", "original"]
ONTO: tuple[MergeOnto, ...] = ("dequantized", "original")


@dataclass(frozen=True)
class ExportOptions:
    """`export`'s options. `onto`: what --merged merges the adapter onto; None is the default, dequantized (given
    without --merged, an error). `dtype` None: 16-bit (`merge.default_dtype`). `gguf`: GGUF types,
    comma-separated, or auto with `max_drift`."""

    merged: bool = False
    dtype: ExportDtype | None = None
    out: str | Path | None = None
    samples: int = 8
    tolerance: float | None = None
    max_shard_size: int | str = "2GB"
    gguf: str | None = None
    onto: MergeOnto | None = None
    max_drift: float | None = None


@dataclass(frozen=True)
class ExportJob:
    """The export as it runs: the options checked, the defaults resolved against the run."""

    out: Path
    merged: bool  # --merged, or implied by --gguf (GGUF is written from the merged model)
    onto: MergeOnto
    dtype: ExportDtype
    samples: int
    tolerance: float | None
    shard_size: int  # bytes
    gguf: tuple[str, ...]  # the GGUF types (gguf.parse_types), none without --gguf
    max_drift: float | None


def check_options(options: ExportOptions) -> tuple[int, list[str], bool]:
    """The options' one-line refusals, before any model is loaded; the shard size in bytes, the GGUF types and
    whether a merged model is written."""
    shard_size = shard_bytes(options.max_shard_size)
    from lora_sft.export.gguf import parse_types

    gguf_types = parse_types(options.gguf, options.max_drift) if options.gguf else []
    merged = options.merged or bool(options.gguf)  # GGUF is written from the merged model (so --gguf takes --onto too)
    onto, samples, tolerance = options.onto, options.samples, options.tolerance
    if onto is not None and onto not in ONTO:
        raise UserError(f"--onto: {onto!r} is not a merge target; give one of {', '.join(ONTO)}")
    if onto is not None and not merged:
        raise UserError(
            f"--onto {onto}: says what the merged model is merged onto, and there is none without --merged; add --merged or leave --onto out"
        )
    if samples < 1:
        raise UserError(f"--samples: {samples} is too small; give 1 or more")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
        raise UserError(f"--tolerance: {tolerance} is not a tolerance; give a finite number of 0 or more, e.g. 1e-4")
    return shard_size, gguf_types, merged


def shard_bytes(size: int | str) -> int:
    """`--max-shard-size` in bytes: an int, digits, or a number with a unit (200KB, 2GB, 1GiB); UserError otherwise."""
    text = str(size).strip()
    try:
        value = int(text) if text.isdigit() else compat.file_size_bytes(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(
            f"--max-shard-size: {size!r} is not a size; give bytes or a number with a unit, e.g. 2GB, 500MB, 200KB, 1GiB"
        )
    return value
