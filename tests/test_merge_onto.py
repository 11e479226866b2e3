"""`export --merged --onto`: the adapter merged onto the 4-bit weights dequantized as trained reproduces the model
that was trained (4-bit base + adapter, loaded with transformers + peft); merged onto the original weights, it
does not. Checked on the merge itself for nf4 / fp4, double quant on / off, causal LM / classifier (its head a
module to save), DoRA / rsLoRA, fp32 and bf16, without training: the adapter gets random values instead."""

from __future__ import annotations

import pytest
import torch
from helpers import REPO, write_jsonl

from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft.export.dequantize import take_trained_weights
from lora_sft.recipe.load import load_recipe
from lora_sft.recipe.sections import QuantSection
from lora_sft.settings import resolve

pytestmark = pytest.mark.e2e

TEXTS = [
    "Rewrite the sentence in upper case: pillow silver",
    "Count the words.",
    "Below is an instruction that describes a task.",
]

# id: (task, quant mode, double quant, lora options, compute and export dtype)
CASES = {
    "causal-nf4-dora": ("causal_lm", "nf4", True, {"dora": True}, "fp32"),
    "causal-fp4-rslora-some-targets": (
        "causal_lm",
        "fp4",
        False,
        {"rslora": True, "target_modules": ["q_proj", "v_proj"]},
        "fp32",
    ),
    "classifier-fp4-dora": ("classification", "fp4", True, {"dora": True}, "fp32"),
    "classifier-nf4-rslora": ("classification", "nf4", False, {"rslora": True}, "fp32"),
    "causal-nf4-bf16": ("causal_lm", "nf4", True, {}, "bf16"),
}


def _recipe(tmp_path, write_recipe, tiny_llama, task: str, mode: str, double_quant: bool, lora: dict):
    if task == "classification":
        rows = [{"text": t, "label": label} for t in TEXTS for label in ("upper", "other")]
        data = {"format": "classification", "train": str(write_jsonl(tmp_path / "train.jsonl", rows))}
    else:
        data = {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl")}
    return load_recipe(
        write_recipe(
            {
                "task": task,
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_llama)},
                "quant": {"mode": mode, "double_quant": double_quant, "compute_dtype": "fp32"},
                "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, **lora},
                "data": data | {"max_length": 64},
            }
        )
    )


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


@pytest.mark.parametrize("case", CASES)
def test_dequantized_merge_is_the_trained_model_and_original_is_not(case, tmp_path, write_recipe, tiny_llama):
    task, mode, double_quant, lora, dtype = CASES[case]
    recipe = _recipe(tmp_path, write_recipe, tiny_llama, task, mode, double_quant, lora)
    plan = preflight.prepare(recipe).plan
    # preflight refuses bf16 training without a GPU; the 4-bit forward runs in bf16 on a CPU all the same
    recipe = recipe.model_copy(update={"quant": recipe.quant.model_copy(update={"compute_dtype": dtype})})
    tokenizer = model_stage.load_tokenizer(recipe, plan.source)
    batch = dict(tokenizer(TEXTS, return_tensors="pt", padding=True))

    torch.manual_seed(0)
    training = model_stage.add_lora(model_stage.load_base(resolve(recipe), plan), recipe, plan)
    with torch.no_grad():  # as if trained: B away from zero, DoRA's magnitudes and the classifier head moved
        for p in training.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    training.save_pretrained(tmp_path / "adapter")
    # the trained model as a user loads it: the 4-bit base (load_base keeps its AVX512-BF16 guard) + peft's loader
    trained = model_stage.load_adapter(model_stage.load_base(resolve(recipe), plan), tmp_path / "adapter").eval()
    reference = _logits(trained, batch)

    unquantized = recipe.model_copy(update={"quant": QuantSection(mode="none", compute_dtype=dtype)})

    def merge(onto: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits of base + adapter in `dtype` before and after the merge."""
        torch.manual_seed(0)
        model = model_stage.load_adapter(model_stage.load_base(resolve(unquantized), plan), tmp_path / "adapter").eval()
        if onto == "dequantized":
            take_trained_weights(model, trained)
        before = _logits(model, batch)
        return before, _logits(model.merge_and_unload(), batch)

    unmerged, dequantized = merge("dequantized")
    original_unmerged, original = merge("original")
    assert dequantized.shape == reference.shape
    diff = (dequantized - reference).abs().max().item()
    if dtype == "fp32":
        assert diff <= 1e-4 and (unmerged - reference).abs().max().item() <= 1e-5
    else:  # within the dtype's rounding: as close as the same merge in bf16 comes to its own unmerged model
        rounding = (original - original_unmerged).abs().max().item()
        assert 0 < diff <= 2 * rounding
    # the control: today's merge onto the unquantized weights is measurably another model
    assert (original - reference).abs().max().item() > max(1e-2, 4 * diff)
