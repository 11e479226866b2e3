"""The training options other tools have: NEFTune (train.neftune_alpha), LoRA+ (train.lora_plus_ratio) and early
stopping (train.early_stopping), each on the tiny Llama with the real Trainer.

- NEFTune: the input embeddings the model sees are noisy in train mode only, within NEFTune's bound
  alpha / sqrt(seq_len * hidden) (and reaching it), and exactly the embedding rows in evaluation.
- LoRA+: after a step, every B matrix sits in a param group whose lr is ratio x the A matrices' lr, with the
  recipe's optimizer class and weight decay.
- Early stopping: on a constructed eval curve, training stops at the step the patience and min_delta say,
  adapter/ holds the best checkpoint bitwise (kept by the rotation), the final evaluation measures it, and
  summary.json says so.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import REPO, as_ready
from safetensors.torch import load_file
from transformers import TrainerCallback

from lora_sft import preflight
from lora_sft import train as train_stage
from lora_sft.errors import UserError
from lora_sft.recipe.load import load_recipe
from lora_sft.run import trainer as trainer_stage
from lora_sft.run.rundir import RunDir
from lora_sft.settings import resolve

ROWS = (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()[:24]


def recipe_dict(tiny_llama, tmp_path, **train) -> dict:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(ROWS) + "\n")
    return {
        "task": "causal_lm",
        "output_dir": str(tmp_path / "run"),
        "seed": 3,
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"format": "alpaca", "train": str(data), "eval_fraction": 0.25, "max_length": 64},
        "train": {
            "lr": 1e-2,
            "max_steps": 4,
            "micro_batch_size": 4,
            "warmup": 0,
            "scheduler": "constant",
            "logging_steps": 1,
            "save_steps": 2,
            "gradient_checkpointing": False,
            **train,
        },
    }


def _load(write_recipe, recipe: dict):
    return load_recipe(write_recipe(recipe))


# ---------------------------------------------------------------- NEFTune


@pytest.mark.e2e
def test_neftune_noise_in_train_mode_only_at_the_documented_scale(tiny_llama, tmp_path, write_recipe):
    alpha = 5.0
    recipe = _load(write_recipe, recipe_dict(tiny_llama, tmp_path, neftune_alpha=alpha, eval_steps=2))
    ready = preflight.prepare(recipe).ready()
    model = train_stage.setup_model(resolve(recipe), ready, log=lambda *_: None)
    embedding = model.get_input_embeddings()
    seen: list[tuple[bool, torch.Tensor, torch.Tensor]] = []  # (train mode, clean rows, what layer 0 received)
    ids: list[torch.Tensor] = []
    # the token ids going in, and what the first decoder layer gets: the embeddings after every hook on them
    # (Trainer adds NEFTune's when training starts, so a hook on the embedding itself would run before it)
    embedding.register_forward_pre_hook(lambda module, args: ids.append(args[0].detach().clone()))

    def layer_input(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append((embedding.training, embedding.weight[ids[-1]].detach().clone(), hidden.detach().clone()))

    model.base_model.model.model.layers[0].register_forward_pre_hook(layer_input, with_kwargs=True)
    train_stage.fit(
        resolve(recipe), model, as_ready(recipe, ready.tokenizer, ready.bundle, ready.plan), log=lambda *_: None
    )

    trained = [(clean, got) for training, clean, got in seen if training]
    evaluated = [(clean, got) for training, clean, got in seen if not training]
    assert len(trained) == 4  # one micro batch per step
    assert len(evaluated) >= 4  # before, at steps 2 and 4, after: 1 batch each
    for clean, got in evaluated:
        assert torch.equal(clean, got)  # no noise in evaluation
    hidden = embedding.weight.shape[1]
    for clean, got in trained:
        noise = got - clean
        bound = alpha / math.sqrt(got.shape[1] * hidden)  # NEFTune: uniform in [-bound, bound]
        assert noise.abs().max() <= bound * (1 + 1e-5)
        assert noise.abs().max() >= 0.99 * bound  # thousands of uniform draws reach the edge
        assert abs(float(noise.std()) - bound / math.sqrt(3)) < 0.05 * bound  # the std of a uniform
    assert not embedding._forward_hooks  # Trainer removed its hook: generation after training is clean


# ---------------------------------------------------------------- LoRA+


@pytest.mark.e2e
def test_lora_plus_b_learns_at_ratio_times_a(tiny_llama, tmp_path, write_recipe):
    ratio = 16.0
    recipe = _load(
        write_recipe,
        recipe_dict(
            tiny_llama,
            tmp_path,
            lora_plus_ratio=ratio,
            max_steps=2,
            warmup=4,
            scheduler="constant_with_warmup",
            weight_decay=0.1,
        ),
    )
    result = train_stage.run(recipe, log=lambda *_: None)
    optimizer = result.trainer.optimizer
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    assert type(inner) is torch.optim.AdamW  # train.optimizer adamw_torch, kept
    group_of = {id(p): g for g in inner.param_groups for p in g["params"]}
    named = {n: p for n, p in result.model.named_parameters() if p.requires_grad}
    a = [n for n in named if "lora_A" in n]
    b = [n for n in named if "lora_B" in n]
    assert a and b and len(a) + len(b) == len(named) and all(id(p) in group_of for p in named.values())
    lr_a = {group_of[id(named[n])]["lr"] for n in a}
    lr_b = {group_of[id(named[n])]["lr"] for n in b}
    assert len(lr_a) == 1 and len(lr_b) == 1
    (lr_a_now,), (lr_b_now,) = lr_a, lr_b
    assert lr_a_now == pytest.approx(0.5e-2, rel=1e-12)  # lr 1e-2 halfway through the warmup: the schedule acts on both
    assert lr_b_now == pytest.approx(ratio * lr_a_now, rel=1e-12)
    assert {group_of[id(named[n])]["weight_decay"] for n in a + b} == {0.1}


@pytest.mark.unit
@pytest.mark.parametrize(
    "optimizer,cls",
    [
        ("adamw_torch", "AdamW"),
        ("sgd", "SGD"),
        ("adafactor", "Adafactor"),
        ("adamw_8bit", "bitsandbytes.optim.adamw.AdamW"),
    ],
)
def test_lora_plus_keeps_the_recipes_optimizer(optimizer, cls, tmp_path, write_recipe):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    recipe = _load(
        write_recipe,
        {
            "task": "causal_lm",
            "output_dir": str(tmp_path / "run"),
            "model": {"path": "org/base"},
            "data": {"format": "alpaca", "train": str(data)},
            "train": {"optimizer": optimizer, "lr": 1e-3, "lora_plus_ratio": 4, "weight_decay": 0.01},
        },
    )
    args = trainer_stage.training_arguments(resolve(recipe), tmp_path / "s", has_eval=False)
    opt = trainer_stage.lora_plus_optimizer(resolve(recipe), model, args)
    assert type(opt).__name__ == cls or f"{type(opt).__module__}.{type(opt).__name__}" == cls
    if optimizer == "adamw_8bit":
        assert opt.args.optim_bits == 8  # bitsandbytes' AdamW, 8-bit states
    lrs = {}
    for group in opt.param_groups:
        for p in group["params"]:
            lrs[id(p)] = (group["lr"], group["weight_decay"])
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lrs[id(p)] == ((4e-3 if "lora_B" in name else 1e-3), 0.01), name
    recipe.train.lora_plus_ratio = None
    assert trainer_stage.lora_plus_optimizer(resolve(recipe), model, args) is None  # Trainer builds its own


# ---------------------------------------------------------------- early stopping

CURVE = {1: 3.0, 2: 2.5, 3: 2.0, 4: 1.97, 5: 2.3, 6: 1.0}  # the scripted eval_loss of each step's evaluation


class ScriptedEvalLoss(TrainerCallback):
    """Replaces each in-training evaluation's eval_loss with CURVE's value, before early stopping and Trainer's
    best-model tracking read it (callbacks see the metrics dict Trainer then uses). Evaluations outside training
    (before, after) keep their measured loss."""

    def __init__(self):
        self.done: set[int] = set()
        self.measured: dict[int, float] = {}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        step = state.global_step
        if step in CURVE and step not in self.done:
            self.done.add(step)
            self.measured[step] = metrics["eval_loss"]
            metrics["eval_loss"] = CURVE[step]


@pytest.mark.e2e
def test_early_stopping_stops_at_the_expected_step_and_keeps_the_best(tiny_llama, tmp_path, write_recipe, monkeypatch):
    # patience 2, min_delta 0.05: step 4 (1.97) is a new best but not better by 0.05 (1st miss), step 5 is worse
    # (2nd miss): training stops at step 5 of 8; the best is step 4, whose checkpoint adapter/ then holds
    stop = {"patience": 2, "min_delta": 0.05}
    recipe = _load(
        write_recipe,
        recipe_dict(
            tiny_llama, tmp_path, max_steps=8, eval_steps=1, save_steps=1, save_total_limit=1, early_stopping=stop
        ),
    )
    scripted = ScriptedEvalLoss()
    original = train_stage.build_trainer

    def build_trainer(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.callback_handler.callbacks.insert(0, scripted)  # before EarlyStoppingCallback
        return trainer

    monkeypatch.setattr(train_stage, "build_trainer", build_trainer)
    result = train_stage.run(recipe, log=lambda *_: None)
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 5
    assert summary["early_stopping"] == {
        "metric": "eval_loss",
        "best_step": 4,
        "best_metric": 1.97,
        "stopped_at": 5,
        "adapter": "checkpoint-4 (the best)",
    }
    assert RunDir(run).read_summary().to_json() == summary  # the typed record reads it back as written
    # rotation keeps the last checkpoint (save_total_limit 1) and the best one
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    best = load_file(run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors")
    last = load_file(run / "checkpoints" / "checkpoint-5" / "adapter_model.safetensors")
    assert adapter.keys() == best.keys() and all(torch.equal(adapter[k], best[k]) for k in best)
    assert not all(torch.equal(adapter[k], last[k]) for k in last)  # the last step's is another adapter
    # the evaluation after training measures the best model: the loss measured at step 4
    assert summary["eval"]["loss"] == scripted.measured[4]
    assert result.trainer.state.best_model_checkpoint == str(run / "checkpoints" / "checkpoint-4")
    state = json.loads((run / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] == str(run / "checkpoints" / "checkpoint-4")  # where a resume finds it

    # resumed from the best checkpoint, the run stops at step 5 again (the patience count and the best are restored)
    first = summary
    scripted = ScriptedEvalLoss()
    train_stage.run(recipe, log=lambda *_: None, resume=str(run / "checkpoints" / "checkpoint-4"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["early_stopping"] == first["early_stopping"] and summary["eval"] == first["eval"]
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(adapter[k], best[k]) for k in best)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]


@pytest.mark.unit
def test_early_stopping_arguments(tmp_path, write_recipe):
    stop = {"patience": 3, "metric": "accuracy", "min_delta": 0.01}
    recipe = _load(
        write_recipe, {**_plain(tmp_path), "train": {"eval_steps": 5, "save_steps": 5, "early_stopping": stop}}
    )
    args = trainer_stage.training_arguments(resolve(recipe), tmp_path / "s", has_eval=True)
    assert (args.load_best_model_at_end, args.metric_for_best_model, args.greater_is_better) == (
        True,
        "eval_accuracy",
        True,
    )
    recipe = _load(
        write_recipe,
        {**_plain(tmp_path), "train": {"eval_steps": 5, "save_steps": 5, "early_stopping": {"patience": 1}}},
    )
    args = trainer_stage.training_arguments(resolve(recipe), tmp_path / "s", has_eval=True)
    assert (args.metric_for_best_model, args.greater_is_better) == ("eval_loss", False)


def _plain(tmp_path) -> dict:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n')
    return {
        "task": "classification",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": "org/base"},
        "data": {"format": "classification", "train": str(data)},
    }


@pytest.mark.unit
@pytest.mark.parametrize(
    "train,message",
    [
        ({"early_stopping": {"patience": 2}}, "early_stopping needs eval_steps"),
        (
            {"early_stopping": {"patience": 2}, "eval_steps": 5},
            "early_stopping needs save_steps equal to eval_steps (every evaluation's checkpoint may be the best, which adapter/ then holds); got save_steps 500, eval_steps 5: set save_steps: 5",
        ),
        ({"early_stopping": {"patience": 0}, "eval_steps": 5, "save_steps": 5}, "patience"),
        (
            {"early_stopping": {"patience": 1, "metric": "bleu"}, "eval_steps": 5, "save_steps": 5},
            "unknown metric 'bleu'",
        ),
        ({"early_stopping": {"patience": 1, "min_delta": -1}, "eval_steps": 5, "save_steps": 5}, "min_delta"),
        ({"early_stopping": {"patience": 1, "typo": 1}, "eval_steps": 5, "save_steps": 5}, "typo"),
        ({"neftune_alpha": 0}, "neftune_alpha"),
        ({"neftune_alpha": ".inf"}, "neftune_alpha"),
        ({"lora_plus_ratio": -2}, "lora_plus_ratio"),
    ],
)
def test_bad_option_values_are_refused(tmp_path, write_recipe, train, message):
    import yaml

    recipe = {**_plain(tmp_path), "train": train}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False).replace("'.inf'", ".inf"))
    with pytest.raises(UserError) as e:
        load_recipe(path)
    assert any(message in p and "train" in p for p in e.value.problems), e.value.problems
