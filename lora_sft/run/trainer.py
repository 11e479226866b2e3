"""The Trainer lora_sft trains with: transformers' Trainer with the run's settings as its arguments, a loss that
counts the tokens it trains, and one callback per job (the log, the last-step save, the guard, the seeds, the
atomic checkpoints, the progress lines, the trackers). Public Trainer hooks only (`compute_loss`,
`evaluation_loop`, `training_step`, callbacks); what reaches into Trainer's internals goes through `lora_sft.compat`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import (
    EarlyStoppingCallback,
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from lora_sft import compat, distributed
from lora_sft.data import LENGTH, DataBundle, collator, stream
from lora_sft.model import loss as loss_stage
from lora_sft.run import checkpoint, plots, progress, trackers
from lora_sft.run.guard import Guard
from lora_sft.run.rundir import RunDir
from lora_sft.settings import RunSettings
from lora_sft.tokens import count_trained, perplexity


def training_arguments(settings: RunSettings, output_dir: str | Path, has_eval: bool) -> TrainingArguments:
    """The settings' `train` section (and seed, compute dtype, sampler, processes) as Trainer's arguments.

    `output_dir` is where Trainer writes a checkpoint: the staging folder, from which `AtomicCheckpoints`
    moves it into place. Rotation is `AtomicCheckpoints`' too (it keeps train.save_total_limit complete
    checkpoints), so Trainer's own save_total_limit stays unset."""
    t = settings.train
    stop = t.early_stopping
    dtype = settings.dtype
    return TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,  # effective batch = micro_batch_size * grad_accum
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
        # causal LM: evaluation needs the loss only (no compute_metrics), so no full-vocabulary logits are gathered;
        # classification keeps its logits for accuracy and F1
        prediction_loss_only=settings.task == "causal_lm",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        seed=settings.seed,
        data_seed=settings.seed,
        # data.group_by_length: Trainer's LengthGroupedSampler, lengths from the data stage's column (`SeedLengthGroups`)
        **compat.train_sampling(settings.grouped),
        length_column_name=LENGTH,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        report_to=list(t.report_to) or "none",  # train.report_to: transformers' integrations (`trackers`)
        run_name=RunDir(settings.output_dir).name,
        label_names=["labels"],  # peft's forward(*args, **kwargs) hides them from Trainer's signature check
        remove_unused_columns=False,  # the collator needs every column the data stage made
        dataloader_num_workers=0,
        # data.streaming: the stream restores its own position from the checkpoint (`stream`), so Trainer must not
        # skip the trained batches again by iterating them
        ignore_data_skip=settings.data.streaming,
        dataloader_pin_memory=torch.cuda.is_available(),
        neftune_noise_alpha=t.neftune_alpha,  # Trainer's hook on the input embeddings, active in train mode only
        # early stopping: Trainer tracks the best evaluation and loads its checkpoint when training ends
        load_best_model_at_end=stop is not None,
        metric_for_best_model=stop.metric if stop else None,
        greater_is_better=stop.greater_is_better() if stop else None,
        # a resumed run continues the patience count where its checkpoint left it (EarlyStoppingCallback's state)
        restore_callback_states_from_checkpoint=stop is not None,
        **distributed.trainer_arguments(),  # several processes under a launcher (DDP; on CPU: gloo)
        **distributed.fsdp_arguments(
            settings.fsdp
        ),  # train.distributed fsdp under a launcher: FSDP2 with each layer sharded
    )


