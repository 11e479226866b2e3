"""`init`: a commented recipe for a model and a data file, checked before it is written.

The data's format comes from its first rows (`formats.fitting_formats`), the task from the format, the sizes
(rank, learning rate, micro batch, max_length) from the model's parameter count, read from its config (a local
folder, the hub, or lora_sft's table of known models), and the header carries the memory planner's estimate,
as `validate` prints it. Nothing is written until all of that is known, and an existing file is never replaced.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lora_sft import data as data_stage
from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft.data import templates
from lora_sft.data.formats import FIELDS, fitting_formats
from lora_sft.data.read import read_source
from lora_sft.errors import UserError, printable
from lora_sft.model import fitting, planner, shapes
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.sections import Source
from lora_sft.settings import Machine, resolve

SAMPLE_ROWS = 20  # the rows a format is detected from
EFFECTIVE_BATCH = 16  # rows per optimizer step in every recipe init writes: micro batch x grad_accum


def task_of(fmt: str) -> str:
    """The task a format trains: classification rows a sequence classifier, every other format a causal LM."""
    return "classification" if fmt == "classification" else "causal_lm"


def _fields(value: dict) -> str:
    return "{" + ", ".join(map(str, value)) + "}"


def _mapping(data: str, value: dict) -> str:
    """A data.train source that maps the row's fields to a format's (`columns:` belongs to a source): two text
    fields as prompt and completion, in their order; otherwise the format's fields with placeholders."""
    texts = [k for k, v in value.items() if isinstance(v, str)]
    pair = (
        dict(zip(FIELDS["prompt_completion"], texts)) if len(texts) == 2 else {"prompt": "FIELD", "completion": "FIELD"}
    )
    columns = ", ".join(f"{ours}: {theirs}" for ours, theirs in pair.items())
    return f"data: {{train: {{path: {json.dumps(data)}, format: prompt_completion, columns: {{{columns}}}}}}}"


def detect_format(data: str) -> str:
    """The format the first SAMPLE_ROWS rows of `data` all fit; refused with the evidence when they fit several
    formats, none, or not the same one."""
    rows = read_source(Source(path=data), "--data")[:SAMPLE_ROWS]
    bad = [r.problem for r in rows if r.problem]
    if bad:
        raise UserError(bad)
    first, fits = rows[0], fitting_formats(rows[0].value or {})
    value = first.value or {}
    if not fits:
        needs = "; ".join(f"{f} needs {', '.join(need)}" for f, need in FIELDS.items())
        raise UserError(
            f"{first.place}: rows have fields {_fields(value)}: fits no format ({needs}); rename the fields, or write the recipe by hand and map them in the source (column mapping is per source): {_mapping(data, value)}"
        )
    if len(fits) > 1:
        raise UserError(f"{first.place}: rows have fields {_fields(value)}: fits {' and '.join(fits)}; pass --format")
    for row in rows[1:]:
        other = fitting_formats(row.value or {})
        if other != fits:
            said = " and ".join(other) if other else "no format"
            raise UserError(
                f"{row.place}: rows have fields {_fields(row.value or {})}: fits {said}, but {first.place} fits {fits[0]}; put each format in a file of its own, or pass --format"
            )
    return fits[0]


# ---------------------------------------------------------------- sizes for the model


@dataclass(frozen=True)
class Sizes:
    """The settings init picks for a model of a given size."""

    rank: int
    lr: float
    micro_batch: int
    max_length: int
    why: str  # the size class, for the header


