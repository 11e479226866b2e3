"""The training loop and the evaluations around it, under the guards: the evaluation before training (or what a
resumed run's first part logged), `train` (Trainer's loop, resumed from a checkpoint with its counts and stream
position), the evaluation after, and the summary of what was measured (summary.json's record)."""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.trainer_utils import TrainOutput

from lora_sft import distributed
from lora_sft.data import stream
from lora_sft.model.plan import ModelPlan
from lora_sft.run import checkpoint, progress
from lora_sft.run.guard import guarded
from lora_sft.run.records import EarlyStopped, Summary
from lora_sft.run.rundir import RunDir
from lora_sft.run.trainer import CountingTrainer, eval_metrics
from lora_sft.settings import RunSettings


def evaluate_before(
    settings: RunSettings, trainer: CountingTrainer, run_dir: RunDir, resume_from: Path | None
) -> dict | None:
    """The untrained model on the eval split (train.eval_before); a resumed run reads what its first part logged."""
    if not trainer.eval_dataset or not settings.train.eval_before:
        return None
    if resume_from:
        logged = run_dir.logged_eval_before()
    elif distributed.world().distributed:
        # Under a launcher an evaluation before train() prepares the model for evaluation only, and Trainer then
        # trains it without wrapping it for DDP: every process alone, no gradient sync (transformers 5.24). Trainer's
        # own eval_on_start evaluates inside train(), after wrapping; `evaluated_on_start` reads it afterwards.
        trainer.args.eval_on_start = True
        return None
    else:
        with guarded(settings, trainer, "the evaluation before training"):
            logged = trainer.evaluate()
    return eval_metrics({k: v for k, v in (logged or {}).items() if k.startswith("eval_")}, settings.task) or None


def evaluated_on_start(settings: RunSettings, trainer: CountingTrainer) -> dict | None:
    """The evaluation before training that Trainer ran at the start of train() (eval_on_start, under a launcher)."""
    if not trainer.args.eval_on_start:
        return None
    first = next((h for h in trainer.state.log_history if "eval_loss" in h), None)
    return eval_metrics({k: v for k, v in first.items() if k.startswith("eval_")}, settings.task) if first else None


def train(settings: RunSettings, trainer: CountingTrainer, resume_from: Path | None, unreadable: tuple[str, ...] = ()):
    """The training loop under its guards. Returns Trainer's output, the tokens seen before it, its seconds.
    `unreadable`: files of the checkpoint that --allow-inexact resumes without (`checkpoint.readable`)."""
    with checkpoint.readable(resume_from, unreadable) if resume_from else nullcontext(None) as folder:
        if folder:
            checkpoint.restore_counts(trainer, folder)
            if isinstance(trainer.train_dataset, stream.StreamDataset) and (folder / checkpoint.STREAM).is_file():
                # data.streaming: where its steps ended (without it, allowed by --allow-inexact, from the start)
                trainer.train_dataset.restore(checkpoint.read_extra(folder, "stream"))
            trainer.callback_handler.callbacks.insert(0, checkpoint.StopAtTheEnd())  # before any other callback
        seen_before, train_start = trainer.tokens_seen, time.perf_counter()
        saves = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, checkpoint.AtomicCheckpoints))
        with guarded(settings, trainer), checkpoint.save_errors(saves), warnings.catch_warnings():
            # Trainer saves checkpoints with peft's save_embedding_layers "auto": for a hub base it looks config.json
            # up to see if the vocabulary grew, and warns offline; added tokens' rows are saved either way
            warnings.filterwarnings("ignore", message="Unable to fetch remote file", category=UserWarning)
            warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
            try:
                output = trainer.train(resume_from_checkpoint=str(folder) if folder else None)
            except checkpoint.NothingLeft:  # resumed at its last step: restored, nothing to train
                trainer.is_in_train = False
                distributed.on_main(saves.discard_staging)  # the staging folder Trainer made for saves to come
                output = TrainOutput(trainer.state.global_step, 0.0, {})
    if stopped := trainer.guard.interrupted(trainer.state):
        raise stopped  # the checkpoint is saved; the adapter/ and summary come when the run completes
    if resume_from:  # Trainer's mean is of the steps this call trained: the run's is in the log it restored
        output = output._replace(training_loss=loss_mean(trainer.state.log_history, output.training_loss))
    return output, seen_before, time.perf_counter() - train_start


