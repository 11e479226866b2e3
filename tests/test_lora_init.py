"""lora.init: how A and B start. Each supported init gives the A and B that peft documents for it (default:
A Kaiming-uniform, B zero; gaussian: A normal with std 1/r, B zero; eva: A the top right-singular vectors of
each layer's inputs, B zero), the seed governs them, LoftQ starts a 4-bit model closer to the unquantized one
than the default does, pissa/olora start at the base (a residual plus B0 @ A0) and save adapter/ for the
original base (rank 2r, its head kept), and the refused combinations (tests/bad_inputs/lora-init-*.yaml) say why in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import REPO

from lora_sft import data as data_stage
from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft.cli.main import main
from lora_sft.errors import UserError
from lora_sft.recipe.load import load_recipe
from lora_sft.settings import resolve

pytestmark = pytest.mark.e2e
RANK = 4
ALPHA = 8  # scale alpha / rank = 2: LoftQ's factors must account for it


def _recipe(tiny_llama, tmp_path, write_recipe, init: str, quant: str = "nf4", seed: int = 42, **lora):
    return load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / "run"),
                "seed": seed,
                "model": {"path": str(tiny_llama)},
                "quant": {"mode": quant},
                "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "init": init, **lora},
                "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl")},
                "train": {"micro_batch_size": 4},
            },
            name=f"{init}-{quant}-{seed}.yaml",
        )
    )


def _build(recipe):
    """The adapted model as `train` builds it (seeded, EVA's batches from the training data), and a batch."""
    from transformers import set_seed

    prepared = preflight.prepare(recipe).ready()
    set_seed(recipe.seed)
    collate = data_stage.collator(recipe, prepared.tokenizer)
    batches = model_stage.InitBatches(recipe, prepared.bundle.train, collate)
    base = model_stage.load_base(resolve(recipe), prepared.plan)
    rows = list(prepared.bundle.train.select(range(4)))
    batch = {k: v for k, v in collate(rows).items() if k in ("input_ids", "attention_mask")}
    return model_stage.add_lora(base, recipe, prepared.plan, batches), batch, prepared


def _layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def _factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
        for n, m in _layers(model).items()
    }


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    model.eval()
    return model(**batch).logits.float()


def test_default_and_gaussian_as_peft_documents_and_seeded(tiny_llama, tmp_path, write_recipe):
    default = _factors(_build(_recipe(tiny_llama, tmp_path, write_recipe, "default"))[0])
    gaussian = _factors(_build(_recipe(tiny_llama, tmp_path, write_recipe, "gaussian"))[0])
    again = _factors(_build(_recipe(tiny_llama, tmp_path, write_recipe, "gaussian"))[0])
    other_seed = _factors(_build(_recipe(tiny_llama, tmp_path, write_recipe, "gaussian", seed=7))[0])
    assert default.keys() == gaussian.keys() and len(default) == 14  # 2 layers x 7 linear modules
    for a, b in default.values():
        bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
        assert torch.count_nonzero(b) == 0 and a.abs().max() <= bound and a.abs().max() > 0.8 * bound
    every_a = torch.cat([a.flatten() for a, _ in gaussian.values()])
    assert every_a.std().item() == pytest.approx(1 / RANK, rel=0.05)  # peft: normal(0, 1/r)
    assert every_a.abs().max() > 2 / math.sqrt(64)  # beyond any Kaiming-uniform bound here: not the default
    assert all(torch.count_nonzero(b) == 0 for _, b in gaussian.values())
    # the seed governs the init: the same seed gives the same factors, another seed others
    assert all(torch.equal(gaussian[n][0], again[n][0]) for n in gaussian)
    assert not any(torch.equal(gaussian[n][0], other_seed[n][0]) for n in gaussian)


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_loftq_starts_closer_to_the_unquantized_model(quant, tiny_llama, tmp_path, write_recipe):
    unquantized, batch, _ = _build(_recipe(tiny_llama, tmp_path, write_recipe, "default", quant="none"))
    reference = _logits(unquantized, batch)
    default, _, _ = _build(_recipe(tiny_llama, tmp_path, write_recipe, "default", quant=quant))
    recipe = _recipe(tiny_llama, tmp_path, write_recipe, "loftq", quant=quant)
    loftq, _, prepared = _build(recipe)
    error_default = (_logits(default, batch) - reference).abs()
    error_loftq = (_logits(loftq, batch) - reference).abs()
    # the default starts at the 4-bit base (B = 0); LoftQ's B @ A cancels the top of the quantization error
    assert error_loftq.mean() < 0.95 * error_default.mean(), (error_loftq.mean(), error_default.mean())

    # per layer: W - (dequantized + scale * B @ A) is smaller than W - dequantized, by what a rank-r SVD removes
    import bitsandbytes as bnb

    weights = {n: p for n, p in unquantized.named_parameters() if n.endswith("base_layer.weight")}
    for name, module in _layers(loftq).items():
        w = weights[f"{name}.base_layer.weight"].float()
        q = module.base_layer.weight
        residual = w - bnb.functional.dequantize_4bit(q.data, q.quant_state).float()
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        left = residual - module.scaling["default"] * b.detach() @ a.detach()
        s = torch.linalg.svdvals(residual)
        assert torch.linalg.matrix_norm(left).item() == pytest.approx(s[RANK:].square().sum().sqrt().item(), rel=1e-3)

    # the adapter saved as it stands loads on a fresh 4-bit base (what eval and export do) with the same logits
    loftq.save_pretrained(tmp_path / "adapter")
    reloaded = model_stage.load_adapter(model_stage.load_base(resolve(recipe), prepared.plan), tmp_path / "adapter")
    assert torch.equal(_logits(reloaded, batch), _logits(loftq, batch))


