"""The compute dtype: with quant.compute_dtype bf16 the frozen embedding, output layer and norms stay bf16 (nothing
upcasts them to fp32, as peft's prepare_model_for_kbit_training would: lora_sft never calls it), the 4-bit layers
compute in bf16, and only what trains is fp32. `auto` picks bf16 on a GPU that runs it natively.

bitsandbytes runs 4-bit layers on the CPU, so the model is built here exactly as `train` builds it
(`model.load_base`, `model.add_lora`); only the preflight's hardware check, which refuses bf16 training
without a GPU, is bypassed."""

from __future__ import annotations

import pytest
import torch

from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft.recipe.load import load_recipe
from lora_sft.recipe.sections import QuantSection
from lora_sft.settings import Machine, compute_dtype, resolve

pytestmark = pytest.mark.unit


def build(tiny_llama, tmp_path, write_recipe, monkeypatch, **lora):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Name a fruit.", "output": "apple"}\n' * 4)
    recipe = load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_llama)},
                "quant": {"mode": "nf4", "compute_dtype": "bf16"},
                "lora": {"rank": 4, "dropout": 0.0, **lora},
                "data": {"format": "alpaca", "train": str(data), "max_length": 32},
            }
        )
    )
    monkeypatch.setattr(preflight, "check_hardware", lambda recipe: None)  # bf16 training needs a GPU, by rule
    ready = preflight.prepare(recipe).ready()
    torch.manual_seed(0)
    return model_stage.add_lora(model_stage.load_base(resolve(recipe), ready.plan), recipe, ready.plan)


def test_bf16_compute_keeps_embeddings_output_layer_and_norms_bf16(tiny_llama, tmp_path, write_recipe, monkeypatch):
    import bitsandbytes as bnb

    model = build(tiny_llama, tmp_path, write_recipe, monkeypatch)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    norms = [m for n, m in base.named_modules() if n.endswith("norm")]
    assert len(norms) == 2 * 2 + 1 and all(m.weight.dtype == torch.bfloat16 for m in norms)  # 2 per layer, final
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * 2  # q k v o gate up down, 2 layers
    for layer in quantized:
        assert layer.weight.dtype == torch.uint8 and layer.weight.quant_state.dtype == torch.bfloat16
        assert layer.compute_dtype == torch.bfloat16
    # what trains is exactly the LoRA weights, fp32 (peft's autocast_adapter_dtype), everything else frozen
    # and either 4-bit or bf16: no fp32 copy of a frozen weight anywhere
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.uint8, torch.bfloat16}

    # one forward and backward: the logits come out of the bf16 output layer, gradients reach every LoRA weight
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    # B starts at zero, so A's first gradient is zero; B's is not
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if ".lora_B." in n)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_a_module_trained_in_full_trains_an_fp32_copy_and_keeps_its_frozen_original_bf16(
    tiny_llama, tmp_path, write_recipe, monkeypatch
):
    """lora.modules_to_save: the copy the optimizer updates is fp32 (a bf16 weight would lose small updates); the
    base's own lm_head, used when the adapter is off, stays bf16."""
    model = build(tiny_llama, tmp_path, write_recipe, monkeypatch, modules_to_save=["lm_head"])
    wrapper = model.get_base_model().lm_head
    assert wrapper.original_module.weight.dtype == torch.bfloat16 and not wrapper.original_module.weight.requires_grad
    copy = wrapper.modules_to_save["default"].weight
    assert copy.dtype == torch.float32 and copy.requires_grad
    assert model.get_base_model().get_input_embeddings().weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "cuda,native,emulated,expected",
    [
        (True, True, True, torch.bfloat16),  # Ampere and later (A100, H100, H200, RTX 30xx+)
        (True, False, True, torch.float32),  # V100, T4: bf16 only emulated, slowly
        (False, False, False, torch.float32),  # no GPU
    ],
)
def test_auto_picks_bf16_on_a_gpu_that_runs_it_natively(monkeypatch, cuda, native, emulated, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or (including_emulation and emulated)
    )
    assert compute_dtype(QuantSection(), Machine.here()) == expected
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    assert {k: compute_dtype(QuantSection(compute_dtype=k), Machine.here()) for k in named} == named
