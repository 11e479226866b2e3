"""Packing: best-fit decreasing rows, a packed batch's loss equals the unpacked one, no attention across samples."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import REPO

from lora_sft import data as data_stage
from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft import train as train_stage
from lora_sft.data.packing import PackedCollator, best_fit_decreasing, pack
from lora_sft.recipe.load import load_recipe
from lora_sft.settings import resolve


@pytest.mark.unit
def test_best_fit_decreasing_fills_rows_without_splitting_samples():
    lengths = [random.Random(s).randint(1, 100) for s in range(200)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= -(-sum(lengths) // 128) * 1.1  # within 10% of the bound
    assert best_fit_decreasing([5, 4, 3, 2, 2], 8) == [[0, 2], [1, 3, 4]]


@pytest.mark.unit
def test_pack_restarts_positions_and_masks_each_samples_first_label():
    samples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}]
    rows, efficiency = pack(samples, 8)
    assert rows == [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, 2, 3, -100, 5], "position_ids": [0, 1, 2, 0, 1]}]
    assert efficiency == 5 / 8
    batch = PackedCollator(0)(rows + [{"input_ids": [7], "labels": [7], "position_ids": [0]}])
    assert batch["position_ids"][1].tolist() == [0, 0, 1, 2, 3] and batch["labels"][1].tolist() == [
        7,
        -100,
        -100,
        -100,
        -100,
    ]
    assert batch["num_real_tokens"].tolist() == [5, 1] and "attention_mask" not in batch


@pytest.fixture
def fp32_llama(tiny_llama, tmp_path, write_recipe):
    recipe = load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_llama)},
                "quant": {"mode": "none", "compute_dtype": "fp32"},
                "data": {
                    "format": "messages",
                    "train": str(REPO / "data/examples/chat.jsonl"),
                    "max_length": 256,
                    "cache": False,
                },
            }
        )
    )
    prepared = preflight.prepare(recipe)
    tokenizer = model_stage.load_tokenizer(recipe, prepared.plan.source)
    samples = list(data_stage.build(recipe, tokenizer, prepared.checked).train.select(range(6)))
    model = model_stage.load_base(resolve(recipe), prepared.plan).eval()
    return model, tokenizer, samples


@pytest.mark.e2e
def test_packed_loss_equals_the_unpacked_mean(fp32_llama):
    model, tokenizer, samples = fp32_llama
    rows, _ = pack(samples, 256 * 3)
    assert len(rows) < len(samples)
    with torch.no_grad():
        unpacked = model(**data_stage.CausalCollator(tokenizer.pad_token_id)(samples)).loss
        batch = PackedCollator(tokenizer.pad_token_id)(rows)
        batch.pop("num_real_tokens")
        packed = model(**batch).loss
    assert abs(packed.item() - unpacked.item()) <= 1e-5, (packed.item(), unpacked.item())


@pytest.mark.e2e
def test_no_attention_across_samples_in_a_packed_row(fp32_llama):
    model, tokenizer, samples = fp32_llama
    a, b = samples[0], samples[1]
    changed = {"input_ids": [(t + 7) % len(tokenizer) for t in a["input_ids"]], "labels": a["labels"]}

    def logits(first):
        batch = PackedCollator(tokenizer.pad_token_id)(pack([first, b], 1024)[0])
        batch.pop("num_real_tokens")
        batch.pop("labels")
        with torch.no_grad():
            return model(**batch).logits[0]

    # pack keeps the data order inside a row: a first, then b
    n = len(a["input_ids"])
    before, after = logits(a), logits(changed)
    assert not torch.allclose(before[:n], after[:n])
    assert torch.equal(before[n:], after[n:])


@pytest.mark.e2e
def test_a_packed_run_trains(tiny_llama, tmp_path, write_recipe):
    recipe = load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_llama)},
                "lora": {"rank": 4, "dropout": 0.0},
                "data": {
                    "format": "messages",
                    "train": str(REPO / "data/examples/chat.jsonl"),
                    "max_length": 256,
                    "packing": True,
                    "eval_fraction": 0.1,
                },
                "train": {"lr": 3e-2, "max_steps": 4, "micro_batch_size": 2, "logging_steps": 1, "warmup": 0},
            }
        )
    )
    result = train_stage.run(recipe, log=lambda *_: None)
    stats = result.run_dir.root.joinpath("manifest.json").read_text()
    assert '"packing_efficiency"' in stats
    assert result.summary["tokens_seen"] > 0 and result.summary["tokens_trained"] < result.summary["tokens_seen"]
    assert result.summary["eval"]["loss"] < result.summary["eval_before"]["loss"]