def test_eva_takes_a_from_the_layer_inputs(tiny_llama, tmp_path, write_recipe):
    recipe = _recipe(tiny_llama, tmp_path, write_recipe, "eva")
    eva, batch, prepared = _build(recipe)
    assert eva.peft_config["default"].init_lora_weights == "eva"
    factors = _factors(eva)
    again = _factors(_build(recipe)[0])
    assert len(factors) == 14
    for name, (a, b) in factors.items():
        assert a.shape == (RANK, a.shape[1]) and torch.count_nonzero(b) == 0  # every layer keeps rank r (rho 1)
        # A's rows are orthonormal principal directions (of the layer's inputs), not Kaiming-uniform noise
        assert torch.allclose(a @ a.T, torch.eye(RANK), atol=1e-4)
        assert torch.equal(a, again[name][0])  # the data pass is in order: the same data give the same A
    # B = 0: the adapted model starts exactly at the base
    base = model_stage.load_base(resolve(recipe), prepared.plan)
    assert torch.equal(_logits(eva, batch), _logits(base, batch))


@pytest.mark.parametrize("init", ["loftq", "eva"])
def test_trained_adapter_reloads_on_the_original_base(init, tiny_llama, tmp_path, capsys):
    """Through the CLI: validate names the init; the trained adapter/, applied by `eval` to a freshly loaded
    4-bit base, gives the eval loss training ended with (the init left the base as it was)."""
    import yaml

    out = tmp_path / "run"
    recipe = {
        "task": "causal_lm",
        "output_dir": str(out),
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "init": init},
        "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl"), "eval_fraction": 0.125},
        "train": {"max_steps": 1, "micro_batch_size": 4, "warmup": 0, "logging_steps": 1, "save_steps": 1},
        "eval": {"generate": 0},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    assert f"lora: rank {RANK}, alpha {ALPHA}, dropout 0, init {init} on 14 modules" in capsys.readouterr().out
    assert main(["train", str(tmp_path / "r.yaml")]) == 0, capsys.readouterr().err
    assert main(["eval", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(summary["evaluation"]["fine_tuned"]["loss"], rel=1e-5)


def test_loftq_needs_local_safetensors(tiny_llama, tmp_path, write_recipe):
    recipe = _recipe(tiny_llama, tmp_path, write_recipe, "loftq")
    hub = model_stage.ModelSource("org/model", "hub")
    assert model_stage.init_problems(recipe, hub) == [
        f"{recipe.where('lora', 'init')}: loftq reads the unquantized weights from local safetensors files when it runs, and {tiny_llama} is a hub id; download the model to a folder and set model.path to it"
    ]
    assert model_stage.init_problems(recipe, model_stage.ModelSource(str(tmp_path), "local folder")) == [
        f"{recipe.where('lora', 'init')}: loftq reads the unquantized weights from safetensors files, and {tmp_path} has none; convert the weights to safetensors"
    ]
    assert model_stage.init_problems(recipe, model_stage.ModelSource(str(tiny_llama), "local folder")) == []


def test_a_rank_the_init_cannot_give_a_layer_is_refused_by_the_preflight(tiny_llama, tmp_path, write_recipe):
    """EVA's A comes from the SVD of a layer's inputs, which have `in` directions: above that peft's data pass never
    converged (over 10 minutes on the tiny model); pissa and olora (min(in, out)) are corpus cases
    (tests/bad_inputs/lora-init-*-rank-above-layer.yaml). Refused from the layers' shapes, before a weight loads;
    up to the layer's room is accepted, and the other inits take any rank (loftq keeps the extra rows at zero)."""
    recipe = _recipe(tiny_llama, tmp_path, write_recipe, "eva", rank=80)
    with pytest.raises(UserError) as refused:
        preflight.prepare(recipe)
    assert refused.value.problems == [
        f"{recipe.where('lora', 'init')}: eva with lora.rank 80 cannot apply to model.layers.0.mlp.gate_proj (64 in, 128 out) (and 11 more targeted layers): eva starts A from the SVD of the layer's inputs, which have `in` directions, 64 there; set lora.rank to 64 or less, leave gate_proj out of lora.target_modules, or use init: default"
    ]
    preflight.prepare(_recipe(tiny_llama, tmp_path, write_recipe, "eva", rank=64, target_modules=["gate_proj"]))
    for init in ("default", "gaussian", "loftq"):
        preflight.prepare(_recipe(tiny_llama, tmp_path, write_recipe, init, rank=80))


@pytest.mark.parametrize("init", ["loftq", "eva"])
def test_inits_on_a_classification_base(init, tmp_path, write_recipe):
    """MiniLM (BERT): its pooler sees one vector per sample, which EVA takes as is; LoftQ finds its weights
    in the packaged checkpoint. Every adapted layer gets the init; the new head is not adapted."""
    recipe = load_recipe(
        write_recipe(
            {
                "task": "classification",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": "sentence-transformers/all-MiniLM-L6-v2"},
                "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "init": init},
                "data": {
                    "format": "classification",
                    "train": str(REPO / "data/quickstart/train.jsonl"),
                    "eval": str(REPO / "data/quickstart/eval.jsonl"),
                    "max_length": 48,
                },
                "train": {"micro_batch_size": 16},
            }
        )
    )
    model, _, _ = _build(recipe)
    factors = _factors(model)
    assert len(factors) == 6 * 6 + 1  # 6 layers x 6 linear modules + the pooler
    for a, b in factors.values():
        if init == "eva":
            assert torch.count_nonzero(b) == 0 and torch.allclose(a @ a.T, torch.eye(RANK), atol=1e-4)
        else:
            assert torch.count_nonzero(b) == b.numel() and torch.count_nonzero(a) == a.numel()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_start_at_the_base(init, tiny_llama, tmp_path, write_recipe):
    """The base becomes a residual W - scale * B0 @ A0 (not W), and residual + B0 @ A0 is the original model."""
    recipe = _recipe(tiny_llama, tmp_path, write_recipe, init, quant="none")
    adapted, batch, prepared = _build(recipe)
    base = model_stage.load_base(resolve(recipe), prepared.plan)
    weights = dict(base.named_parameters())
    for name, module in _layers(adapted).items():
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        w = weights[f"{name.removeprefix('base_model.model.')}.weight"]
        residual = module.base_layer.weight
        assert torch.count_nonzero(a) > 0 and torch.count_nonzero(b) > 0  # not B = 0: the top of W
        assert not torch.allclose(residual, w, atol=1e-3)
        assert torch.allclose(residual + module.scaling["default"] * b @ a, w, atol=1e-5)
    assert torch.allclose(_logits(adapted, batch), _logits(base, batch), atol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_adapter_applies_to_the_original_base(init, tiny_llama, tmp_path, capsys):
    """Trained on the residual base, adapter/ is saved as a plain LoRA of rank 2r for the ORIGINAL base: peft's
    own loader on a fresh base gives the trained model's logits, and `eval` and `export` (its fidelity
    check) take it as is."""
    import yaml
    from peft import PeftModel

    from lora_sft import train

    out = tmp_path / "run"
    recipe = {
        "task": "causal_lm",
        "output_dir": str(out),
        "model": {"path": str(tiny_llama)},
        "quant": {"mode": "none"},
        "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "init": init},
        "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl"), "eval_fraction": 0.125},
        "train": {"max_steps": 2, "micro_batch_size": 4, "warmup": 0, "logging_steps": 1, "lr": 1e-3},
        "eval": {"generate": 0},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_recipe(tmp_path / "r.yaml")
    assert main(["validate", str(tmp_path / "r.yaml")]) == 0
    assert f"init {init} on 14 modules" in capsys.readouterr().out
    result = train.run(loaded, log=lambda *_: None)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (2 * RANK, 2 * ALPHA, True)
    card = (out / "adapter" / "README.md").read_text()
    assert f"LoRA rank {RANK}, init {init}: saved as a rank-{2 * RANK} LoRA for the original base, task" in card

    prepared = preflight.prepare(loaded).ready()
    rows = list(prepared.bundle.train.select(range(4)))
    collate = data_stage.collator(loaded, prepared.tokenizer)
    batch = {k: v for k, v in collate(rows).items() if k in ("input_ids", "attention_mask")}
    trained = _logits(result.model, batch)
    original = model_stage.load_base(resolve(loaded), prepared.plan)
    start = _logits(original, batch)
    reloaded = PeftModel.from_pretrained(original, str(out / "adapter"))
    assert (trained - start).abs().max() > 1e-2  # training moved the model: the check below is not vacuous
    assert torch.allclose(_logits(reloaded, batch), trained, atol=1e-4)

    assert main(["eval", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(summary["evaluation"]["fine_tuned"]["loss"], rel=1e-5)
    assert main(["export", str(out), "--samples", "2", "--out", str(tmp_path / "export")]) == 0, capsys.readouterr().err
    report = capsys.readouterr().out
    assert "adapter loaded with plain peft vs (b): max |logit diff| 0\n" in report  # fidelity (c), rank 2r
    merged = ["export", str(out), "--merged", "--samples", "2", "--out", str(tmp_path / "merged")]
    assert main(merged) == 0, capsys.readouterr().err  # the rank-2r adapter folded into the original weights


def test_pissa_keeps_a_trained_head(tmp_path, write_recipe):
    """peft's conversion writes back only lora_A and lora_B: the classification head (modules_to_save) trained
    with a pissa adapter is put back, so adapter/ on the original base gives the trained model's logits."""
    from peft import PeftModel

    from lora_sft import train

    recipe = load_recipe(
        write_recipe(
            {
                "task": "classification",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": "sentence-transformers/all-MiniLM-L6-v2"},
                "quant": {"mode": "none"},
                "lora": {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "init": "pissa"},
                "data": {
                    "format": "classification",
                    "train": str(REPO / "data/quickstart/train.jsonl"),
                    "eval": str(REPO / "data/quickstart/eval.jsonl"),
                    "max_length": 48,
                },
                "train": {"max_steps": 2, "micro_batch_size": 16, "warmup": 0, "lr": 1e-3},
                "eval": {"generate": 0},
            }
        )
    )
    result = train.run(recipe, log=lambda *_: None)
    prepared = preflight.prepare(recipe).ready()
    collate = data_stage.collator(recipe, prepared.tokenizer)
    rows = list(prepared.bundle.train.select(range(4)))
    batch = {k: v for k, v in collate(rows).items() if k in ("input_ids", "attention_mask")}
    reloaded = PeftModel.from_pretrained(
        model_stage.load_base(resolve(recipe), prepared.plan), str(tmp_path / "run" / "adapter")
    )
    assert any("modules_to_save" in n for n, _ in reloaded.named_parameters())
    assert torch.allclose(_logits(reloaded, batch), _logits(result.model, batch), atol=1e-4)
