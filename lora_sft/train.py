"""The training entry: recipe -> checked data and model plan -> 4-bit base + LoRA -> Trainer -> run directory.

Reads top to bottom, as a recipe: `preflight.prepare` checks everything that can be checked without training (so
bad input fails before anything is written); `run` is setup -> train -> finish: `setup_model` loads the
base and adds LoRA, `fit` opens the run directory, builds the Trainer (`training_arguments`, the
`CountingTrainer` and one callback per job), evaluates before, trains, evaluates after, writes the
adapter and summary, and ends with what the recipe asks after training: its eval section, the model
card (rendered last, so it holds the eval results), the hub push. The guards (signals, out of memory)
cover the evaluations as well as the training loop.
"""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
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

from lora_sft import data as data_stage
from lora_sft import distributed
from lora_sft.data import stream
from lora_sft.model import load as model_stage
from lora_sft.model import loss as loss_stage
from lora_sft.model import planner
from lora_sft.preflight import Ready, batch_text, prepare
from lora_sft.recipe.schema import Recipe
from lora_sft.run import checkpoint, plots, progress, trackers
from lora_sft.run.guard import Guard, guarded
from lora_sft.run.rundir import EarlyStopped, Manifest, RunDir, Summary
from lora_sft.tokens import count_trained, perplexity


@dataclass
class Result:
    run_dir: RunDir
    summary: dict  # summary.json as written (with `evaluation` when the eval section ran)
    model: torch.nn.Module
    trainer: Trainer


def run(
    recipe: Recipe, log=print, resume: str | bool | None = None, overwrite: bool = False, quiet: bool = False
) -> Result:
    """`train`: the preflight, then setup -> train -> finish (`fit`), then the end-of-run summary.

    Under a launcher (torchrun, accelerate launch) every process runs this; the main process alone writes and
    prints. The first process on each machine runs the preflight first (it tokenizes the data and fills the
    cache), then the others (they read the cache); bad input stops every process there, before anything is
    written. `quiet` (train --quiet): the summary is all that is printed."""
    me = distributed.world()
    say = log  # the summary, printed by the main process
    log = log if me.main and not quiet else _quiet  # everything else
    ready, start = distributed.main_first(preflight, recipe, resume, overwrite)
    memory = ready.memory  # None only for a config without transformer sizes: the recipe's settings as written
    if memory is not None and start.resume_from and recipe.train.memory_budget is not None:
        # the free memory may differ now: keep the micro batch the checkpoint trained with (its data order)
        kept = checkpoint.micro_batch_of(start.resume_from) or recipe.train.micro_batch_size
        memory = planner.plan_memory(recipe, memory.work, memory.device, keep_micro_batch=kept)
    if memory is not None and me.distributed:
        # DDP's processes step together: each planned against its own GPU's free memory, so they may have picked
        # different micro batches; all train with the smallest pick (checkpointing on where a process needs it)
        def pick(m: planner.MemoryPlan) -> tuple[int, bool]:
            return m.micro_batch_size, not m.gradient_checkpointing

        mine, memory = memory, distributed.least(memory, key=pick)
        if pick(memory) != pick(mine):
            log("the processes' devices differ in free memory: every process trains with the smallest pick")
    if memory is not None:
        log("\n".join(memory.lines(me.size)))  # before a weight is loaded
        recipe = memory.apply(recipe)  # the settings training uses; the run directory saves the recipe as written
    if me.distributed:
        log(f"processes: {me.size}, {batch_text(recipe, me.size)}")
    model = setup_model(recipe, ready, log)
    result = fit(recipe, model, ready.tokenizer, ready.bundle, ready.plan, log, start)
    if me.main:
        say("\n".join(progress.summary_lines(Summary.from_json(result.summary), result.run_dir)))
    return result


def preflight(recipe: Recipe, resume: str | bool | None, overwrite: bool) -> tuple[Ready, checkpoint.Start]:
    """Everything checked before anything is written: the recipe's data, model and settings (`prepare`), and what
    happens to output_dir: a run already there is continued (--resume) or replaced (--overwrite), never silently
    overwritten; to resume, the data fingerprint (data, data options, tokenizer) must match and the checkpoint
    must belong to this recipe (its recipe hash, its adapter's modules and rank)."""
    ready = prepare(recipe).ready()
    return ready, checkpoint.start(recipe, resume, overwrite, ready.bundle.fingerprint, ready.plan)


def _quiet(*_args, **_kwargs) -> None:
    """The `log` of a process that is not the main one: the main process prints for all of them."""