def sizes_for(task: str, params: int | None, max_positions: int | None) -> Sizes:
    """Rank, learning rate, micro batch and max_length by parameter count: LoRA r16 and lr 2e-4 (QLoRA's) up to a few
    billion parameters, lr 1e-4 and one row per micro batch above; classifiers r8 at a higher lr, 512 tokens.
    max_length never exceeds what the model was built for (max_position_embeddings)."""
    if task == "classification":
        s = Sizes(8, 5e-4, 16, 512, "a classifier")
    elif params is None:
        s = Sizes(16, 1e-4, 1, 2048, "size unknown: set for a 7-8B model")
    elif params < 1e9:
        s = Sizes(16, 2e-4, 4, 2048, "under 1B parameters")
    elif params < 4e9:
        s = Sizes(16, 2e-4, 2, 2048, "1-4B parameters")
    elif params < 15e9:
        s = Sizes(16, 1e-4, 1, 2048, "4-15B parameters")
    else:
        s = Sizes(8, 1e-4, 1, 1024, "15B parameters or more")
    if max_positions:
        s = Sizes(s.rank, s.lr, s.micro_batch, min(s.max_length, max_positions), s.why)
    return s


def parameter_count(recipe: Recipe, plan: model_stage.ModelPlan | None, shape: shapes.ModelShape) -> int:
    """The base model's parameters: the plan's count, or the table shape's linear layers, embeddings and norms."""
    if plan is not None:
        return plan.total_params
    work = planner.workload(resolve(recipe, Machine.target("cpu")), None, shape, baseline=0)
    return sum(i * o for i, o in work.linears.values()) + work.unquantized_params


# ---------------------------------------------------------------- the recipe as text


