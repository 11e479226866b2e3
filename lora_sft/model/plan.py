"""The model plan: what a run will train, worked out on a weightless copy of the model built from its config (what
`validate` uses): the LoRA targets (`resolve_targets`, which `add_lora` uses too), the trainable parameters, the
heads kept unquantized, the added tokens' rows, and the weight files checked by their headers."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from lora_sft import compat
from lora_sft.errors import UserError, one_line
from lora_sft.model.source import (
    BUILD_ERRORS,
    PICKLE_SUFFIXES,
    ModelSource,
    config_place,
    load_config,
    task_class,
    unbuildable,
)
from lora_sft.paths import not_a_file
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.sections import LoraSection

if TYPE_CHECKING:
    from transformers import (
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )


LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|block|blocks)\.(\d+)\.")


def head_names(model: nn.Module) -> list[str]:
    """Top-level modules outside the base model (lm_head, a classifier): never quantized or LoRA'd."""
    base = model.base_model
    return [n for n, child in model.named_children() if child is not base and any(True for _ in child.parameters())]


def _linear_names(model: nn.Module, heads: list[str]) -> dict[str, nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return {
        n: m for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D) and n.split(".")[0] not in heads
    }


def resolve_targets(lora: LoraSection, model: nn.Module, heads: list[str], where: Callable[..., str]) -> list[str]:
    """Full names of the modules LoRA adapts, with peft's matching rules; a target matching nothing is an error."""
    linear = _linear_names(model, heads)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
    spec = lora.target_modules
    if spec == "all-linear":
        chosen = list(linear)
    elif isinstance(spec, str):
        chosen = [n for n in linear if re.fullmatch(spec, n)]
        if not chosen:
            raise UserError(
                f"{where('lora', 'target_modules')}: regex {spec!r} matches no linear module; names look like {next(iter(linear), '?')} (leaves: {', '.join(leaves)})"
            )
    else:
        import difflib

        problems, chosen = [], []
        for t in spec:
            hits = [n for n in linear if n == t or n.endswith("." + t)]
            if not hits:
                close = difflib.get_close_matches(t, leaves, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                problems.append(
                    f"{where('lora', 'target_modules')}: '{t}' matches no linear module ({hint}modules here: {', '.join(leaves)})"
                )
            chosen += [h for h in hits if h not in chosen]
        if problems:
            raise UserError(problems)
    if lora.layers is not None:
        found = {int(m.group(1)) for n in chosen if (m := LAYER_INDEX.search(n))}
        missing = sorted(set(lora.layers) - found)
        if missing:
            raise UserError(
                f"{where('lora', 'layers')}: no layer {missing} among the targets (layers here: {min(found, default=0)}..{max(found, default=-1)})"
            )
        chosen = [n for n in chosen if (m := LAYER_INDEX.search(n)) and int(m.group(1)) in lora.layers]
    if not chosen:
        raise UserError(
            f"{where('lora', 'target_modules')}: nothing to adapt (linear modules here: {', '.join(leaves)})"
        )
    return [n for n in linear if n in set(chosen)]


def expected_trainable(lora: LoraSection, model: nn.Module, targets: list[str], saved: list[str]) -> int:
    """Trainable parameters that LoRA on `targets` plus full copies of `saved` modules add."""
    modules = dict(model.named_modules())
    total = 0
    for name in targets:
        m = modules[name]
        n_in, n_out = (m.in_features, m.out_features) if isinstance(m, nn.Linear) else m.weight.shape
        total += lora.rank * (n_in + n_out) + (n_out if lora.dora else 0)
    for name in saved:
        total += sum(p.numel() for p in modules[name].parameters())
    return total


@dataclass
class ModelPlan:
    """What the model stage will do, worked out without loading weights."""

    source: ModelSource
    config: PretrainedConfig
    heads: list[str]
    targets: list[str]
    modules_to_save: list[str]
    total_params: int
    trainable_params: int
    weights: WeightNames | None = None  # what the weight files must hold; None: not checkable by name
    embedding: str = ""  # the input embedding module
    output_embedding: str | None = None  # the output layer when it is a weight of its own (untied), else None
    hidden: int = 0  # embedding width: parameters per token row
    rows: int = 0  # embedding rows of the base
    new_tokens: list[str] = field(default_factory=list)  # special tokens added for the chat template
    new_token_ids: list[int] = field(default_factory=list)  # their ids: rows mean-initialized, then trained
    vocab_rows: int | None = None  # embedding rows after resizing for them; None: the base's fit
    trainable_tokens: dict[str, list[int]] = field(default_factory=dict)  # peft's trainable_token_indices
    linear_shapes: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # (in, out) of the base's linear layers outside the heads: what quant.mode quantizes (the memory planner reads it)


@dataclass
class WeightNames:
    """The tensors the model built from config.json expects, as a checkpoint may name them."""

    shapes: dict[str, tuple[int, ...]]  # model key -> shape
    prefix: str  # base_model_prefix: checkpoints of the bare model omit it, task checkpoints have it
    optional: set[str]  # keys a checkpoint may lack: tied copies, a classification task's new head, declared ignores
    head: list[str]  # module names of a new head (classification), which from_pretrained initializes

    def normalize(self, key: str) -> str:
        key = key.removeprefix(f"{self.prefix}.") if self.prefix else key
        return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
            "LayerNorm.beta", "LayerNorm.bias"
        )  # legacy names transformers renames

    def is_new_head(self, key: str) -> bool:
        return any(key == h or key.startswith(f"{h}.") for h in self.head)


