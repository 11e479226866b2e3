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


def _vs_trl(monkeypatch):
    spec = importlib.util.spec_from_file_location("vs_trl", REPO / "benchmarks" / "vs_trl.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "vs_trl", module)  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.mark.unit
def test_counts_agree_across_both_tools_collators(monkeypatch):
    trl = pytest.importorskip("trl")
    from lora_sft.data import CausalCollator
    from lora_sft.data.packing import PackedCollator, pack

    counts = _vs_trl(monkeypatch).batch_counts
    padded = counts(CausalCollator(0)([dict(r) for r in ROWS]))
    assert (padded.positions, padded.processed, padded.trained) == (15, 12, 7)

    collator = trl.trainer.sft_trainer.DataCollatorForLanguageModeling
    assert counts(collator(pad_token_id=0)([dict(r) for r in ROWS])) == padded
    flat = counts(collator(pad_token_id=0, padding_free=True)([dict(r) for r in ROWS]))
    assert (flat.positions, flat.processed, flat.trained, flat.longest) == (12, 12, 7, 12)

    packed_rows, _ = pack([dict(r) for r in ROWS], max_length=8)  # two rows: 5 + 3 and 4, the second padded
    packed = counts(PackedCollator(0)(packed_rows))
    assert (packed.positions, packed.processed, packed.trained) == (16, 12, 7)


@pytest.mark.unit
def test_compare_takes_the_best_of_each_tool_and_pairs_runs_on_the_same_tokens(monkeypatch):
    def run(name, tool, speed, memory, loss, trained):
        return {"run": name, "tool": tool, "micro_batch": 4, "trained_tokens_per_s": speed,
                "peak_memory_mib": memory, "last_loss": loss, "trained_tokens": trained}  # fmt: skip

    results = [
        run("lora_sft_ungrouped", "lora_sft", 300.0, 900.0, 2.0, 500),
        run("lora_sft_packing", "lora_sft", 600.0, 1000.0, 1.9, 900),
        run("trl_default", "trl", 100.0, 1600.0, 2.0, 500),
        run("trl_padding_free", "trl", 200.0, 1250.0, 2.0, 500),
        run("trl_packing_fp32", "trl", 150.0, 2000.0, 1.9, 900),
        {"run": "trl_packing_bf16", "tool": "trl", "micro_batch": 4, "error": "exit 1"},
    ]
    rows = [
        (c["lora_sft"], c["against"], c["trained_tokens_per_s_ratio"], c["peak_memory_ratio"], c["same_trained_tokens"])
        for c in _vs_trl(monkeypatch).compare(results)
    ]
    assert rows == [
        ("lora_sft_packing", "TRL best (trl_padding_free)", 3.0, 0.8, False),
        ("lora_sft_packing", "TRL default (trl_default)", 6.0, 0.62, False),
        ("lora_sft_ungrouped", "same tokens (trl_default)", 3.0, 0.56, True),
        ("lora_sft_packing", "same tokens (trl_packing_fp32)", 4.0, 0.5, True),
    ]