class CountingTrainer(Trainer):
    """Counts the tokens each training step sees and trains on (eval batches are not counted); hands each loss
    to the guard; reports a token-weighted eval loss. Public Trainer methods only."""

    counted = ("tokens_seen", "tokens_trained")  # kept in checkpoints, so a resumed run's totals are whole

    def __init__(self, *args, guard: Guard, **kwargs):
        super().__init__(*args, **kwargs)
        self.guard = guard
        self.tokens_seen = 0
        self.tokens_trained = 0
        self.eval_loss_sum = (
            0.0  # summed over the scored tokens (classification: samples) of the evaluation running now
        )
        self.eval_loss_count = 0
        # causal LM evaluation: [targets the argmax got right, targets scored] on the chunked path (token accuracy,
        # what `eval` reports too); the plain path does not count, and then no accuracy is reported
        self.eval_correct = [0, 0]

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in self.counted}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        real = inputs.pop("num_real_tokens", None)  # packed rows: see data.packing
        labels = inputs["labels"]
        # causal LM: tokens that are targets (a label is never the target of nothing, so skip column 0)
        targets = count_trained(labels) if labels.dim() > 1 else labels.numel()
        if model.training:
            seen = int(real.sum() if real is not None else inputs["attention_mask"].sum())
            self.tokens_seen += seen
            self.tokens_trained += targets if labels.dim() > 1 else seen
        # causal LM: logits only at trained targets (lora_sft.model.loss), normalized and scaled as Trainer's compute_loss
        # does a model's own loss (transformers 5.24); Trainer's compute_loss for the rest: classification, label
        # smoothing or a custom loss function, an evaluation that keeps logits, a model loss.plain_path_reason refuses
        if (
            labels.dim() > 1
            and not compat.smooths_labels(self)
            and self.compute_loss_func is None
            and (self.args.prediction_loss_only or not return_outputs)
            and loss_stage.plain_path_reason(model) is None
        ):
            with self.accelerator.autocast():  # the model's forward runs under it (mixed precision): so does this
                loss = loss_stage.causal_lm_loss(
                    model,
                    inputs,
                    num_items_in_batch if compat.passes_num_items(self) else None,
                    tally=None if model.training else self.eval_correct,
                )
            if (
                self.args.average_tokens_across_devices
                and compat.passes_num_items(self)
                and num_items_in_batch is not None
            ):
                loss = loss * compat.devices_scale(self)
            out = (loss, {"loss": loss}) if return_outputs else loss
        else:
            out = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        if not model.training and targets:
            # the batch's loss is its mean over its targets: weigh it by their count, so the eval loss is the
            # mean over every scored token (what `eval` reports), whatever the batching or packing
            loss = out[0] if isinstance(out, tuple) else out
            self.eval_loss_sum += self._summed(float(loss.detach().float()), targets, num_items_in_batch)
            self.eval_loss_count += targets
        return out

    def _summed(self, loss: float, targets: int, num_items_in_batch) -> float:
        """The summed loss of this process's batch from the loss compute_loss returned. Trainer's evaluation passes
        num_items_in_batch, the targets of every process's batch, so a model that takes it returns its sum over them,
        times the number of processes under average_tokens_across_devices (transformers 5.24's compute_loss);
        otherwise the loss is the mean over this batch's targets."""
        if num_items_in_batch is None or not (compat.passes_num_items(self) or self.compute_loss_func):
            return loss * targets
        scale = compat.devices_scale(self) if self.args.average_tokens_across_devices else 1
        return loss * float(num_items_in_batch) / scale

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        """Trainer's loop reports the mean of per-batch mean losses; replace it with the token-weighted mean
        before `evaluate` logs it (metrics.jsonl, summary.json and `eval` then agree)."""
        self.eval_loss_sum, self.eval_loss_count, self.eval_correct = 0.0, 0, [0, 0]
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        # under a launcher each process scored its share of the eval split: the mean is over all of them
        loss_sum, count = distributed.total(self.eval_loss_sum), distributed.total(self.eval_loss_count)
        if count and output.metrics is not None:
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / count
            correct, scored = distributed.total(self.eval_correct[0]), distributed.total(self.eval_correct[1])
            if scored == count:  # every scored token counted (the chunked path throughout)
                output.metrics[f"{metric_key_prefix}_token_accuracy"] = correct / scored
        return output

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.check_loss(loss)
        return loss


class RunLog(TrainerCallback):
    """metrics.jsonl gets every log and eval record."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.run_dir.log({"step": state.global_step, "epoch": state.epoch, **(logs or {})})


class RankSeeds(TrainerCallback):
    """Each rank's dropout (and NEFTune noise) from a seed of its own: `seed + rank`, set when training starts.

    What must be equal on every rank is seeded before this: the adapter's initial weights (`set_seed(settings.seed)`
    before the model is built; DDP broadcasts rank 0's anyway) and the data order (Trainer's sampler draws from
    its own generator seeded with `data_seed`, not from the global RNG). Dropout masks must differ instead: with
    one seed every rank would drop the same units of its own rows. A resumed run restores each rank's RNG state
    from its checkpoint (`rng_state_{rank}.pth`) after this, so it continues each rank's stream exactly. One
    process alone is left as it was (Trainer seeds it with `seed`)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            from transformers import set_seed

            set_seed(args.seed + args.process_index)  # python, numpy, torch (and CUDA)