def _build_empty(recipe: Recipe, source: ModelSource, config: PretrainedConfig) -> PreTrainedModel:
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return task_class(recipe.task).from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except (ValueError, *BUILD_ERRORS) as e:
        raise unbuildable(recipe, source, e) from None


def _weight_names(recipe: Recipe, model: PreTrainedModel, heads: list[str]) -> WeightNames | None:
    if compat.converts_weights_on_load(model) or getattr(model.config, "quantization_config", None):
        return None  # checkpoints of this architecture are renamed or fused on load, or stored quantized
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source: the target need not be stored
    ignore = compat.ignored_missing_keys(model)
    head = heads if recipe.task == "classification" else []
    names = WeightNames(shapes, getattr(model, "base_model_prefix", "") or "", set(), head)
    names.optional = {k for k in shapes if k in tied or names.is_new_head(k) or any(p.search(k) for p in ignore)}
    return names


def plan_model(recipe: Recipe, source: ModelSource, labels: list[str] | None) -> ModelPlan:
    """Build the model with empty weights from its config and resolve the LoRA targets."""
    config = load_config(recipe, source, labels)
    model = _build_empty(recipe, source, config)
    heads = head_names(model)
    targets = resolve_targets(recipe.lora, model, heads, recipe.where)
    saved = list(dict.fromkeys(recipe.lora.modules_to_save + (heads if recipe.task == "classification" else [])))
    modules = dict(model.named_modules())
    for name in saved:
        if name not in modules:
            raise UserError(
                f"{recipe.where('lora', 'modules_to_save')}: no module named '{name}' (top level: {', '.join(n for n, _ in model.named_children())})"
            )
    total = sum(p.numel() for p in model.parameters())
    trainable = expected_trainable(recipe.lora, model, targets, saved)
    plan = ModelPlan(source, config, heads, targets, saved, total, trainable, _weight_names(recipe, model, heads))
    # nn.Linear weights are (out, in), transformers' Conv1D weights (in, out)
    plan.linear_shapes = {
        n: (int(w.shape[1]), int(w.shape[0])) if isinstance(m, nn.Linear) else (int(w.shape[0]), int(w.shape[1]))
        for n, m in _linear_names(model, heads).items()
        if isinstance(w := m.weight, torch.Tensor)
    }
    embedding = model.get_input_embeddings()
    if recipe.task == "causal_lm" and isinstance(embedding, nn.Embedding):
        names = {id(m): n for n, m in model.named_modules()}
        plan.embedding, plan.hidden, plan.rows = names[id(embedding)], embedding.embedding_dim, embedding.num_embeddings
        output = model.get_output_embeddings()
        if isinstance(output, nn.Linear):
            # tied: the same weight (a weightless model leaves the tie to its tied-keys table)
            tied = output.weight is embedding.weight or f"{names[id(output)]}.weight" in (
                getattr(model, "all_tied_weights_keys", None) or {}
            )
            plan.output_embedding = None if tied else names[id(output)]
            if tied and output.weight is not embedding.weight:  # an empty model is not tied yet: count it once
                plan.total_params -= output.weight.numel()
    return plan