def _doc(section: str | None, key: str) -> str:
    """The schema's docstring of a key, its first sentence: the comment beside it."""
    cls: Any = Recipe
    if section:
        cls = Recipe.model_fields[section].annotation
    text = (cls.model_fields[key].description or "").split(". ")[0].split("; ")[0].rstrip(".")
    return text if len(text) <= 80 else text[:77] + "..."


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def render(head: list[str], body: dict[str, Any], notes: dict[tuple[str, str], str]) -> str:
    """The recipe: the header comment, then each section's keys with the schema's docstring (or a note of ours)."""
    lines = [f"# {printable(h)}" if h else "#" for h in head]  # a name with a newline must not end the comment
    for name, value in body.items():
        if not isinstance(value, dict):
            lines.append(f"{name}: {_scalar(value)}  # {notes.get((name, ''), _doc(None, name))}")
            continue
        lines += ["", f"{name}:"]
        for key, item in value.items():
            lines.append(f"  {key}: {_scalar(item)}  # {notes.get((name, key), _doc(name, key))}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- init


def _chat_template(recipe: Recipe, source: model_stage.ModelSource, fmt: str, rows: list) -> tuple[str | None, str]:
    """A named chat template for chat rows when the tokenizer has none (a base model), and a line saying what was
    found: llama3 or chatml where the tokenizer has their markers as tokens already, else chatml (markers added)."""
    chats = fmt == "messages" or (fmt == "prompt_completion" and isinstance((rows[0].value or {}).get("prompt"), list))
    if not chats:
        return None, ""
    try:
        tokenizer = model_stage.load_tokenizer(recipe, source)
    except UserError as e:
        return None, f"chat template not checked ({e.problems[0]}); validate checks it"
    if tokenizer.chat_template:
        return None, "chat template: the tokenizer's own"
    for name in ("llama3", "chatml"):
        if all(model_stage.is_one_token(tokenizer, m) for m in templates.markers(name)):
            return name, f"chat template: {name} (the tokenizer has none; its tokens hold {name}'s markers)"
    return "chatml", "chat template: chatml (the tokenizer has none; its markers are added as trained special tokens)"


def _plan(recipe: Recipe, labels: list[str] | None) -> tuple[model_stage.ModelPlan | None, str]:
    """The model plan from its config (local folder or hub), or None with the reason when the hub cannot be read."""
    source = model_stage.resolve_source(recipe)
    try:
        return model_stage.plan_model(recipe, source, labels), ""
    except model_stage.ModelUnreachable as e:
        return None, e.problems[0]


def draft(model: str, data: str, fmt: str | None, task: str | None, out: str) -> str:
    """The text of the recipe `init` writes (nothing is written here)."""
    rows = read_source(Source(path=data), "--data")
    detected = fmt is None
    fmt = fmt or detect_format(data)
    task = _checked_task(task, fmt)
    body = _skeleton(model, data, fmt, task)
    recipe = Recipe.model_validate(body)
    checked = data_stage.check(recipe)  # every row, before anything is written; and the labels
    plan, unreachable = _plan(recipe, checked.labels)
    shape = shapes.ModelShape.from_config(plan.config) if plan else shapes.known_shape(model)
    params = parameter_count(recipe, plan, shape) if shape else None
    positions = getattr(plan.config, "max_position_embeddings", None) if plan else None
    s = sizes_for(task, params, positions)
    rows_n = len(checked.train)
    _apply_sizes(body, s, rows_n)
    recipe = Recipe.model_validate(body)
    source = model_stage.resolve_source(recipe)
    template, template_line = (None, "") if plan is None and unreachable else _chat_template(recipe, source, fmt, rows)
    if template:
        body["data"]["chat_template"] = template
        recipe = Recipe.model_validate(body)
    if plan is not None and s.rank != 16:  # planned with the default rank: the trainable count follows the rank
        plan, _ = _plan(recipe, checked.labels)
    # planned at the rows' tokenized lengths, as validate and train plan, not at max_length
    memory, no_estimate = preflight.plan_memory(resolve(recipe), plan, _tokenized(recipe, source, plan))
    found = _Findings(
        model=model,
        data=data,
        out=out,
        fmt=fmt,
        detected=detected,
        rows_n=rows_n,
        plan=plan,
        shape=shape,
        params=params,
        sizes=s,
        grad_accum=body["train"]["grad_accum"],
        unreachable=unreachable,
        template_line=template_line,
        memory=memory,
        no_estimate=no_estimate,
    )
    notes = {
        ("train", "grad_accum"): f"micro batches per optimizer step: {EFFECTIVE_BATCH} rows a step",
        ("lora", "alpha"): "scale alpha / rank = 2",
    }
    return render(_header(found), body, notes)


def _checked_task(task: str | None, fmt: str) -> str:
    """--task, or the format's task; refused when it does not train on rows of this format."""
    task = task or task_of(fmt)
    if task != task_of(fmt):
        raise UserError(
            f"--task {task}: {task} trains on {'classification rows (text, label)' if task == 'classification' else 'alpaca, prompt_completion, messages or text rows'}, and the data is {fmt}; leave --task out"
        )
    return task


def _skeleton(model: str, data: str, fmt: str, task: str) -> dict[str, Any]:
    """The recipe before the sizes: the model, the data and the output_dir named for them, 4-bit NF4."""
    slug = Path(model.rstrip("/")).name.lower().replace(".", "-") or "model"
    return {
        "task": task,
        "output_dir": f"runs/{slug}-{fmt}",
        "model": {"path": model},
        "quant": {"mode": "nf4"},
        "lora": {},
        "data": {"format": fmt, "train": data},
        "train": {},
    }


def _apply_sizes(body: dict[str, Any], s: Sizes, rows_n: int) -> None:
    """Set the LoRA rank, the eval split, max_length and the training settings in `body` for the model's size and
    the number of train rows."""
    body["lora"] = {"rank": s.rank, "alpha": 2 * s.rank, "target_modules": "all-linear"}
    if rows_n >= 20:  # an eval split of at least two rows, else none
        body["data"]["eval_fraction"] = 0.05 if rows_n >= 200 else 0.1
    body["data"]["max_length"] = s.max_length
    micro = s.micro_batch
    body["train"] = {
        "lr": s.lr,
        "epochs": 1 if rows_n >= 2000 else 3,
        "micro_batch_size": micro,
        "grad_accum": max(EFFECTIVE_BATCH // micro, 1),
        "gradient_checkpointing": "auto",
        "logging_steps": max(1, min(10, math.ceil(rows_n / EFFECTIVE_BATCH / 4))),
    }


@dataclass(frozen=True)
class _Findings:
    """What `draft` found out, for the recipe's header comment."""

    model: str
    data: str
    out: str
    fmt: str
    detected: bool  # the format was detected, not passed with --format
    rows_n: int  # train rows
    plan: model_stage.ModelPlan | None
    shape: shapes.ModelShape | None
    params: int | None
    sizes: Sizes
    grad_accum: int
    unreachable: str  # why the config was not read, or ""
    template_line: str  # what was found about the chat template, or ""
    memory: fitting.MemoryPlan | None
    no_estimate: str | None  # why there is no memory estimate


def _header(f: _Findings) -> list[str]:
    """The header comment: how the recipe was made, what was found about the data and the model, the memory
    estimate, and how to check and train it."""
    model, data, out, fmt, detected, s = f.model, f.data, f.out, f.fmt, f.detected, f.sizes
    memory, no_estimate, shape = f.memory, f.no_estimate, f.shape
    size = f"{f.params / 1e9:.2f}B parameters" if f.params else "parameter count unknown"
    where = f.plan.source.origin if f.plan else "not read"
    head = [
        f"Written by `python -m lora_sft init --model {model} --data {data}`{'' if detected else f' --format {fmt}'}.",
        f"Check it: python -m lora_sft validate {out}     Train: python -m lora_sft train {out}",
        f"data: {fmt} rows ({', '.join(FIELDS[fmt])}){', detected from the first rows' if detected else ''}; {f.rows_n} train rows",
        f"model: {model} (config: {where}{'; ' + shape.source if shape and shape.source != 'config.json' else ''}): {size}, {s.why}",
        f"  so: LoRA rank {s.rank}, lr {s.lr:g}, micro batch {s.micro_batch} x {f.grad_accum} accumulated, max_length {s.max_length}",
    ]
    if f.unreachable:
        head.append(f"config not read: {f.unreachable}")
    if f.template_line:
        head.append(f.template_line)
    head.append("")
    head += memory.lines() if memory else [no_estimate.removeprefix("note: ") if no_estimate else "no memory estimate"]
    head.append("")
    if memory and memory.estimate.total > memory.device.available:  # the verdict above says "does NOT fit"
        device = "the GPU" if memory.device.kind == "cuda" else "this machine"
        head += [
            f"More memory than {device} has: set train.memory_budget: auto (lora_sft picks the micro batch that fits),",
            "or lower data.max_length.",
        ]
    head.append("Every key: python -m lora_sft validate --explain " + out)
    return head


def _tokenized(recipe: Recipe, source: model_stage.ModelSource, plan: model_stage.ModelPlan | None):
    """The data tokenized as validate tokenizes it (its longest row is what the planner plans for), or None where the
    tokenizer cannot be read or a row does not tokenize: the plan is then at data.max_length, and validate says why."""
    if plan is None:
        return None
    try:
        return data_stage.build(recipe, model_stage.load_tokenizer(recipe, source))
    except UserError:
        return None


def init(model: str, data: str, fmt: str | None, task: str | None, out: str) -> Path:
    """Write the recipe to `out`, which must not exist; every check comes first."""
    path = Path(out)
    if path.exists():
        raise UserError(f"--out {out}: the file exists; init never replaces a file: pass another --out, or remove it")
    text = draft(model, data, fmt, task, out)
    try:
        with path.open("x", encoding="utf-8") as f:  # `x`: a file that appeared meanwhile is not replaced either
            f.write(text)
    except FileExistsError:
        raise UserError(f"--out {out}: the file exists; init never replaces a file: pass another --out") from None
    except OSError as e:
        raise UserError(f"--out {out}: cannot write it ({e.strerror})") from None
    return path
