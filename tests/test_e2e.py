"""End to end on CPU, real bitsandbytes 4-bit layers, real peft, real Trainer: the LoRA contract.

The same checks run on a tiny random Llama (causal_lm, chat template) and on the real pretrained
MiniLM (classification with a new head):
- the adapted layers are bitsandbytes 4-bit layers, heads are not quantized;
- at step 0 the adapted model's logits equal the base model's;
- the trainable-parameter count equals the LoRA formula, computed here by hand;
- the loss falls; every base tensor is bitwise unchanged and every lora_* tensor changed;
- the saved adapter holds only adapter keys and, loaded with plain peft on a fresh 4-bit base,
  reproduces the trained model's logits.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from helpers import REPO, as_ready
from safetensors import safe_open

from lora_sft import data as data_stage
from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft import train as train_stage
from lora_sft.recipe.load import load_recipe
from lora_sft.settings import resolve

pytestmark = pytest.mark.e2e
RANK = 4


def llama_case(tiny_llama, tmp_path):
    recipe = {
        "task": "causal_lm",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": RANK, "alpha": 8, "dropout": 0.0},
        "data": {
            "format": "alpaca",
            "train": str(REPO / "data/examples/alpaca.jsonl"),
            "eval_fraction": 0.125,
            "max_length": 64,
        },
        "train": {
            "lr": 3e-2,
            "max_steps": 20,
            "micro_batch_size": 8,
            "warmup": 0,
            "scheduler": "constant",
            "logging_steps": 1,
            "save_steps": 10,
        },
    }
    # per layer: q, o (64->64), k, v (64->32), gate, up (64->128), down (128->64); 2 layers
    per_layer = RANK * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 128) + (128 + 64))
    return recipe, 2 * per_layer, ("lm_head",)


def minilm_case(tiny_llama, tmp_path):
    recipe = {
        "task": "classification",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": "sentence-transformers/all-MiniLM-L6-v2"},
        "lora": {"rank": RANK, "alpha": 8, "dropout": 0.0},
        "data": {
            "format": "classification",
            "train": str(REPO / "data/quickstart/train.jsonl"),
            "eval": str(REPO / "data/quickstart/eval.jsonl"),
            "max_length": 48,
        },
        "train": {
            "lr": 2e-3,
            "max_steps": 20,
            "micro_batch_size": 16,
            "warmup": 0,
            "scheduler": "constant",
            "logging_steps": 1,
            "save_steps": 10,
        },
    }
    h, i = 384, 1536
    # per layer: query, key, value, attention.output.dense (h->h), intermediate (h->i), output (i->h); 6 layers + pooler
    lora = 6 * RANK * (4 * (h + h) + (h + i) + (i + h)) + RANK * (h + h)
    head = h * 4 + 4  # the new classifier (4 labels), trained in full
    return recipe, lora + head, ("classifier",)


@pytest.fixture(params=[llama_case, minilm_case], ids=["tiny-llama-causal_lm", "minilm-classification"])
def case(request, tiny_llama, tmp_path, write_recipe):
    recipe, trainable, heads = request.param(tiny_llama, tmp_path)
    return load_recipe(write_recipe(recipe)), trainable, heads


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits.float()


def _fresh_4bit(recipe, plan):
    """The base loaded with plain transformers (no lora_sft), as a user of the adapter would."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=list(plan.heads),
    )
    base = model_stage.task_class(recipe.task).from_pretrained(
        plan.source.path, config=plan.config, quantization_config=quant, dtype=torch.float32, device_map={"": "cpu"}
    )
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # compare the same fp32 kernel, not bnb's bf16 inference one
    return base


def test_lora_contract(case):
    recipe, expected_trainable, heads = case
    prepared = preflight.prepare(recipe)
    torch.manual_seed(recipe.seed)
    tokenizer = model_stage.load_tokenizer(recipe, prepared.plan.source)
    bundle = data_stage.build(recipe, tokenizer, prepared.checked)
    batch = {
        k: v
        for k, v in data_stage.collator(recipe, tokenizer)(list(bundle.eval.select(range(6)))).items()
        if k != "labels"
    }

    base = model_stage.load_base(resolve(recipe), prepared.plan)
    base_logits = _logits(base, batch)
    model = model_stage.add_lora(base, recipe, prepared.plan)

    # the adapted layers are 4-bit; the heads are left unquantized
    adapted = {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert adapted and all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in adapted.values())
    for head in heads:
        head_module = model.get_submodule(f"base_model.model.{head}")
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in head_module.modules())

    # step 0: LoRA's B is zero, so the model is exactly the base
    assert torch.equal(_logits(model, batch), base_logits)
    assert (
        sum(p.numel() for p in model.parameters() if p.requires_grad)
        == expected_trainable
        == prepared.plan.trainable_params
    )

    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_stage.fit(
        resolve(recipe), model, as_ready(recipe, tokenizer, bundle, prepared.plan), log=lambda *_: None
    )

    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses

    after = model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_keys = {k for k in before if "lora_" in k}
    saved_copies = {k for k in before if ".modules_to_save." in k}
    assert lora_keys and lora_keys <= changed, sorted(lora_keys - changed)[:5]
    assert changed <= lora_keys | saved_copies, sorted(changed - lora_keys - saved_copies)[:5]

    trained_logits = _logits(model, batch)
    assert not torch.equal(trained_logits, base_logits)
    with safe_open(str(result.run_dir.adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k or any(f"{h}." in k for h in prepared.plan.modules_to_save) for k in keys), keys

    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(_fresh_4bit(recipe, prepared.plan), str(result.run_dir.adapter))
    diff = (_logits(reloaded, batch) - trained_logits).abs().max().item()
    assert diff <= 1e-5, diff


@pytest.mark.parametrize(
    "quant, lora, layer_type, n_adapted, trainable",
    [
        ({"mode": "nf4"}, {}, bnb.nn.Linear4bit, 14, 8192),
        ({"mode": "fp4", "double_quant": False}, {}, bnb.nn.Linear4bit, 14, 8192),
        ({"mode": "int8"}, {}, bnb.nn.Linear8bitLt, 14, 8192),
        ({"mode": "none"}, {}, torch.nn.Linear, 14, 8192),
        # one layer; DoRA adds a magnitude per output feature: 2*64 + 2*32 + 2*128 + 64 = 512
        ({"mode": "nf4"}, {"layers": [1], "dora": True, "rslora": True}, bnb.nn.Linear4bit, 7, 4096 + 512),
        (
            {"mode": "nf4"},
            {"target_modules": r".*\.self_attn\.(q|v)_proj"},
            bnb.nn.Linear4bit,
            4,
            RANK * 2 * ((64 + 64) + (64 + 32)),
        ),
    ],
)
def test_quant_modes_and_lora_options(
    tiny_llama, tmp_path, write_recipe, quant, lora, layer_type, n_adapted, trainable
):
    recipe = load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_llama)},
                "quant": quant,
                "lora": {"rank": RANK, "alpha": 8, **lora},
                "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl")},
            }
        )
    )
    prepared = preflight.prepare(recipe)
    model = model_stage.add_lora(model_stage.load_base(resolve(recipe), prepared.plan), recipe, prepared.plan)
    adapted = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(adapted) == n_adapted and all(type(m.base_layer) is layer_type for m in adapted)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable
    expected_scale = 8 / RANK**0.5 if lora.get("rslora") else 8 / RANK
    assert all(m.scaling["default"] == pytest.approx(expected_scale) for m in adapted)
    assert not any(
        isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt) for m in model.base_model.model.lm_head.modules()
    )