def plan_tokens(plan: ModelPlan, tokenizer: PreTrainedTokenizerBase, added: list[int] | None) -> None:
    """Add to the plan the special tokens `load_tokenizer` added (`added`: their ids; None for a run's saved
    tokenizer, whose ids past the base's embedding rows are the added ones): the embedding rows to grow to,
    the rows peft trains (input embedding, and the output layer when untied), and the parameters they add."""
    if not plan.embedding:
        return
    n = len(tokenizer)
    ids = list(range(plan.rows, n)) if added is None else sorted(added)
    if not ids:
        return
    plan.new_token_ids = ids
    plan.new_tokens = cast("list[str]", tokenizer.convert_ids_to_tokens(ids))
    rows = max(plan.rows, max(ids) + 1)
    if rows > plan.rows:
        plan.vocab_rows = rows
        plan.total_params += (rows - plan.rows) * plan.hidden * (2 if plan.output_embedding else 1)
    layers = [plan.embedding] + ([plan.output_embedding] if plan.output_embedding else [])
    # a layer the recipe trains in full (lora.modules_to_save) already trains the new rows
    plan.trainable_tokens = {name: ids for name in layers if name not in plan.modules_to_save}
    plan.trainable_params += len(ids) * plan.hidden * len(plan.trainable_tokens)


# safetensors dtype names -> bytes per element
DTYPE_BYTES = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def _read_header(file: Path) -> tuple[dict, str | None]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets), or why it cannot be read."""
    if (kind := not_a_file(file)) is not None:
        return {}, f"is {kind}, not a weight file"
    try:
        return _header_of(file)
    except OSError as e:  # no read permission, an I/O error
        return {}, f"cannot read it ({e.strerror}); fix its permissions"


def _header_of(file: Path) -> tuple[dict, str | None]:
    """`_read_header` of a file that opens: the 8-byte little-endian length, then that much JSON."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return {}, f"truncated ({size} bytes, not even a header)"
        n = int.from_bytes(head, "little")
        if n > min(size - 8, MAX_HEADER):
            return {}, f"truncated or not safetensors (the header claims {n:,} bytes, the file has {size:,})"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            return {}, f"unreadable: its header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return {}, "unreadable: its header is not a table of tensors"
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, stop) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            return {}, f"unreadable: tensor {name!r} has no dtype, shape and data_offsets"
        width = DTYPE_BYTES.get(dtype)
        if width is not None and stop - begin != math.prod(shape) * width:
            return {}, f"unreadable: tensor {name} has {stop - begin:,} bytes for a {dtype} tensor of shape {shape}"
        tensors[name], end = tuple(shape), max(end, stop)
    if 8 + n + end > size:
        return (
            {},
            f"truncated: its tensors end at byte {8 + n + end:,}, the file has {size:,} (an interrupted download or copy?)",
        )
    return tensors, None


def weight_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The safetensors files from_pretrained would read: the index's shards, else model.safetensors (or any)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except OSError as e:
            return [], [f"{index}: cannot read it ({e.strerror}); fix its permissions"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return [], [f"{index}: unreadable index ({type(e).__name__}: {one_line(e)})"]
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            return [], [
                f"{index} names shards that are not there: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
            ]
        return [folder / n for n in names], []
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"], []
    return sorted(folder.glob("*.safetensors")), []


def check_weights(recipe: Recipe, plan: ModelPlan) -> list[str]:
    """The weight files of a local model, checked without loading them: each safetensors header parses
    and fits its file, and together they hold every tensor the model built from config.json expects, in
    its shape (a classification task's new head and tied copies excepted). Hub models are not checked."""
    if plan.source.origin == "hub" or plan.source.gguf is not None:
        return []  # a GGUF's tensor table was checked by gguf_source.inspect; lora_sft writes the folder itself
    folder, where = Path(plan.source.path), recipe.where("model", "path")
    files, problems = weight_files(folder)
    if problems:
        return [f"{where}: {p}" for p in problems]
    if not files:
        if recipe.model.allow_pickle and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
            return []  # pickle weights cannot be read without running them
        return [f"{where}: {folder} has no weight files (*.safetensors); save the model there with save_pretrained"]
    stored: dict[str, tuple[int, ...]] = {}
    for file in files:
        tensors, problem = _read_header(file)
        if problem:
            problems.append(f"{where}: {file}: {problem}")
        stored.update(tensors)
    if problems or plan.weights is None:
        return problems
    names = plan.weights
    by_name = {names.normalize(k): shape for k, shape in stored.items()}
    missing, wrong = [], []
    for key, shape in names.shapes.items():
        found = by_name.get(names.normalize(key))
        if found is None:
            if key not in names.optional:
                missing.append(key)
        elif found != shape and not names.is_new_head(key):
            wrong.append(f"{key} is {list(found)} in the files, {list(shape)} in the model config.json describes")
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        problems.append(
            f"{where}: the weights do not fit {config_place(recipe, plan.source)}: {'; '.join(wrong[:3])}{more}; the config (vocab_size, hidden_size, ...) and the weights come from different models"
        )
    if missing:
        problems.append(
            f"{where}: {folder}: {len(missing)} of the model's {len(names.shapes)} weights are missing from the weight files ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); they would train from random values"
        )
    return problems