def loss_mean(log_history: list[dict], otherwise: float) -> float:
    """The mean train loss over every step of the run: each logged loss (the mean of its logging window) weighted by
    the steps in its window; `otherwise` when nothing was logged."""
    total, last = 0.0, 0
    for record in log_history:
        if "loss" in record and isinstance(record.get("step"), int) and record["step"] > last:
            total += record["loss"] * (record["step"] - last)
            last = record["step"]
    return total / last if last else otherwise


def evaluate_after(settings: RunSettings, trainer: CountingTrainer) -> dict | None:
    """The trained model on the eval split (what summary.json `eval` reports): the evaluation Trainer ran at the
    last step when there was one (with train.eval_steps Trainer evaluates there) and the model is still the one it
    scored, else a new one."""
    if not trainer.eval_dataset:
        return None
    if (last := _evaluated_at_the_end(trainer)) is not None:
        return eval_metrics(last, settings.task)
    with guarded(settings, trainer, "the evaluation after training"):
        return eval_metrics(trainer.evaluate(), settings.task)


def _evaluated_at_the_end(trainer: CountingTrainer) -> dict | None:
    """Trainer's record of an evaluation at the last step, or None (none there, or early stopping loaded the best
    checkpoint since)."""
    if trainer.args.load_best_model_at_end:
        return None
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if not evals or evals[-1].get("step") != trainer.state.global_step:
        return None
    return {k: v for k, v in evals[-1].items() if k != "step"}


@dataclass(frozen=True)
class Measured:
    """What `fit` measured around the training loop, for the summary."""

    output: Any  # Trainer.train's TrainOutput
    before: dict | None  # the evaluation before training
    after: dict | None  # the evaluation after training
    seen_before: int  # tokens a resumed checkpoint had seen
    train_time: float  # seconds in the training loop
    started: float  # perf_counter when `fit` began


def summarize(trainer: CountingTrainer, plan: ModelPlan, measured: Measured) -> Summary:
    m = measured
    output, before, after, train_time = m.output, m.before, m.after, m.train_time
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak, peak_kind = progress.peak_memory_mb()  # this process's (the main process's under a launcher)
    # each process counts the tokens of its own batches (the main one also what a resumed checkpoint counted)
    seen, trained, seen_before = (
        distributed.total(n) for n in (trainer.tokens_seen, trainer.tokens_trained, m.seen_before)
    )
    args = trainer.args
    return Summary(
        train_loss=losses[-1] if losses else output.training_loss,
        train_loss_mean=output.training_loss,
        eval_loss=after.get("loss") if after else None,
        eval=after,
        eval_before=before,
        steps=trainer.state.global_step,
        epochs=trainer.state.epoch,
        tokens_seen=seen,
        tokens_trained=trained,
        tokens_per_second=(seen - seen_before) / train_time,
        skipped_steps=trainer.guard.skipped,
        trainable_params=plan.trainable_params,
        total_params=plan.total_params,
        peak_memory_mb=round(peak, 1),
        peak_memory_kind=peak_kind,
        train_time_s=round(train_time, 2),
        wall_time_s=round(time.perf_counter() - m.started, 2),
        world_size=args.world_size,
        global_batch=args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        early_stopping=early_stopped(trainer),
    )


def early_stopped(trainer: CountingTrainer) -> EarlyStopped | None:
    """With train.early_stopping: the best evaluation, whose checkpoint Trainer loaded at the end (so adapter/
    holds it), and the step training stopped at when the metric stopped improving."""
    state, metric = trainer.state, trainer.args.metric_for_best_model
    if not trainer.args.load_best_model_at_end or metric is None:
        return None
    best = Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None
    return EarlyStopped(
        metric=metric,
        best_step=state.best_global_step or None,
        best_metric=state.best_metric,
        stopped_at=state.global_step if state.global_step < state.max_steps else None,
        adapter=f"{best} (the best)" if best else "the last step (no evaluation was saved as a checkpoint)",
    )
