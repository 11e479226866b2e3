"""The preflight: everything that can be checked without training, run by `validate` and first thing in
`train` (before the run directory exists), and the plan `validate` prints.

`prepare` collects every independent problem (data rows, model config and weights, tokenizer, the
tokenized data, hardware, output_dir, what the after-training steps need) and raises them together;
`describe_plan` says what `train` would do with the recipe.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lora_sft import data as data_stage
from lora_sft import distributed
from lora_sft import model as model_stage
from lora_sft.console import amount
from lora_sft.data import stream
from lora_sft.data.chats import warnings as data_warnings
from lora_sft.errors import UserError
from lora_sft.model import fitting, planner, shapes
from lora_sft.recipe.schema import Recipe
from lora_sft.run import start as run_start
from lora_sft.run import trackers
from lora_sft.settings import Machine, RunSettings, resolve

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Ready:
    """What `train` starts from: checked rows, the model plan, the tokenizer and the tokenized data."""

    checked: data_stage.Checked
    plan: model_stage.ModelPlan
    tokenizer: PreTrainedTokenizerBase
    bundle: data_stage.DataBundle
    memory: fitting.MemoryPlan | None  # the memory estimate and the settings the run trains with; None: sizes unknown
    settings: RunSettings  # resolved once: what the stages take (with the memory plan's picks)


@dataclass
class Prepared:
    """What the preflight found good: checked rows, the model plan, the tokenizer and the tokenized data."""

    checked: data_stage.Checked
    plan: model_stage.ModelPlan | None  # None only when validate could not reach a hub model
    tokenizer: PreTrainedTokenizerBase | None
    bundle: data_stage.DataBundle | None
    note: str | None = None  # what validate could not check, and why
    memory: fitting.MemoryPlan | None = (
        None  # None only when the model's shape is unknown (unreachable, not in the table)
    )
    settings: RunSettings | None = None  # None only when the recipe failed its checks

    def ready(self) -> Ready:
        """Everything train needs; only validate's unreachable hub model leaves a part out."""
        if self.plan is None or self.tokenizer is None or self.bundle is None or self.settings is None:
            raise AssertionError(f"the preflight left out a part train needs: {self.note}")
        return Ready(self.checked, self.plan, self.tokenizer, self.bundle, self.memory, self.settings)


def check_hardware(recipe: RunSettings) -> None:
    """Options the recipe allows but the machine (this one, or the --target) cannot run."""
    problems = []
    cuda, here = (
        recipe.machine.kind == "cuda",
        "on this machine" if not recipe.machine.named else f"on --target {recipe.machine.name}",
    )
    if recipe.train.optimizer.startswith("paged_") and not cuda:
        problems.append(
            f"{recipe.where('train', 'optimizer')}: {recipe.train.optimizer} needs a CUDA GPU, and there is none {here}; use adamw_torch here"
        )
    if recipe.quant.compute_dtype in ("bf16", "fp16") and not cuda:
        problems.append(
            f"{recipe.where('quant', 'compute_dtype')}: {recipe.quant.compute_dtype} training needs a CUDA GPU, and there is none {here}; use auto or fp32 here"
        )
    elif (
        recipe.quant.compute_dtype == "bf16"
        and cuda
        and not recipe.machine.named
        and not torch.cuda.is_bf16_supported()
    ):
        problems.append(
            f"{recipe.where('quant', 'compute_dtype')}: the GPU on this machine does not run bf16; use auto (fp32 here) or fp16"
        )
    if problems:
        raise UserError(problems)


def _tokenizer_problems(
    recipe: Recipe, tokenizer, plan: model_stage.ModelPlan | None, bundle: data_stage.DataBundle | None
) -> list[str]:
    """A tokenizer that cannot end a response, pad a batch, or whose ids the model has no embedding for."""
    where, problems = recipe.where("model", "path"), []
    if recipe.task == "causal_lm" and tokenizer.eos_token is None:
        problems.append(
            f"{where}: the tokenizer has no EOS token, so the model never learns to stop; set eos_token in its tokenizer_config.json"
        )
    elif tokenizer.pad_token is None:
        problems.append(
            f"{where}: the tokenizer has neither a padding nor an EOS token to pad batches with; set pad_token in its tokenizer_config.json"
        )
    vocab = (plan.vocab_rows or getattr(plan.config, "vocab_size", None)) if plan else None
    if (
        vocab and len(tokenizer) > vocab and not problems
    ):  # only then can an id fall outside the embedding (and rows hold no None for EOS)
        ids = [i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None]
        if bundle is not None and isinstance(bundle.train, stream.StreamDataset):
            # the stream's rows are tokenized during training, not read ahead: any id the tokenizer gives may come
            ids.append(len(tokenizer) - 1)
        for split in (bundle.train, bundle.eval) if bundle else ():
            if split is not None and not isinstance(split, stream.StreamDataset) and len(split):
                ids.append(data_stage.largest_token(split) or 0)
        if ids and max(ids) >= vocab:
            problems.append(
                f"{where}: the tokenizer gives token id {max(ids)} but config.json has vocab_size {vocab} (the embedding has no row for it): the tokenizer ({len(tokenizer)} tokens) and the model do not belong together"
            )
    return problems


