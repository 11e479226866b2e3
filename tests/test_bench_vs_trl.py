"""benchmarks/vs_trl.py counts both tools' batches with one definition: the same rows give the same trained and
processed tokens through lora_sft's collators and TRL's, padded, padding-free or packed (needs the bench extra)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from helpers import REPO

IGNORE = -100
# trained after the shift: 3 + 2 + 2 = 7 labels; 5 + 3 + 4 = 12 real tokens; padded to 5: 15 positions
ROWS = [
    {"input_ids": [1, 2, 3, 4, 5], "labels": [IGNORE, IGNORE, 3, 4, 5]},
    {"input_ids": [6, 7, 8], "labels": [IGNORE, 7, 8]},
    {"input_ids": [9, 10, 11, 12], "labels": [IGNORE, IGNORE, 11, 12]},
]


def _batch_counts(monkeypatch):
    spec = importlib.util.spec_from_file_location("vs_trl", REPO / "benchmarks" / "vs_trl.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vs_trl", module)  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module.batch_counts


@pytest.mark.unit
def test_counts_agree_across_both_tools_collators(monkeypatch):
    trl = pytest.importorskip("trl")
    from lora_sft.data import CausalCollator
    from lora_sft.data.packing import PackedCollator, pack

    counts = _batch_counts(monkeypatch)
    padded = counts(CausalCollator(0)([dict(r) for r in ROWS]))
    assert (padded.positions, padded.processed, padded.trained) == (15, 12, 7)

    collator = trl.trainer.sft_trainer.DataCollatorForLanguageModeling
    assert counts(collator(pad_token_id=0)([dict(r) for r in ROWS])) == padded
    flat = counts(collator(pad_token_id=0, padding_free=True)([dict(r) for r in ROWS]))
    assert (flat.positions, flat.processed, flat.trained, flat.longest) == (12, 12, 7, 12)

    packed_rows, _ = pack([dict(r) for r in ROWS], max_length=8)  # two rows: 5 + 3 and 4, the second padded
    packed = counts(PackedCollator(0)(packed_rows))
    assert (packed.positions, packed.processed, packed.trained) == (16, 12, 7)
