"""The training entry: recipe -> settings, checked data and model plan -> 4-bit base + LoRA -> Trainer -> run
directory.

Reads top to bottom, as a recipe: `preflight.prepare` checks everything that can be checked without training (so
bad input fails before anything is written) and resolves the run's settings once (`lora_sft.settings`: the compute
dtype, the device, the processes, the memory planner's micro batch); from there on every step takes the settings,
not the recipe. `run` is setup -> train -> finish: `setup_model` loads the base and adds LoRA, `fit` opens the run
directory, builds the Trainer (`run.trainer`), evaluates before, trains, evaluates after, writes the adapter and
summary, and ends with what the recipe asks after training: its eval section, the model card (rendered last, so
it holds the eval results), the hub push. The guards (signals, out of memory) cover the evaluations as well as the
training loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import Trainer

from lora_sft import distributed
from lora_sft import model as model_stage
from lora_sft.data import collator
from lora_sft.data.chats import warnings as data_warnings
from lora_sft.model import fitting
from lora_sft.preflight import Ready, batch_text, prepare
from lora_sft.recipe.schema import Recipe
from lora_sft.run import checkpoint, lock, progress
from lora_sft.run import start as run_start
from lora_sft.run.guard import guarded
from lora_sft.run.loop import Measured, evaluate_after, evaluate_before, evaluated_on_start, summarize, train
from lora_sft.run.records import Manifest, Summary
from lora_sft.run.rundir import RunDir
from lora_sft.run.trainer import CountingTrainer, build_trainer
from lora_sft.settings import RunSettings


@dataclass
class Result:
    run_dir: RunDir
    summary: dict  # summary.json as written (with `evaluation` when the eval section ran)
    model: torch.nn.Module
    trainer: Trainer


def run(
    recipe: Recipe,
    log=print,
    resume: str | bool | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    allow_inexact: bool = False,
) -> Result:
    """`train`: the preflight, then setup -> train -> finish (`fit`), then the end-of-run summary.

    Under a launcher (torchrun, accelerate launch) every process runs this; the main process alone writes and
    prints. The first process on each machine runs the preflight first (it tokenizes the data and fills the
    cache), then the others (they read the cache); bad input stops every process there, before anything is
    written. `quiet` (train --quiet): the summary is all that is printed. `allow_inexact` (--resume
    --allow-inexact): a checkpoint that lacks a piece of an exact resume continues with what it has (`run.start`)."""
    me = distributed.world()
    say = log  # the summary, printed by the main process
    log = log if me.main and not quiet else _quiet  # everything else
    ready, start = distributed.main_first(preflight, recipe, resume, overwrite, allow_inexact)
    settings = settle(ready, start, log)
    for line in data_warnings(ready.bundle.stats):  # what the data stage found legal but surely not meant
        log(line)
    model = setup_model(settings, ready, log)
    result = fit(settings, model, ready, log, start)
    if me.main:
        say("\n".join(progress.summary_lines(Summary.from_json(result.summary), result.run_dir)))
    return result


def preflight(
    recipe: Recipe, resume: str | bool | None, overwrite: bool, allow_inexact: bool = False
) -> tuple[Ready, run_start.Start]:
    """Everything checked before anything is written: the recipe's data, model and settings (`prepare`), and what
    happens to output_dir: a run already there is continued (--resume) or replaced (--overwrite), never silently
    overwritten; to resume, the data fingerprint (data, data options, tokenizer) must match and the checkpoint
    must belong to this recipe (its recipe hash, its adapter's modules and rank) and hold every file an exact resume
    restores, each readable (or --allow-inexact), and a finished run is not trained past its end."""
    ready = prepare(recipe).ready()
    return ready, run_start.start(recipe, resume, overwrite, ready.bundle.fingerprint, ready.plan, allow_inexact)


def settle(ready: Ready, start: run_start.Start, log=print) -> RunSettings:
    """The settings this run trains with: the preflight's, with the micro batch the memory plan keeps on a resume
    and the one every process can take under a launcher; the plan is printed before a weight is loaded."""
    settings, memory = ready.settings, ready.memory  # memory None: a config without transformer sizes
    if memory is None:
        return settings
    written = settings.as_written()
    if start.resume_from and written.train.memory_budget is not None:
        # the free memory may differ now: keep the micro batch the checkpoint trained with (its data order)
        kept = checkpoint.micro_batch_of(start.resume_from) or written.train.micro_batch_size
        memory = fitting.plan_memory(written, memory.work, memory.device, keep_micro_batch=kept)
    if settings.world.distributed:
        # DDP's processes step together: each planned against its own GPU's free memory, so they may have picked
        # different micro batches; all train with the smallest pick (checkpointing on where a process needs it)
        def pick(m: fitting.MemoryPlan) -> tuple[int, bool]:
            return m.micro_batch_size, not m.gradient_checkpointing

        mine, memory = memory, distributed.least(memory, key=pick)
        if pick(memory) != pick(mine):
            log("the processes' devices differ in free memory: every process trains with the smallest pick")
    log("\n".join(memory.lines(settings.world.size)))  # before a weight is loaded
    settings = memory.apply(written)  # the run directory saves the recipe as written
    if settings.world.distributed:
        log(f"processes: {settings.world.size}, {batch_text(settings, settings.world.size)}")
    return settings


def _quiet(*_args, **_kwargs) -> None:
    """The `log` of a process that is not the main one: the main process prints for all of them."""


def setup_model(settings: RunSettings, prepared: Ready, log=print) -> torch.nn.Module:
    """The data stats, then the base (quantized as the recipe says) with fresh LoRA layers."""
    from transformers import set_seed

    set_seed(settings.seed)  # adapter init draws from here: the same on every rank (RankSeeds: dropout)
    from lora_sft.data.stats import stats_lines

    bundle = prepared.bundle
    for split in ("train", "eval") if bundle.eval is not None else ("train",):
        log("\n".join(stats_lines(bundle, split, lengths_histogram=False)))
    base = model_stage.load_base(settings, prepared.plan, log=log)
    # lora.init eva: the adapter starts from a pass over the training batches (before any checkpoint is restored)
    batches = (
        model_stage.InitBatches(settings, bundle.train, collator(settings, prepared.tokenizer))
        if settings.lora.init == "eva"
        else None
    )
    model = model_stage.add_lora(base, settings, prepared.plan, batches)
    plan = prepared.plan
    log(
        f"trainable params: {plan.trainable_params:,} of {plan.total_params:,} ({100 * plan.trainable_params / plan.total_params:.2f}%)"
    )
    return model


def fit(settings: RunSettings, model, ready: Ready, log=print, start: run_start.Start | None = None) -> Result:
    """Train `model` into the run directory and finish it, the main process holding the run directory's lock
    (`run.lock`: a second train, export or eval of it is refused while this one writes)."""
    if not settings.world.main:
        return _fit(settings, model, ready, log, start)
    root = RunDir(settings.output_dir).root  # ~ expanded, as every run directory path is
    root.mkdir(parents=True, exist_ok=True)  # the preflight found it safe to write into
    with lock.held(root, "train", settings.where("output_dir")):
        return _fit(settings, model, ready, log, start)


def _fit(settings: RunSettings, model, ready: Ready, log=print, start: run_start.Start | None = None) -> Result:
    """The steps of `fit`, in order."""
    started = time.perf_counter()
    resume_from = start.resume_from if start else None
    main = settings.world.main  # under a launcher: the process that writes; the others wait where it does
    opened = distributed.on_main(open_run_dir, settings, ready, start, log)
    run_dir, manifest = opened if opened is not None else (RunDir(settings.output_dir), None)
    # pissa/olora: A0, B0 to save adapter/ for the original base
    initial = model_stage.save_initial(settings, model) if main else None
    trainer = build_trainer(settings, model, ready.tokenizer, ready.bundle, run_dir, log)
    before = evaluate_before(settings, trainer, run_dir, resume_from)
    output, seen_before, train_time = train(settings, trainer, resume_from, start.unreadable if start else ())
    before = before or evaluated_on_start(settings, trainer)
    after = evaluate_after(settings, trainer)
    measured = Measured(output, before, after, seen_before, train_time, started)
    summary = summarize(trainer, ready.plan, measured)
    adapter = distributed.full_adapter_state(model)  # FSDP: the adapter gathered whole (every process takes part)
    if not main:  # the rest is written (and the eval section and the push are run) by the main process alone
        return Result(run_dir, summary.to_json(), model, trainer)
    assert manifest is not None  # the main process opened the run directory
    run_dir.save_adapter(
        model, ready.tokenizer, initial, adapter
    )  # eval.md, export/ and summary `evaluation` describe the adapter being replaced
    run_dir.finish(manifest, summary)
    after_training(settings, run_dir, trainer, ready.bundle.labels, log)
    finished = run_dir.read_summary() or summary  # with the eval section's `evaluation`
    finished.wall_time_s = round(time.perf_counter() - started, 2)  # the time the run took: its eval section included
    run_dir.write_summary(finished)
    return Result(run_dir, finished.to_json(), model, trainer)


# ---------------------------------------------------------------- the steps of `fit`


def open_run_dir(
    settings: RunSettings, ready: Ready, start: run_start.Start | None, log=print
) -> tuple[RunDir, Manifest | None]:
    """A fresh run directory (replacing the old run on --overwrite), or the run being resumed, reopened. The main
    process's job under a launcher (`distributed.on_main`): the manifest is None on the others."""
    run_dir, bundle, plan = RunDir(settings.output_dir), ready.bundle, ready.plan
    if start and start.resume_from:
        manifest = checkpoint.reopen(run_dir, start.resume_from, settings.saved_dict(), start.inexact)
        log(f"resuming from {start.resume_from}")
        if start.inexact:  # --allow-inexact
            gaps = "; ".join(g.text() for g in start.inexact)
            log(f"note: not an exact resume (--allow-inexact, recorded in manifest.json): {gaps}; started anew")
    else:
        if start and start.replace:
            run_dir.remove_run()  # --overwrite, and only now that the new run is ready to go; the user's own files stay
        gguf = plan.source.gguf
        manifest = Manifest.new(
            settings.seed,
            bundle.fingerprint,
            bundle.stats,
            f"{plan.source.path} ({plan.source.origin})",
            gguf.record() if gguf else None,
        )
        run_dir.create(settings.saved_dict(), manifest)
    log(f"run directory: {run_dir.root}")
    return run_dir, manifest


def after_training(
    settings: RunSettings, run_dir: RunDir, trainer: CountingTrainer, labels: list[str] | None, log=print
) -> None:
    """The last steps: the recipe's eval section (under the guards), then the model card (so it reports the
    eval results; written even if the eval section fails, with what exists), then the hub push of adapter/
    (hub.after: train)."""
    try:
        if settings.eval.after_train:
            from lora_sft.export.evaluation import evaluate_run

            summary = run_dir.read_summary()  # what the Trainer measured on the eval split before and after
            measured = {"base": summary.eval_before, "fine_tuned": summary.eval} if summary is not None else None
            with guarded(settings, trainer, "the recipe's eval section (eval.after_train)"):
                evaluate_run(run_dir.root, base=settings.eval.base, log=log, measured=measured)
    finally:
        from lora_sft.export.card import write_card

        write_card(run_dir, labels)
    if settings.hub.repo_id and settings.hub.after == "train":
        from lora_sft.export.hub import push

        push(
            run_dir.adapter, settings.hub.repo_id, private=settings.hub.private, revision=settings.hub.revision, log=log
        )
