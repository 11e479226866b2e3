"""The train section: optimizer, schedule, steps, memory budget, early stopping, trackers, distributed mode."""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from lora_sft.recipe.sections import Float, Section


class EarlyStopping(Section):
    patience: int = Field(ge=1)
    """Stop after this many evaluations in a row that do not improve `metric` by more than min_delta."""
    metric: str = "eval_loss"
    """The eval metric watched: eval_loss (lower is better), or for classification eval_accuracy or eval_f1 (higher is better); the `eval_` prefix is optional."""
    min_delta: Float = Field(0.0, ge=0)
    """Smallest change of `metric` that counts as an improvement."""

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        name = metric.removeprefix("eval_")
        if name not in METRIC_HIGHER_IS_BETTER:
            known = ", ".join(f"eval_{m}" for m in METRIC_HIGHER_IS_BETTER)
            raise ValueError(f"unknown metric {metric!r}; use one of {known}")
        return f"eval_{name}"

    def greater_is_better(self) -> bool:
        return METRIC_HIGHER_IS_BETTER[self.metric.removeprefix("eval_")]


# The eval metrics early stopping can watch, and their direction (accuracy and f1 come with classification).
METRIC_HIGHER_IS_BETTER = {"loss": False, "accuracy": True, "f1": True}


# An amount of memory as train.memory_budget takes it: a number and a unit (decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB).
MEMORY_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)")
MEMORY_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KiB": 2**10,
    "MiB": 2**20,
    "GiB": 2**30,
    "TiB": 2**40,
}


# train.report_to: the experiment trackers lora_sft passes to the Trainer (each an extra of its own: lora-sft[wandb])
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


# train.optimizer values that are bitsandbytes optimizers (8-bit states or paged memory)
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def memory_bytes(text: str) -> int:
    """`8GiB` -> 8589934592: a memory_budget other than auto, in bytes (the validator accepted its form)."""
    m = MEMORY_SIZE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not an amount of memory: {text!r}")
    return int(float(m["number"]) * MEMORY_UNITS[m["unit"]])


# The learning rate no parameter may get: train.lr stays below it, and so does what LoRA+ gives the B matrices.
MAX_LR = 1.0