def fsdp_problems(recipe: RunSettings) -> list[str]:
    """What cannot run under FSDP: a base or an adapter init FSDP cannot shard or save, a CPU, a contradicting
    accelerate config (train.optimizer is the schema's: `TrainSection`)."""
    where = recipe.where("train", "distributed")
    from_config = recipe.train.distributed == "auto"
    if recipe.train.distributed == "ddp" and distributed.accelerate_fsdp():
        return [
            f"{where}: ddp, but accelerate launch was given an FSDP config (ACCELERATE_USE_FSDP=true); set train.distributed: fsdp (or auto), or launch with recipes/accelerate/ddp.yaml"
        ]
    if not recipe.fsdp:
        return []
    why = "train.distributed auto under an accelerate FSDP config" if from_config else "train.distributed: fsdp"
    problems = []
    if recipe.quant.mode == "int8":
        problems.append(
            f"{recipe.where('quant', 'mode')}: int8 cannot be sharded by FSDP ({why}): its weights are int8 with per-row scales kept outside them; use quant.mode: nf4 (FSDP-QLoRA), or train.distributed: ddp"
        )
    if recipe.lora.init in model_stage.MUTATING_INITS:
        problems.append(
            f"{recipe.where('lora', 'init')}: {recipe.lora.init} rewrites the base weights, which FSDP shards ({why}); use init: default, or train.distributed: ddp"
        )
    if recipe.world.launched and recipe.machine.kind != "cuda":
        problems.append(
            f"{where}: FSDP needs GPUs ({why}): accelerate runs FSDP on CUDA devices only, and CPU processes would each train the whole model (DDP); use train.distributed: ddp here"
        )
    if distributed.accelerate_fsdp():
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            problems.append(
                f"{where}: the accelerate config says fsdp_version {version}; lora_sft runs FSDP2 (FSDP1 is deprecated in transformers 5): set fsdp_version: 2, as recipes/accelerate/fsdp_qlora.yaml does"
            )
        # the Trainer's mixed precision casts every gathered weight to its dtype: the 4-bit storage must be that dtype
        wanted = {"bfloat16": "bf16", "float16": "fp16"}.get(str(recipe.dtype).removeprefix("torch."), "no")
        given = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if given not in ("no", wanted):
            problems.append(
                f"{recipe.where('quant', 'compute_dtype')}: the accelerate config's mixed_precision {given} differs from the compute dtype ({wanted if wanted != 'no' else 'fp32'}): FSDP would cast the 4-bit weights, stored in the compute dtype, to {given}; set mixed_precision: 'no' in the accelerate config (lora_sft sets it from quant.compute_dtype)"
            )
    return problems


def prepare(
    recipe: Recipe,
    hub_may_be_unreachable: bool = False,
    machine: Machine | None = None,
    world: distributed.World | None = None,
) -> Prepared:
    """The preflight, run by `validate` and first thing in `train` (before the run directory exists):
    everything that can be checked without training. Data rows; model config, LoRA targets and weight
    files; the tokenizer with the chat template; the data tokenized (templates, the max_dropped gate;
    the cache is reused); tokenizer vs model; the hardware; what the after-training steps need. Every
    independent problem is reported at once. `hub_may_be_unreachable`: a hub model that cannot be read
    becomes a note (validate) instead of an error (train). `machine`: the machine planned for (validate --target;
    this one by default). `world`: the processes planned for (validate --nproc; this process's launcher by default),
    so that validate refuses what train under that launcher refuses."""
    from lora_sft.export.checks import before_training

    problems: list[str] = []
    settings = resolve(recipe, machine, world)

    def attempt(step, *args):
        try:
            return step(*args)
        except UserError as e:
            problems.extend(e.problems)
            return None

    checked = (
        attempt(stream.check, recipe, settings.world) if recipe.data.streaming else attempt(data_stage.check, recipe)
    )
    source = attempt(model_stage.resolve_source, recipe)
    tokenizer = bundle = None
    plan, source, note = _plan_model(recipe, source, checked, problems, hub_may_be_unreachable)
    if source is not None:
        tokenizer = attempt(model_stage.load_tokenizer, recipe, source)
    if plan is not None and tokenizer is not None:
        model_stage.plan_tokens(plan, tokenizer, model_stage.added_token_ids(tokenizer))
    if tokenizer is not None and checked is not None:
        bundle = attempt(stream.build if recipe.data.streaming else data_stage.build, recipe, tokenizer, checked)
    if tokenizer is not None:
        problems += _tokenizer_problems(recipe, tokenizer, plan, bundle)
    if plan is not None:
        problems += model_stage.check_weights(recipe, plan)
    if source is not None:
        problems += model_stage.init_problems(recipe, source, plan)  # lora.init against the base and its layers
    problems += fsdp_problems(settings)  # FSDP against the base, the adapter init, the device, the launcher
    problems += trackers.problems(recipe)  # train.report_to: each tracker's package is installed
    attempt(check_hardware, settings)
    # output_dir must be a folder of its own (not the working directory, the data's, a folder of other files)
    attempt(run_start.check_output_dir, recipe, source.path if source is not None and source.origin != "hub" else None)
    problems += before_training(recipe, checked)
    memory = None
    if not problems:  # the memory plan, and a budget the run cannot fit, before anything loads
        memory, unknown = attempt(plan_memory, settings, plan, bundle) or (None, None)
        note = f"{note}\n{unknown}" if note and unknown else note or unknown
    if problems:
        raise UserError(list(dict.fromkeys(problems)))
    settings = memory.apply(settings) if memory is not None else settings
    return Prepared(checked, plan, tokenizer, bundle, note, memory, settings)