class SeedLengthGroups(TrainerCallback):
    """data.group_by_length: Trainer's LengthGroupedSampler shuffles with the global torch RNG, which a run resumed
    mid-epoch cannot replay (dropout has drawn from it since), and Trainer offers no hook to seed it. At each epoch's
    start give the sampler a generator seeded by (seed, epoch), as accelerate's seedable sampler does for the plain
    shuffle, so a resumed run draws the same order; and its lengths as a list (a `datasets` column read one row at
    a time is slow)."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        sampler = compat.length_grouped_sampler(train_dataloader)
        if sampler is None:
            raise RuntimeError("data.group_by_length: Trainer's train dataloader has no LengthGroupedSampler")
        compat.group_lengths(
            sampler,
            # groups as long as the global batch (Trainer gives the sampler one rank's share): N processes at micro
            # batch b see each step the samples one process sees at micro batch N x b, whatever the number of processes
            batch_size=args.train_batch_size * args.gradient_accumulation_steps * args.world_size,
            # whole epochs done: a run resumed mid-epoch draws its epoch's order again, then skips the trained batches
            generator=torch.Generator().manual_seed(args.data_seed + int(state.epoch)),
        )


class SaveLastStep(TrainerCallback):
    """The last step always writes a checkpoint (what --resume continues, whatever save_steps is)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True


def build_trainer(
    settings: RunSettings, model, tokenizer, bundle: DataBundle, run_dir: RunDir, log=print
) -> CountingTrainer:
    """The Trainer with its callbacks, in the order they act at a step's end: the log, the last-step save,
    the guard (a signal asks for a save), then `AtomicCheckpoints`, which sees every request to save. What is
    printed while it trains is `progress.Progress`'s (a bar when printing to a terminal, else plain lines)."""
    from lora_sft.run.metrics import classification_metrics

    guard = Guard(settings, run_dir.checkpoints, log)
    args = training_arguments(settings, checkpoint.staging(run_dir.checkpoints), has_eval=bool(bundle.eval))
    callbacks: list[TrainerCallback] = [RunLog(run_dir), plots.LossPlot(run_dir), SaveLastStep(), guard, RankSeeds()]
    if settings.grouped:
        callbacks.append(SeedLengthGroups())
    if settings.data.streaming:
        callbacks.append(stream.LoaderSeed())  # a resumed stream draws the dropout masks of the unbroken run
    if stop := settings.train.early_stopping:
        callbacks.append(EarlyStoppingCallback(stop.patience, stop.min_delta))
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=bundle.train,
        eval_dataset=bundle.eval or None,
        data_collator=collator(settings, tokenizer),
        processing_class=tokenizer,
        compute_metrics=classification_metrics() if settings.task == "classification" else None,
        callbacks=callbacks,
        optimizers=(lora_plus_optimizer(settings, model, args), None),  # None: Trainer's own, from args.optim
        guard=guard,
    )
    for printer in (ProgressCallback, PrinterCallback):  # Trainer's tqdm bar or its printed log dicts: ours instead
        trainer.remove_callback(printer)
    terminal = log is print and sys.stdout.isatty()
    trainer.add_callback(
        progress.Progress(log, trainer.counts, lambda logged: eval_metrics(logged, settings.task), terminal)
    )
    # saved with each checkpoint, checked on resume: the token totals and what a resumed run must share; a stream's
    # position (data.streaming: the items of micro_batch_size x grad_accum per step)
    extras = (
        stream.saver(bundle.train, args.per_device_train_batch_size * args.gradient_accumulation_steps)
        if isinstance(bundle.train, stream.StreamDataset)
        else None
    )
    trainer.add_callback(
        checkpoint.AtomicCheckpoints(
            run_dir.checkpoints,
            settings.train.save_total_limit,
            trainer.counts,
            checkpoint.identity(settings.saved_dict()),
            extras,
        )
    )
    trackers.attach(trainer, settings, run_dir)  # train.report_to: TensorBoard's folder, the recipe as the run's config
    return trainer


def lora_plus_optimizer(settings: RunSettings, model, args: TrainingArguments) -> torch.optim.Optimizer | None:
    """train.lora_plus_ratio: peft's LoRA+ optimizer (B matrices at ratio * lr), of the class and with the settings
    `train.optimizer` gives Trainer (Trainer's own table, `get_optimizer_cls_and_kwargs`), and train.weight_decay.
    None without LoRA+: Trainer then builds its own optimizer."""
    if settings.train.lora_plus_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", args.learning_rate)
    return create_loraplus_optimizer(
        model,
        cls,
        lr=lr,
        loraplus_lr_ratio=settings.train.lora_plus_ratio,
        loraplus_weight_decay=args.weight_decay,
        **kwargs,
    )


def eval_metrics(raw: dict, task: str) -> dict:
    """Trainer's eval dict without the `eval_` prefix and the timing entries."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")
    out = {k.removeprefix("eval_"): v for k, v in raw.items() if not k.removeprefix("eval_").startswith(skip)}
    if task == "causal_lm" and "loss" in out:
        out["perplexity"] = perplexity(out["loss"])
    return out
