"""Evaluation before training must not break training.

On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit for inference on an eval-mode forward
under no_grad; no gradient flows through a repacked layer afterwards. lora_sft evaluates before and
during training, so the gradients after an evaluation must equal those of a model never evaluated.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import has_avx512bf16
from helpers import REPO

from lora_sft import data as data_stage
from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft.recipe.load import load_recipe
from lora_sft.settings import resolve

pytestmark = pytest.mark.e2e


@pytest.fixture
def staged(tiny_llama, tmp_path, write_recipe):
    recipe = load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_llama)},
                "lora": {"rank": 4, "dropout": 0.0},
                "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl"), "max_length": 64},
            }
        )
    )
    prepared = preflight.prepare(recipe)
    tokenizer = model_stage.load_tokenizer(recipe, prepared.plan.source)
    bundle = data_stage.build(recipe, tokenizer, prepared.checked)
    batch = data_stage.CausalCollator(tokenizer.pad_token_id)(list(bundle.train.select(range(4))))

    def build(evaluate_first: bool, guard: bool = True):
        torch.manual_seed(0)
        model = model_stage.add_lora(model_stage.load_base(resolve(recipe), prepared.plan), recipe, prepared.plan)
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit) and not guard:
                m.support_avx512bf16_for_cpu = has_avx512bf16()  # undo lora_sft's guard: the library default
        with torch.no_grad():  # LoRA B starts at zero; give it values so every layer's A gets a gradient
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1)
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}, model

    return build


def test_eval_then_train_gives_the_gradients_of_train(staged):
    plain, _ = staged(evaluate_first=False)
    after_eval, model = staged(evaluate_first=True)
    assert set(plain) == set(after_eval) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in plain:
        assert torch.equal(plain[name], after_eval[name]), name


@pytest.mark.skipif(not has_avx512bf16(), reason="the repacking only happens on CPUs with AVX512-BF16")
def test_without_the_guard_evaluation_breaks_gradients(staged):
    """The control: this machine has the trap, so the test above would fail without lora_sft's guard."""
    plain, _ = staged(evaluate_first=False, guard=False)
    after_eval, _ = staged(evaluate_first=True, guard=False)
    assert any(name not in after_eval or not torch.equal(plain[name], after_eval[name]) for name in plain)