def _plan_model(recipe: Recipe, source, checked, problems: list[str], hub_may_be_unreachable: bool):
    """The model plan, or why there is none (problems extended); (plan, source, note): the source is None where the
    tokenizer and the weights cannot be read either (an unreachable hub model, a config that cannot be built)."""
    if source is None:
        return None, None, None
    try:
        return model_stage.plan_model(recipe, source, checked.labels if checked else recipe.data.labels), source, None
    except model_stage.ModelUnreachable as e:
        if hub_may_be_unreachable:
            return None, None, f"note: schema and data checked; the model checks need the hub: {e.problems[0]}"
        problems.extend(e.problems)
        return None, None, None  # no tokenizer either
    except model_stage.ConfigUnusable as e:
        problems.extend(e.problems)
        return None, None, None  # the tokenizer and the weights are read through the config
    except UserError as e:
        problems.extend(e.problems)
        return None, source, None


def plan_memory(
    recipe: RunSettings, plan: model_stage.ModelPlan | None, bundle
) -> tuple[fitting.MemoryPlan | None, str | None]:
    """The memory planner on the model plan, or without one (a hub model validate cannot reach) on the shape from
    lora_sft's table of known models; (None, why) when the shape is unknown."""
    try:
        shape = shapes.ModelShape.from_config(plan.config) if plan else shapes.known_shape(recipe.model.path)
    except (TypeError, ValueError, ZeroDivisionError):  # a config without a transformer's sizes
        shape = None
    if shape is None and plan is not None and recipe.train.memory_budget is not None:
        raise UserError(
            f"{recipe.where('train', 'memory_budget')}: lora_sft cannot estimate the memory of {recipe.model.path} (its config.json lacks hidden_size, num_hidden_layers, num_attention_heads or vocab_size); remove memory_budget and set train.micro_batch_size yourself"
        )
    if shape is None:  # train then uses the micro batch as written, and checkpointing on unless it is false
        why = (
            "its config has no transformer sizes"
            if plan is not None
            else "it is not in lora_sft's table of known models"
        )
        return None, f"note: no memory estimate for {recipe.model.path}: {why}"
    work = planner.workload(recipe, plan, shape, planner.sequence_of(bundle))
    return fitting.plan_memory(recipe, work), None


def train_steps(recipe: RunSettings, rows: int, processes: int = 1) -> int:
    """Optimizer steps over `rows` training rows (samples, or packed rows), counted as the Trainer does; with
    several processes each reads its share of every batch (the rows are split between them)."""
    t = recipe.train
    if t.max_steps:
        return t.max_steps
    per_epoch = max(math.ceil(math.ceil(rows / (t.micro_batch_size * processes)) / t.grad_accum), 1)
    return math.ceil(t.epochs * per_epoch)


def batch_text(recipe: RunSettings, processes: int = 1) -> str:
    """The batch one optimizer step sees, and how it is made: `batch 8 (2 x 4 accumulated)`; with several
    processes (torchrun, accelerate launch) the global batch, micro batch x accumulation x processes."""
    t = recipe.train
    if processes == 1:
        return f"batch {t.micro_batch_size * t.grad_accum} ({t.micro_batch_size} x {t.grad_accum} accumulated)"
    return f"global batch {t.micro_batch_size * t.grad_accum * processes} (micro batch {t.micro_batch_size} x {t.grad_accum} accumulated x {processes} processes)"