def setup_model(recipe: Recipe, prepared: Ready, log=print) -> torch.nn.Module:
    """The data stats, then the base (quantized as the recipe says) with fresh LoRA layers."""
    from transformers import set_seed

    set_seed(recipe.seed)  # adapter init draws from here: the same on every rank (RankSeeds: dropout)
    from lora_sft.data.stats import stats_lines

    bundle = prepared.bundle
    for split in ("train", "eval") if bundle.eval is not None else ("train",):
        log("\n".join(stats_lines(bundle, split, lengths_histogram=False)))
    base = model_stage.load_base(recipe, prepared.plan, sharded=bool(distributed.fsdp_shards(recipe)), log=log)
    # lora.init eva: the adapter starts from a pass over the training batches (before any checkpoint is restored)
    batches = (
        model_stage.InitBatches(recipe, bundle.train, data_stage.collator(recipe, prepared.tokenizer))
        if recipe.lora.init == "eva"
        else None
    )
    model = model_stage.add_lora(base, recipe, prepared.plan, batches)
    plan = prepared.plan
    log(
        f"trainable params: {plan.trainable_params:,} of {plan.total_params:,} ({100 * plan.trainable_params / plan.total_params:.2f}%)"
    )
    return model


def fit(
    recipe: Recipe,
    model,
    tokenizer,
    bundle: data_stage.DataBundle,
    plan: model_stage.ModelPlan,
    log=print,
    start: checkpoint.Start | None = None,
) -> Result:
    """Train `model` into the run directory and finish it: the steps in order."""
    started = time.perf_counter()
    resume_from = start.resume_from if start else None
    main = distributed.world().main  # under a launcher: the process that writes; the others wait where it does
    opened = distributed.on_main(open_run_dir, recipe, bundle, plan, start, log)
    run_dir, manifest = opened if opened is not None else (RunDir(recipe.output_dir), None)
    # pissa/olora: A0, B0 to save adapter/ for the original base
    initial = model_stage.save_initial(recipe, model) if main else None
    trainer = build_trainer(recipe, model, tokenizer, bundle, run_dir, log)
    before = evaluate_before(recipe, trainer, run_dir, resume_from)
    output, seen_before, train_time = train(recipe, trainer, resume_from)
    before = before or evaluated_on_start(recipe, trainer)
    after = evaluate_after(recipe, trainer)
    summary = summarize(trainer, plan, output, before, after, seen_before, train_time, started)
    adapter = distributed.full_adapter_state(model)  # FSDP: the adapter gathered whole (every process takes part)
    if not main:  # the rest is written (and the eval section and the push are run) by the main process alone
        return Result(run_dir, summary.to_json(), model, trainer)
    assert manifest is not None  # the main process opened the run directory
    run_dir.save_adapter(
        model, tokenizer, initial, adapter
    )  # eval.md, export/ and summary `evaluation` describe the adapter being replaced
    run_dir.finish(manifest, summary)
    after_training(recipe, run_dir, trainer, bundle.labels, log)
    return Result(run_dir, (run_dir.read_summary() or summary).to_json(), model, trainer)


# ---------------------------------------------------------------- the steps of `fit`


def open_run_dir(
    recipe: Recipe,
    bundle: data_stage.DataBundle,
    plan: model_stage.ModelPlan,
    start: checkpoint.Start | None,
    log=print,
) -> tuple[RunDir, Manifest | None]:
    """A fresh run directory (replacing the old run on --overwrite), or the run being resumed, reopened. The main
    process's job under a launcher (`distributed.on_main`): the manifest is None on the others."""
    run_dir = RunDir(recipe.output_dir)
    if start and start.resume_from:
        manifest = checkpoint.reopen(run_dir, start.resume_from, recipe.saved_dict())
        log(f"resuming from {start.resume_from}")
    else:
        if start and start.replace:
            run_dir.remove_run()  # --overwrite, and only now that the new run is ready to go; the user's own files stay
        gguf = plan.source.gguf
        manifest = Manifest.new(
            recipe.seed,
            bundle.fingerprint,
            bundle.stats,
            f"{plan.source.path} ({plan.source.origin})",
            gguf.record() if gguf else None,
        )
        run_dir.create(recipe.saved_dict(), manifest)
    log(f"run directory: {run_dir.root}")
    return run_dir, manifest