class TrainSection(Section):
    lr: Float = Field(2e-4, gt=0, lt=MAX_LR)
    """Peak learning rate."""
    epochs: Float = Field(1.0, gt=0)
    """Passes over the train split (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps."""
    micro_batch_size: int = Field(4, ge=1)
    """Samples per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro batches per optimizer step: effective batch = micro_batch_size * grad_accum."""
    warmup: Float = Field(0.03, ge=0)
    """Learning-rate warmup: a fraction of all steps when < 1, else a number of steps."""
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"] = (
        "cosine"
    )
    """Learning-rate schedule after warmup."""
    weight_decay: Float = Field(0.0, ge=0)
    """Decoupled weight decay on the adapter parameters."""
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor", "sgd"
    ] = "adamw_torch"
    """Optimizer; the 8-bit and paged ones come from bitsandbytes, paged ones need CUDA."""
    max_grad_norm: Float = Field(1.0, ge=0)
    """Gradient clipping norm (0 turns clipping off)."""
    gradient_checkpointing: Literal["auto"] | bool = "auto"
    """Recompute activations in the backward pass: much less memory, about a third slower. `auto`: on only when the memory planner says the run would not fit without it (in memory_budget, or else the device's available memory)."""
    memory_budget: str | None = None
    """Memory the run may use on its device, e.g. `8GiB`, `12GB`, `6000MiB`, or `auto` (the device's free memory): lora_sft then picks the largest micro batch that fits (a divisor of the effective batch, which grad_accum keeps) and gradient checkpointing on or off (with `auto`), says what it picked, and refuses a run that cannot fit before loading anything. None: the recipe's micro_batch_size as written."""
    logging_steps: int = Field(10, ge=1)
    """Log loss and learning rate every N optimizer steps (to the console and metrics.jsonl)."""
    eval_steps: int | None = Field(None, ge=1)
    """Also evaluate every N steps and at the last step (that evaluation is also the one after training); by default only before and after training."""
    eval_before: bool = True
    """Measure the untrained base on the eval split first (summary.json `eval_before`)."""
    save_steps: int = Field(500, ge=1)
    """Write a checkpoint every N steps, and at the end."""
    save_total_limit: int = Field(2, ge=1)
    """Checkpoints kept in checkpoints/."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN or infinite loss or gradient: `stop` the run before the optimizer step (the last checkpoint stays good), or `skip` that step's update and go on."""
    neftune_alpha: Float | None = Field(None, gt=0)
    """NEFTune: add uniform noise of scale alpha / sqrt(sequence length * hidden size) to the input embeddings while training (never in evaluation or generation); 5 is the paper's usual value."""
    lora_plus_ratio: Float | None = Field(None, gt=0)
    """LoRA+: the B matrices learn at lora_plus_ratio * lr, the A matrices at lr (the paper suggests 16); works with every optimizer."""
    early_stopping: EarlyStopping | None = None
    """{patience, metric, min_delta}: stop when the eval metric stops improving; needs eval_steps, an eval split and save_steps equal to eval_steps; adapter/ then holds the best checkpoint (summary.json `early_stopping`)."""
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Several processes (torchrun, accelerate launch): `ddp` gives every GPU the whole 4-bit model and splits the batches; `fsdp` (FSDP-QLoRA, for a model that does not fit one GPU) also splits the model, its LoRA weights, gradients and optimizer states among the GPUs, stores the 4-bit weights in the compute dtype (bnb_4bit_quant_storage, so FSDP can shard them) and wraps each decoder layer; `auto`: what the launcher says (FSDP under an accelerate FSDP config, else DDP). One process alone trains as usual."""

    report_to: list[str] = []  # noqa: RUF012  (a pydantic field, copied per instance; ruff cannot see Section is one)
    """Experiment trackers that also get the run's metrics, with the run's name (its output_dir folder's name) and the recipe as the run's config (keys `recipe.lora.rank`, ...): any of tensorboard (event files in RUN_DIR/tensorboard), wandb, mlflow, trackio; each needs its package, `pip install "lora-sft[wandb]"`. metrics.jsonl and loss.png are written either way."""

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # `report_to: wandb`, as TrainingArguments takes it

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        for name in names:
            if name not in TRACKERS:
                close = difflib.get_close_matches(name, TRACKERS, n=1, cutoff=0.6)
                hint = f"did you mean '{close[0]}'? " if close else "report_to: [] for none; " if name == "none" else ""
                raise ValueError(f"unknown tracker {name!r} ({hint}lora_sft reports to {', '.join(TRACKERS)})")
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{twice} is listed twice; list each tracker once")
        return names

    @field_validator("lora_plus_ratio")
    @classmethod
    def _lora_plus_lr_below_the_bound(cls, ratio: float | None, info: ValidationInfo) -> float | None:
        lr = info.data.get("lr")  # absent when lr itself was refused (that error says why)
        if ratio is not None and lr is not None and ratio * lr >= MAX_LR:
            raise ValueError(
                f"gives the B matrices a learning rate of {ratio * lr:g} (lr {lr:g} * {ratio:g}), at or above {MAX_LR:g}, which train.lr may not reach either; "
                f"lower it below {MAX_LR / lr:g} (the paper suggests 16) or lower train.lr"
            )
        return ratio

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _memory_budget_readable(cls, value: Any) -> Any:
        if value is None or value == "auto":
            return value
        if isinstance(value, str) and MEMORY_SIZE.fullmatch(value.strip()):
            if memory_bytes(value) <= 0:
                raise ValueError(f"{value!r} is no memory at all; give the memory the run may use, e.g. 8GiB, or auto")
            return value.strip()
        raise ValueError(
            f"cannot read {value!r} as an amount of memory; write auto (the device's free memory) or a number with a unit: 8GiB, 12GB, 6000MiB (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
        )

    @model_validator(mode="after")
    def _early_stopping_needs_evaluations(self) -> TrainSection:
        if self.early_stopping is None:
            return self
        if self.eval_steps is None:
            raise ValueError(
                "early_stopping needs eval_steps (it watches the evaluations every eval_steps); set eval_steps, e.g. eval_steps: 50"
            )
        if self.save_steps != self.eval_steps:
            raise ValueError(
                f"early_stopping needs save_steps equal to eval_steps (every evaluation's checkpoint may be the best, which adapter/ then holds); got save_steps {self.save_steps}, eval_steps {self.eval_steps}: set save_steps: {self.eval_steps}"
            )
        return self

    @model_validator(mode="after")
    def _fsdp_takes_torch_optimizers(self) -> TrainSection:
        if self.distributed == "fsdp" and self.optimizer in BNB_OPTIMIZERS:
            raise ValueError(
                f"distributed fsdp cannot use {self.optimizer}: bitsandbytes' 8-bit and paged optimizers are not made for FSDP's sharded parameters (peft's FSDP guide: paged_adamw_8bit fails when a checkpoint is saved), and FSDP already divides the optimizer states among the GPUs; set train.optimizer: adamw_torch"
            )
        return self
