"""The training entry: recipe -> checked data and model plan -> 4-bit base + LoRA -> Trainer -> run directory.

Reads top to bottom: `run` calls the preflight (preflight.prepare: bad input fails before anything is
written), loads and trains; `fit` owns the run directory.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import torch

from . import checkpoint
from . import data as data_stage
from . import model as model_stage
from .preflight import prepare
from .recipe import Recipe
from .rundir import RunDir, manifest, model_card, now
from .tokens import count_trained, perplexity


@dataclass
class Result:
    run_dir: RunDir
    summary: dict
    model: torch.nn.Module
    trainer: object


def run(recipe: Recipe, log=print, resume: str | bool | None = None, overwrite: bool = False) -> Result:
    prepared = prepare(recipe)  # the preflight: bad input stops here, before anything is written
    tokenizer, bundle = prepared.tokenizer, prepared.bundle
    # a run already in output_dir is continued (--resume) or replaced (--overwrite), never silently
    # overwritten; to resume, the data fingerprint (data, data options, tokenizer) must match and the
    # checkpoint must belong to this recipe (its recipe hash, its adapter's modules and rank)
    start = checkpoint.start(recipe, resume, overwrite, bundle.fingerprint, prepared.plan.targets)
    from transformers import set_seed

    set_seed(recipe.seed)  # adapter init and dropout draw from here
    from .data.stats import stats_lines

    for split in ("train", "eval") if bundle.eval is not None else ("train",):
        log("\n".join(stats_lines(bundle, split, lengths_histogram=False)))
    base = model_stage.load_base(recipe, prepared.plan)
    model = model_stage.add_lora(base, recipe, prepared.plan)
    log(f"trainable params: {prepared.plan.trainable_params:,} of {prepared.plan.total_params:,} ({100 * prepared.plan.trainable_params / prepared.plan.total_params:.2f}%)")
    return fit(recipe, model, tokenizer, bundle, prepared.plan, log, start)


def _peak_memory_mb() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"  # ru_maxrss is KiB on Linux


def _eval_metrics(raw: dict, task: str) -> dict:
    """Trainer's eval dict without the `eval_` prefix and the timing entries."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")
    out = {k.removeprefix("eval_"): v for k, v in raw.items() if not k.removeprefix("eval_").startswith(skip)}
    if task == "causal_lm" and "loss" in out:
        out["perplexity"] = perplexity(out["loss"])
    return out