def training_arguments(recipe: Recipe, output_dir: str | Path, has_eval: bool) -> TrainingArguments:
    """The recipe's `train` section (and seed, compute dtype) as Trainer's arguments.

    `output_dir` is where Trainer writes a checkpoint: the staging folder, from which `AtomicCheckpoints`
    moves it into place. Rotation is `AtomicCheckpoints`' too (it keeps train.save_total_limit complete
    checkpoints), so Trainer's own save_total_limit stays unset."""
    t = recipe.train
    stop = t.early_stopping
    dtype = model_stage.compute_dtype(recipe.quant)
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
        prediction_loss_only=recipe.task == "causal_lm",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        seed=recipe.seed,
        data_seed=recipe.seed,
        # data.group_by_length: Trainer's LengthGroupedSampler, lengths from the data stage's column (`SeedLengthGroups`)
        **_sampling(data_stage.groups_by_length(recipe)),
        length_column_name=data_stage.LENGTH,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        report_to=list(t.report_to) or "none",  # train.report_to: transformers' integrations (`trackers`)
        run_name=RunDir(recipe.output_dir).name,
        label_names=["labels"],  # peft's forward(*args, **kwargs) hides them from Trainer's signature check
        remove_unused_columns=False,  # the collator needs every column the data stage made
        dataloader_num_workers=0,
        # data.streaming: the stream restores its own position from the checkpoint (`stream`), so Trainer must not
        # skip the trained batches again by iterating them
        ignore_data_skip=recipe.data.streaming,
        dataloader_pin_memory=torch.cuda.is_available(),
        neftune_noise_alpha=t.neftune_alpha,  # Trainer's hook on the input embeddings, active in train mode only
        # early stopping: Trainer tracks the best evaluation and loads its checkpoint when training ends
        load_best_model_at_end=stop is not None,
        metric_for_best_model=stop.metric if stop else None,
        greater_is_better=stop.greater_is_better() if stop else None,
        # a resumed run continues the patience count where its checkpoint left it (EarlyStoppingCallback's state)
        restore_callback_states_from_checkpoint=stop is not None,
        **distributed.trainer_arguments(recipe),  # several processes under a launcher (DDP; on CPU: gloo)
        **distributed.fsdp_arguments(recipe),  # train.distributed fsdp under a launcher: FSDP2 with each layer sharded
    )


def _sampling(grouped: bool) -> dict:
    """Trainer's train sampler: length-grouped or shuffled (transformers 5.2 made the group_by_length flag a strategy)."""
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": "group_by_length" if grouped else "random"}
    return {"group_by_length": grouped}


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
            and self.label_smoother is None
            and self.compute_loss_func is None
            and (self.args.prediction_loss_only or not return_outputs)
            and loss_stage.plain_path_reason(model) is None
        ):
            with self.accelerator.autocast():  # the model's forward runs under it (mixed precision): so does this
                loss = loss_stage.causal_lm_loss(
                    model,
                    inputs,
                    num_items_in_batch if self.model_accepts_loss_kwargs else None,
                    tally=None if model.training else self.eval_correct,
                )
            if (
                self.args.average_tokens_across_devices
                and self.model_accepts_loss_kwargs
                and num_items_in_batch is not None
            ):
                loss = loss * self._devices_scale()
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
        if num_items_in_batch is None or not (self.model_accepts_loss_kwargs or self.compute_loss_func):
            return loss * targets
        scale = self._devices_scale() if self.args.average_tokens_across_devices else 1
        return loss * float(num_items_in_batch) / scale

    def _devices_scale(self) -> int:
        """What Trainer's compute_loss multiplies a loss normalized by num_items_in_batch by under
        average_tokens_across_devices (transformers 5.24): the processes, or the GPUs of DataParallel."""
        return self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu

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

    What must be equal on every rank is seeded before this: the adapter's initial weights (`set_seed(recipe.seed)`
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
        from transformers.trainer_pt_utils import LengthGroupedSampler

        sampler = train_dataloader
        for _ in range(4):  # DataLoader -> BatchSampler (inside accelerate's shard or skip wrappers) -> sampler
            if isinstance(sampler, LengthGroupedSampler):
                break
            sampler = getattr(sampler, "batch_sampler", None) or getattr(sampler, "sampler", None)
        if not isinstance(sampler, LengthGroupedSampler):
            raise RuntimeError("data.group_by_length: Trainer's train dataloader has no LengthGroupedSampler")
        if not isinstance(sampler.lengths, list):
            sampler.lengths = list(sampler.lengths[:])
        # groups as long as the global batch (Trainer gives the sampler one rank's share): N processes at micro batch
        # b see each step the samples one process sees at micro batch N x b, whatever the number of processes
        sampler.batch_size = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
        # whole epochs done: a run resumed mid-epoch draws its epoch's order again, then skips the trained batches
        sampler.generator = torch.Generator().manual_seed(args.data_seed + int(state.epoch))


