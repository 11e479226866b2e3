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


@pytest.mark.unit
def test_the_same_tokens_pair_takes_the_first_trl_run_that_ran(monkeypatch):
    """--model smollm2 runs TRL in fp32 and padding-free only: lora_sft_ungrouped pairs with the padding-free run, which
    consumes the same batches as TRL's default (the same sampler)."""

    def run(name, tool, speed, memory, trained):
        return {"run": name, "tool": tool, "micro_batch": 8, "trained_tokens_per_s": speed,
                "peak_memory_mib": memory, "last_loss": 0.1, "trained_tokens": trained}  # fmt: skip

    results = [
        run("lora_sft_ungrouped", "lora_sft", 40.0, 3000.0, 800),
        run("trl_padding_free_fp32", "trl", 10.0, 3000.0, 800),
        run("trl_padding_free_fp32_no_recompute", "trl", 20.0, 4000.0, 800),
    ]
    rows = [(c["against"], c["trained_tokens_per_s_ratio"]) for c in _vs_trl(monkeypatch).compare(results)]
    assert rows == [
        ("TRL best (trl_padding_free_fp32_no_recompute)", 2.0),
        ("same tokens (trl_padding_free_fp32)", 4.0),
    ]


@pytest.mark.unit
def test_loss_table_has_a_column_per_run_and_a_row_per_step(monkeypatch):
    runs = [
        {"run": "lora_sft", "micro_batch": 8, "trained_tokens": 800, "losses": [0.5, 0.25]},
        {"run": "trl_padding_free_fp32", "micro_batch": 8, "trained_tokens": 800, "losses": [0.5, 0.26, 0.1]},
        {"run": "trl_fp32", "micro_batch": 8, "error": "exit 1"},
    ]
    lines = _vs_trl(monkeypatch).loss_table(runs)
    assert lines[3] == "| step | lora_sft (800) | trl_padding_free_fp32 (800) |"
    assert lines[5:] == ["| 1 | 0.5000 | 0.5000 |", "| 2 | 0.2500 | 0.2600 |", "| 3 |  | 0.1000 |"]


@pytest.mark.unit
def test_smollm2_case_uses_the_quickstart_recipe_and_reads_its_rows_in_order(monkeypatch):
    import json

    import yaml

    vs = _vs_trl(monkeypatch)
    recipe = yaml.safe_load((REPO / vs.BASES["smollm2"]).read_text())
    setup = vs.smollm2_setup("cpu", quick=False)
    assert (setup.max_length, setup.lr, setup.seed, setup.rows_file) == (
        recipe["data"]["max_length"],
        recipe["train"]["lr"],
        recipe["seed"],
        recipe["data"]["train"],
    )
    assert {mb for _, mb in setup.runs} == {recipe["train"]["micro_batch_size"]}
    assert all(name in vs.RUNS for name, _ in setup.runs)
    assert {vs.RUNS[name][0] for name, _ in setup.runs} == {"lora_sft", "trl"}

    quick = vs.smollm2_setup("cpu", quick=True)
    rows, lengths = vs.read_rows(quick, vs.build_tokenizer(vs.make_words(__import__("random").Random(0), 200)))
    first = [json.loads(line)["messages"] for line in (REPO / quick.rows_file).read_text().splitlines()[: quick.rows]]
    assert [r["messages"] for r in rows] == first and len(lengths) == quick.rows == len(rows)


@pytest.mark.unit
def test_both_tools_leave_a_tied_output_layer_unquantized_and_tied(monkeypatch, tmp_path):
    """SmolLM2's output layer is the input embedding's weight: lora_sft's 4-bit load (the heads skipped) and the TRL
    worker's (lm_head skipped) both keep it one unquantized, frozen matrix under LoRA all-linear."""
    pytest.importorskip("trl")
    import torch
    from helpers import build_tokenizer, save_tiny_llama
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_sft.model.load import quantization_config
    from lora_sft.recipe.sections import QuantSection

    vs = _vs_trl(monkeypatch)
    folder = save_tiny_llama(tmp_path / "tied", build_tokenizer(["a tied model"] * 4), tied=True)
    configs = {
        "lora_sft": quantization_config(QuantSection(mode="nf4", double_quant=True), ["lm_head"], torch.float32),
        "trl": vs.trl_quantization(torch.float32),
    }
    for tool, config in configs.items():
        model = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=config, dtype=torch.float32, device_map={"": "cpu"}
        )
        model.requires_grad_(False)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        layer = vs.output_layer(get_peft_model(model, lora))
        assert layer == {"class": "Linear", "dtype": "float32", "quantized": False, "tied": True, "trains": False}, tool