def _trainer(recipe: Recipe, model, tokenizer, bundle, run_dir: RunDir, log=print):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from .evaluation import classification_metrics
    from .guard import Guard

    guard = Guard(recipe, run_dir.checkpoints, log)

    class CountingTrainer(checkpoint.AtomicSaves, Trainer):
        """Counts the tokens each training step sees and trains on (eval batches are not counted);
        hands each loss to the guard; writes checkpoints atomically; reports a token-weighted eval loss."""

        tokens_seen = 0
        tokens_trained = 0
        counted = ("tokens_seen", "tokens_trained")  # kept in checkpoints, so a resumed run's totals are whole
        eval_loss_sum = 0.0  # summed over the scored tokens (classification: samples) of the evaluation running now
        eval_loss_count = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop("num_real_tokens", None)  # packed rows: see data.packing
            labels = inputs["labels"]
            # causal LM: tokens that are targets (a label is never the target of nothing, so skip column 0)
            targets = count_trained(labels) if labels.dim() > 1 else labels.numel()
            if model.training:
                seen = int(real.sum() if real is not None else inputs["attention_mask"].sum())
                self.tokens_seen += seen
                self.tokens_trained += targets if labels.dim() > 1 else seen
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if not model.training and targets:
                # the batch's loss is its mean over its targets: weigh it by their count, so the eval loss is the
                # mean over every scored token (what `eval` reports), whatever the batching or packing
                self.eval_loss_sum += float((out[0] if return_outputs else out).detach().float()) * targets
                self.eval_loss_count += targets
            return out

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
            """Trainer's loop reports the mean of per-batch mean losses; replace it with the token-weighted mean
            before `evaluate` logs it (metrics.jsonl, summary.json and `eval` then agree)."""
            self.eval_loss_sum, self.eval_loss_count = 0.0, 0
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
            if self.eval_loss_count:
                output.metrics[f"{metric_key_prefix}_loss"] = self.eval_loss_sum / self.eval_loss_count
            return output

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            guard.check_loss(loss)
            return loss

    class RunLog(TrainerCallback):
        """metrics.jsonl gets every log and eval; the last step always writes a checkpoint."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            run_dir.log({"step": state.global_step, "epoch": state.epoch, **(logs or {})})

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = True

    t, has_eval = recipe.train, bool(bundle.eval)
    dtype = model_stage.compute_dtype(recipe.quant)
    args = TrainingArguments(
        output_dir=str(run_dir.checkpoints),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        warmup_steps=t.warmup,
        lr_scheduler_type=t.scheduler,
        weight_decay=t.weight_decay,
        optim=t.optimizer,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if has_eval and t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=recipe.seed,
        data_seed=recipe.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        report_to="none",
        label_names=["labels"],  # peft's forward(*args, **kwargs) hides them from Trainer's signature check
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    classification = recipe.task == "classification"
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=bundle.train,
        eval_dataset=bundle.eval or None,
        data_collator=data_stage.collator(recipe, tokenizer),
        processing_class=tokenizer,
        compute_metrics=classification_metrics() if classification else None,
        callbacks=[RunLog(), guard],
    )
    trainer.guard = guard
    trainer.recipe_identity = checkpoint.identity(recipe.saved_dict())  # saved with each checkpoint, checked on resume
    return trainer


def fit(recipe: Recipe, model, tokenizer, bundle: data_stage.DataBundle, plan: model_stage.ModelPlan, log=print, start: checkpoint.Start | None = None) -> Result:
    from .guard import out_of_memory

    started = time.perf_counter()
    run_dir = RunDir(recipe.output_dir)
    resume_from = start.resume_from if start else None
    if resume_from:
        info = checkpoint.reopen(run_dir, resume_from, recipe.saved_dict())
        log(f"resuming from {resume_from}")
    else:
        if start and start.replace:
            run_dir.remove_run()  # --overwrite, and only now that the new run is ready to go; the user's own files stay
        info = manifest(recipe.seed, bundle.fingerprint, bundle.stats, f"{plan.source.path} ({plan.source.origin})")
        run_dir.create(recipe.saved_dict(), info)
    log(f"run directory: {run_dir.root}")
    trainer = _trainer(recipe, model, tokenizer, bundle, run_dir, log)

    before = None
    if bundle.eval and recipe.train.eval_before:
        # a resumed run reads the untrained model's eval from the log its first part wrote
        logged = checkpoint.logged_eval_before(run_dir) if resume_from else trainer.evaluate()
        before = _eval_metrics({k: v for k, v in (logged or {}).items() if k.startswith("eval_")}, recipe.task) or None
    if resume_from:
        checkpoint.restore_counts(trainer, resume_from)
    seen_before, train_start = trainer.tokens_seen, time.perf_counter()
    with trainer.guard.signals(), out_of_memory(recipe, trainer, run_dir.checkpoints):
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stopped := trainer.guard.interrupted(trainer.state):
        raise stopped  # the checkpoint is saved; the adapter/ and summary come when the run completes
    train_time = time.perf_counter() - train_start
    after = _eval_metrics(trainer.evaluate(), recipe.task) if bundle.eval else None

    run_dir.drop_derived()  # eval.md, export/ and summary `evaluation` describe the adapter being replaced
    # lora_sft never resizes or adapts an embedding: saying so spares peft's "auto" check, which looks the base
    # up on the hub (a request, or a warning offline) on every save
    model.save_pretrained(run_dir.adapter, save_embedding_layers=False)
    tokenizer.save_pretrained(run_dir.adapter)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak, peak_kind = _peak_memory_mb()
    summary = {
        "train_loss": losses[-1] if losses else output.training_loss,
        "train_loss_mean": output.training_loss,
        "eval_loss": after.get("loss") if after else None,
        "eval": after,
        "eval_before": before,
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "tokens_seen": trainer.tokens_seen,
        "tokens_trained": trainer.tokens_trained,
        "tokens_per_second": (trainer.tokens_seen - seen_before) / train_time,
        "skipped_steps": trainer.guard.skipped,
        "trainable_params": plan.trainable_params,
        "total_params": plan.total_params,
        "peak_memory_mb": round(peak, 1),
        "peak_memory_kind": peak_kind,
        "train_time_s": round(train_time, 2),
        "wall_time_s": round(time.perf_counter() - started, 2),
    }
    resolved = recipe.saved_dict()
    (run_dir.adapter / "README.md").write_text(model_card(resolved, recipe.model.path, bundle.stats, summary, bundle.labels))
    info["ended"] = now()
    run_dir.finish(info, summary)
    for name, metrics in (("before", before), ("after", after)):
        if metrics:
            log(f"eval {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    log(f"run directory: {run_dir.root}")
    return Result(run_dir, summary, model, trainer)