class SaveLastStep(TrainerCallback):
    """The last step always writes a checkpoint (what --resume continues, whatever save_steps is)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True


def build_trainer(
    recipe: Recipe, model, tokenizer, bundle: data_stage.DataBundle, run_dir: RunDir, log=print
) -> CountingTrainer:
    """The Trainer with its callbacks, in the order they act at a step's end: the log, the last-step save,
    the guard (a signal asks for a save), then `AtomicCheckpoints`, which sees every request to save. What is
    printed while it trains is `progress.Progress`'s (a bar when printing to a terminal, else plain lines)."""
    from lora_sft.export.evaluation import classification_metrics

    guard = Guard(recipe, run_dir.checkpoints, log)
    args = training_arguments(recipe, checkpoint.staging(run_dir.checkpoints), has_eval=bool(bundle.eval))
    callbacks: list[TrainerCallback] = [RunLog(run_dir), plots.LossPlot(run_dir), SaveLastStep(), guard, RankSeeds()]
    if data_stage.groups_by_length(recipe):
        callbacks.append(SeedLengthGroups())
    if recipe.data.streaming:
        callbacks.append(stream.LoaderSeed())  # a resumed stream draws the dropout masks of the unbroken run
    if stop := recipe.train.early_stopping:
        callbacks.append(EarlyStoppingCallback(stop.patience, stop.min_delta))
    trainer = CountingTrainer(
        model=model,
        args=args,
        train_dataset=bundle.train,
        eval_dataset=bundle.eval or None,
        data_collator=data_stage.collator(recipe, tokenizer),
        processing_class=tokenizer,
        compute_metrics=classification_metrics() if recipe.task == "classification" else None,
        callbacks=callbacks,
        optimizers=(lora_plus_optimizer(recipe, model, args), None),  # None: Trainer's own, from args.optim
        guard=guard,
    )
    for printer in (ProgressCallback, PrinterCallback):  # Trainer's tqdm bar or its printed log dicts: ours instead
        trainer.remove_callback(printer)
    terminal = log is print and sys.stdout.isatty()
    trainer.add_callback(
        progress.Progress(log, trainer.counts, lambda logged: _eval_metrics(logged, recipe.task), terminal)
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
            recipe.train.save_total_limit,
            trainer.counts,
            checkpoint.identity(recipe.saved_dict()),
            extras,
        )
    )
    trackers.attach(trainer, recipe, run_dir)  # train.report_to: TensorBoard's folder, the recipe as the run's config
    return trainer


def lora_plus_optimizer(recipe: Recipe, model, args: TrainingArguments) -> torch.optim.Optimizer | None:
    """train.lora_plus_ratio: peft's LoRA+ optimizer (B matrices at ratio * lr), of the class and with the settings
    `train.optimizer` gives Trainer (Trainer's own table, `get_optimizer_cls_and_kwargs`), and train.weight_decay.
    None without LoRA+: Trainer then builds its own optimizer."""
    if recipe.train.lora_plus_ratio is None:
        return None
    from peft.optimizers import create_loraplus_optimizer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", args.learning_rate)
    return create_loraplus_optimizer(
        model,
        cls,
        lr=lr,
        loraplus_lr_ratio=recipe.train.lora_plus_ratio,
        loraplus_weight_decay=args.weight_decay,
        **kwargs,
    )


def evaluate_before(recipe: Recipe, trainer: CountingTrainer, run_dir: RunDir, resume_from: Path | None) -> dict | None:
    """The untrained model on the eval split (train.eval_before); a resumed run reads what its first part logged."""
    if not trainer.eval_dataset or not recipe.train.eval_before:
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
        with guarded(recipe, trainer, "the evaluation before training"):
            logged = trainer.evaluate()
    return _eval_metrics({k: v for k, v in (logged or {}).items() if k.startswith("eval_")}, recipe.task) or None


def evaluated_on_start(recipe: Recipe, trainer: CountingTrainer) -> dict | None:
    """The evaluation before training that Trainer ran at the start of train() (eval_on_start, under a launcher)."""
    if not trainer.args.eval_on_start:
        return None
    first = next((h for h in trainer.state.log_history if "eval_loss" in h), None)
    return _eval_metrics({k: v for k, v in first.items() if k.startswith("eval_")}, recipe.task) if first else None