def adapter_size(trainable_params: int) -> str:
    """What the saved adapter weighs: its trainable parameters, saved in fp32."""
    size = trainable_params * 4
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


def _model_lines(recipe: RunSettings, plan) -> list[str]:
    """What `describe_plan` says of the model: where it is, its quantization, the LoRA layers, what trains."""
    q, lo = recipe.quant, recipe.lora
    quant = (
        "unquantized"
        if q.mode == "none"
        else q.mode + (" + double quant" if q.double_quant and q.mode != "int8" else "")
    )
    lines = []
    lines.append(f"model: {recipe.model.path} ({plan.source.origin}: {plan.source.path})")
    lines.append(
        f"quantization: {quant}, compute dtype {q.compute_dtype}; kept unquantized: {', '.join(plan.heads) or 'nothing'}"
    )
    leaves = sorted({n.rsplit(".", 1)[-1] for n in plan.targets})
    lines.append(
        f"lora: rank {lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g}{', rslora' if lo.rslora else ''}{', dora' if lo.dora else ''}{f', init {lo.init}' if lo.init != 'default' else ''} on {len(plan.targets)} modules ({', '.join(leaves)})"
    )
    if plan.modules_to_save:
        lines.append(f"trained in full: {', '.join(plan.modules_to_save)}")
    if plan.new_tokens:
        grown = f", embeddings grown to {plan.vocab_rows:,} rows" if plan.vocab_rows else ""
        trained = ", ".join(plan.trainable_tokens) or "in full (lora.modules_to_save)"
        lines.append(
            f"special tokens added for the chat template: {' '.join(plan.new_tokens)} (mean-initialized rows{grown}; their rows train in {trained})"
        )
    lines.append(
        f"trainable params: {plan.trainable_params:,} of {plan.total_params:,} ({100 * plan.trainable_params / plan.total_params:.2f}%)"
    )
    if plan.new_tokens:  # the adapter saves its trainable parameters in fp32
        lines.append(f"adapter size: about {adapter_size(plan.trainable_params)} (the trainable params in fp32)")
    return lines


def describe_plan(
    recipe: RunSettings, checked, plan, bundle=None, memory: fitting.MemoryPlan | None = None, processes: int = 1
) -> list[str]:
    """Lines saying what `train` would do with this recipe; `plan` and `bundle` (the tokenized data) are
    None when the model is unreachable, and the step count then comes from the rows before tokenizing.
    `memory`: the memory estimate, its verdict and the settings it resolved (micro batch, checkpointing).
    `processes`: how many processes train runs in (torchrun / accelerate launch): the global batch, the steps."""
    d, t = recipe.data, recipe.train
    eval_from = (
        f"from {', '.join(s.path for s in d.sources('eval'))}"
        if d.eval
        else f"{d.eval_fraction:.0%} of train, seed {recipe.seed}"
        if d.eval_fraction
        else "none"
    )
    # the Trainer steps through what was tokenized: packed rows, text chunks, samples left after dropping
    sized = bundle is not None and not d.streaming  # a stream has no length (data.streaming needs max_steps)
    steps = train_steps(recipe, len(bundle.train) if sized else len(checked.train), processes)
    lines = [f"task: {recipe.task}", *(_model_lines(recipe, plan) if plan is not None else [])]
    formats = ", ".join(sorted(d.formats()))
    arranged = ", packed" if d.packing else ", grouped by length" if recipe.grouped else ""
    streamed = f"streamed in blocks of {d.stream_buffer} rows (the first {len(checked.train)} checked now, the rest as they are read)"
    train_rows = streamed if d.streaming else f"{len(checked.train)} train rows"
    data_line = f"data: {formats}{arranged}, {train_rows}, {len(checked.eval)} eval rows ({eval_from}), max_length {d.max_length}"
    if bundle is not None and d.packing and "packed_rows" in bundle.stats.get("train", {}):
        data_line += f", packed into {bundle.stats['train']['packed_rows']} rows"
    if checked.labels:
        data_line += f", labels: {', '.join(checked.labels)}"
    lines.append(data_line)
    lines += data_warnings(bundle.stats) if bundle is not None else []
    lines.append(
        f"training: {amount(steps, 'step')} ({'max_steps' if t.max_steps else amount(t.epochs, 'epoch')}), {batch_text(recipe, processes)}, lr {t.lr:g} {t.scheduler}, {t.optimizer}, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}"
    )
    lines.append(f"output: {recipe.output_dir}")
    return lines + (memory.lines(processes) if memory is not None else [])
