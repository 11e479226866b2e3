"""`train.training_arguments`: the recipe's values land in the right TrainingArguments fields; and the Trainer
subclass and the callbacks use public Trainer hooks only (no override of a method whose name starts with `_`)."""

from __future__ import annotations

import inspect
from dataclasses import replace

import pytest
import torch
from transformers import Trainer, TrainerCallback

from lora_sft.recipe.load import load_recipe
from lora_sft.run import checkpoint, guard
from lora_sft.run import trainer as trainer_stage
from lora_sft.settings import resolve

pytestmark = pytest.mark.unit


def _recipe(tmp_path, write_recipe, **train):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    path = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": str(tmp_path / "run"),
            "model": {"path": "org/base"},
            "seed": 7,
            "data": {"format": "alpaca", "train": str(data)},
            "train": {
                "micro_batch_size": 3,
                "grad_accum": 5,
                "lr": 2e-4,
                "warmup": 11,
                "scheduler": "linear",
                "optimizer": "adamw_torch",
                "weight_decay": 0.01,
                "max_grad_norm": 0.5,
                "logging_steps": 2,
                "save_steps": 9,
                "save_total_limit": 4,
                "max_steps": 40,
                "eval_steps": 6,
                **train,
            },
        }
    )
    return load_recipe(path)


def test_the_recipe_lands_in_the_right_fields(tmp_path, write_recipe):
    recipe = _recipe(tmp_path, write_recipe)
    args = trainer_stage.training_arguments(resolve(recipe), tmp_path / "staging", has_eval=True)
    assert args.output_dir == str(tmp_path / "staging")
    assert (args.per_device_train_batch_size, args.per_device_eval_batch_size, args.gradient_accumulation_steps) == (
        3,
        3,
        5,
    )
    assert (args.learning_rate, args.warmup_steps, args.lr_scheduler_type.value, args.optim.value) == (
        2e-4,
        11,
        "linear",
        "adamw_torch",
    )
    assert (args.weight_decay, args.max_grad_norm, args.logging_steps, args.max_steps) == (0.01, 0.5, 2, 40)
    assert (args.save_strategy.value, args.save_steps, args.eval_strategy.value, args.eval_steps) == (
        "steps",
        9,
        "steps",
        6,
    )
    assert (args.seed, args.data_seed) == (7, 7)
    # rotation is AtomicCheckpoints' (it counts only complete checkpoints): Trainer's own limit stays unset
    assert args.save_total_limit is None
    assert args.report_to == []  # report_to="none": no tracker integration
    assert args.label_names == ["labels"] and args.remove_unused_columns is False
    # compute dtype: fp32 on this CPU machine (auto), so neither mixed-precision flag
    assert (args.bf16, args.fp16) == (False, False)


def test_no_eval_split_means_no_eval_strategy_and_compute_dtype_picks_the_precision(
    tmp_path, write_recipe, monkeypatch
):
    recipe = _recipe(tmp_path, write_recipe, max_steps=None, epochs=2)
    args = trainer_stage.training_arguments(resolve(recipe), tmp_path / "s", has_eval=False)
    assert args.eval_strategy.value == "no" and args.max_steps == -1 and args.num_train_epochs == 2
    for dtype, flags in ((torch.bfloat16, (True, False)), (torch.float16, (False, True))):
        try:
            args = trainer_stage.training_arguments(
                replace(resolve(recipe), dtype=dtype), tmp_path / "s", has_eval=False
            )
        except (
            ValueError
        ):  # this transformers refuses bf16/fp16 without a device that runs it: the mapping is what we test
            continue
        assert (args.bf16, args.fp16) == flags


def test_trainer_and_callbacks_override_no_private_trainer_method():
    """A private Trainer method can change in any transformers release; lora_sft overrides none."""
    private = {name for name, _ in inspect.getmembers(Trainer) if name.startswith("_") and not name.startswith("__")}
    assert not (set(vars(trainer_stage.CountingTrainer)) & private)
    callbacks = (
        trainer_stage.RunLog,
        trainer_stage.SaveLastStep,
        trainer_stage.SeedLengthGroups,
        guard.Guard,
        checkpoint.AtomicCheckpoints,
    )
    hooks = {name for name, _ in inspect.getmembers(TrainerCallback) if name.startswith("on_")}
    for cls in callbacks:
        assert issubclass(cls, TrainerCallback)
        overridden = {n for n in vars(cls) if n.startswith("on_")}
        assert overridden <= hooks, (cls, overridden - hooks)  # a misspelt hook would never be called


def test_the_training_options_land_in_the_right_fields(tmp_path, write_recipe):
    """NEFTune is Trainer's neftune_noise_alpha; early stopping turns on load_best_model_at_end with its metric and
    direction; by default none of them is on (LoRA+ is an optimizer, not an argument: tests/test_train_options.py)."""
    args = trainer_stage.training_arguments(resolve(_recipe(tmp_path, write_recipe)), tmp_path / "s", has_eval=True)
    assert (args.neftune_noise_alpha, args.load_best_model_at_end, args.metric_for_best_model) == (None, False, None)
    assert args.restore_callback_states_from_checkpoint is False
    recipe = _recipe(
        tmp_path,
        write_recipe,
        neftune_alpha=5,
        lora_plus_ratio=16,
        save_steps=6,
        early_stopping={"patience": 2, "min_delta": 0.1},
    )
    args = trainer_stage.training_arguments(resolve(recipe), tmp_path / "s", has_eval=True)
    assert args.neftune_noise_alpha == 5.0
    assert (args.load_best_model_at_end, args.metric_for_best_model, args.greater_is_better) == (
        True,
        "eval_loss",
        False,
    )
    assert args.restore_callback_states_from_checkpoint is True  # a resume continues the patience count
    assert (args.save_steps, args.eval_steps, args.learning_rate, args.optim.value) == (6, 6, 2e-4, "adamw_torch")