def train(recipe: Recipe, trainer: CountingTrainer, resume_from: Path | None):
    """The training loop under its guards. Returns Trainer's output, the tokens seen before it, its seconds."""
    if resume_from:
        checkpoint.restore_counts(trainer, resume_from)
        if isinstance(trainer.train_dataset, stream.StreamDataset):  # data.streaming: where its steps ended
            trainer.train_dataset.restore(checkpoint.read_extra(resume_from, "stream"))
    seen_before, train_start = trainer.tokens_seen, time.perf_counter()
    saves = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, checkpoint.AtomicCheckpoints))
    with guarded(recipe, trainer), checkpoint.save_errors(saves), warnings.catch_warnings():
        # Trainer saves checkpoints with peft's save_embedding_layers "auto": for a hub base it looks config.json up
        # to see if the vocabulary grew, and warns offline; added tokens' rows are saved either way (trainable tokens)
        warnings.filterwarnings("ignore", message="Unable to fetch remote file", category=UserWarning)
        warnings.filterwarnings("ignore", message="Could not find a config file in", category=UserWarning)
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if stopped := trainer.guard.interrupted(trainer.state):
        raise stopped  # the checkpoint is saved; the adapter/ and summary come when the run completes
    return output, seen_before, time.perf_counter() - train_start


def evaluate_after(recipe: Recipe, trainer: CountingTrainer) -> dict | None:
    """The trained model on the eval split (what summary.json `eval` reports): the evaluation Trainer ran at the
    last step when there was one (with train.eval_steps Trainer evaluates there) and the model is still the one it
    scored, else a new one."""
    if not trainer.eval_dataset:
        return None
    if (last := _evaluated_at_the_end(trainer)) is not None:
        return _eval_metrics(last, recipe.task)
    with guarded(recipe, trainer, "the evaluation after training"):
        return _eval_metrics(trainer.evaluate(), recipe.task)


def _evaluated_at_the_end(trainer: CountingTrainer) -> dict | None:
    """Trainer's record of an evaluation at the last step, or None (none there, or early stopping loaded the best
    checkpoint since)."""
    if trainer.args.load_best_model_at_end:
        return None
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if not evals or evals[-1].get("step") != trainer.state.global_step:
        return None
    return {k: v for k, v in evals[-1].items() if k != "step"}


def summarize(
    trainer: CountingTrainer,
    plan: model_stage.ModelPlan,
    output,
    before: dict | None,
    after: dict | None,
    seen_before: int,
    train_time: float,
    started: float,
) -> Summary:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    peak, peak_kind = progress.peak_memory_mb()  # this process's (the main process's under a launcher)
    # each process counts the tokens of its own batches (the main one also what a resumed checkpoint counted)
    seen, trained, seen_before = (
        distributed.total(n) for n in (trainer.tokens_seen, trainer.tokens_trained, seen_before)
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
        wall_time_s=round(time.perf_counter() - started, 2),
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


def after_training(
    recipe: Recipe, run_dir: RunDir, trainer: CountingTrainer, labels: list[str] | None, log=print
) -> None:
    """The last steps: the recipe's eval section (under the guards), then the model card (so it reports the
    eval results; written even if the eval section fails, with what exists), then the hub push of adapter/
    (hub.after: train)."""
    try:
        if recipe.eval.after_train:
            from lora_sft.export.evaluation import evaluate_run

            summary = run_dir.read_summary()  # what the Trainer measured on the eval split before and after
            measured = {"base": summary.eval_before, "fine_tuned": summary.eval} if summary is not None else None
            with guarded(recipe, trainer, "the recipe's eval section (eval.after_train)"):
                evaluate_run(run_dir.root, base=recipe.eval.base, log=log, measured=measured)
    finally:
        run_dir.write_card(labels)
    if recipe.hub.repo_id and recipe.hub.after == "train":
        from lora_sft.export.hub import push

        push(run_dir.adapter, recipe.hub.repo_id, private=recipe.hub.private, revision=recipe.hub.revision, log=log)


def _eval_metrics(raw: dict, task: str) -> dict:
    """Trainer's eval dict without the `eval_` prefix and the timing entries."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")
    out = {k.removeprefix("eval_"): v for k, v in raw.items() if not k.removeprefix("eval_").startswith(skip)}
    if task == "causal_lm" and "loss" in out:
        out["perplexity"] = perplexity(out["loss"])
    return out
