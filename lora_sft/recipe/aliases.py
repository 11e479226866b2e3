"""Did-you-mean hints: other tools' names for our keys, and a pydantic error in the user's terms.

A key another tool (axolotl, TRL, transformers, peft, LLaMA-Factory) names differently is pointed to ours, and
a key at the top of a flat file to its section; any other unknown key gets the closest known one.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel

from lora_sft.recipe.schema import Recipe

# Names other tools (axolotl, TRL, transformers, peft) use for our keys, for did-you-mean hints.
ALIASES = {
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "r": "rank",
    "lora_r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "layers_to_transform": "layers",
    "use_rslora": "rslora",
    "use_dora": "dora",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "warmup_steps": "warmup",
    "warmup_ratio": "warmup",
    "lr_scheduler": "scheduler",
    "lr_scheduler_type": "scheduler",
    "optim": "optimizer",
    "sequence_len": "max_length",
    "max_seq_length": "max_length",
    "max_seq_len": "max_length",
    "base_model": "path",
    "model_name_or_path": "path",
    "val_set_size": "eval_fraction",
    "bnb_4bit_quant_type": "mode",
    "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype",
    "datasets": "train",
    "test_datasets": "eval",
    # LLaMA-Factory
    "lora_rank": "rank",
    "lora_target": "target_modules",
    "cutoff_len": "max_length",
    "val_size": "eval_fraction",
    "template": "chat_template",
    "train_on_prompt": "train_on_inputs",
    "new_special_tokens": "add_special_tokens",
    "quantization_bit": "mode",
    # axolotl, TRL, peft
    "special_tokens": "add_special_tokens",
    "neftune_noise_alpha": "neftune_alpha",
    "loraplus_lr_ratio": "lora_plus_ratio",
    "early_stopping_patience": "early_stopping",
    "init_lora_weights": "init",
}

# axolotl / TRL / transformers keys as they sit at the top of a flat file: our key in its section, or
# (a sentence) what to write instead where we have no such key. Our own key names at the top level
# (`lr:`) are pointed to their section without a table entry.
FLAT_KEYS = {
    "learning_rate": "train.lr",
    "num_epochs": "train.epochs",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "warmup_steps": "train.warmup",
    "warmup_ratio": "train.warmup",
    "lr_scheduler": "train.scheduler",
    "lr_scheduler_type": "train.scheduler",
    "optim": "train.optimizer",
    "lora_r": "lora.rank",
    "r": "lora.rank",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
    "lora_modules_to_save": "lora.modules_to_save",
    "layers_to_transform": "lora.layers",
    "use_rslora": "lora.rslora",
    "peft_use_rslora": "lora.rslora",
    "use_dora": "lora.dora",
    "peft_use_dora": "lora.dora",
    "sequence_len": "data.max_length",
    "max_seq_length": "data.max_length",
    "max_seq_len": "data.max_length",
    "sample_packing": "data.packing",
    "val_set_size": "data.eval_fraction",
    "datasets": "data.train",
    "test_datasets": "data.eval",
    "dataset": "data.train",
    "dataset_num_proc": "data.num_proc",
    "base_model": "model.path",
    "model_name_or_path": "model.path",
    "base_model_config": "model.path",
    "trust_remote_code": "model.trust_remote_code",
    "bnb_4bit_quant_type": "quant.mode",
    "bnb_4bit_use_double_quant": "quant.double_quant",
    "bnb_4bit_compute_dtype": "quant.compute_dtype",
    "hub_model_id": "hub.repo_id",
    "push_to_hub": "hub.repo_id",
    "bf16": "no such switch; set quant.compute_dtype: bf16",
    "fp16": "no such switch; set quant.compute_dtype: fp16",
    "tf32": "no such switch; quant.compute_dtype: auto picks the dtype",
    "load_in_4bit": "no such switch; set quant.mode: nf4 (the default)",
    "load_in_8bit": "no such switch; set quant.mode: int8",
    "adapter": "no such switch; lora_sft always trains a LoRA adapter (lora section)",
    "lora_target_linear": "no such switch; set lora.target_modules: all-linear (the default)",
    "model_type": "not needed; the model class comes from the model's config.json",
    "tokenizer_type": "not needed; the tokenizer comes from model.path",
    # LLaMA-Factory
    "lora_rank": "lora.rank",
    "lora_target": "lora.target_modules",
    "cutoff_len": "data.max_length",
    "val_size": "data.eval_fraction",
    "template": "data.chat_template",
    "train_on_prompt": "data.train_on_inputs",
    "new_special_tokens": "data.add_special_tokens",
    "quantization_bit": "no such switch; set quant.mode: nf4 (4 bits, the default) or int8 (8 bits)",
    # axolotl, TRL, peft
    "special_tokens": "data.add_special_tokens",
    "neftune_noise_alpha": "train.neftune_alpha",
    "loraplus_lr_ratio": "train.lora_plus_ratio",
    "early_stopping_patience": "train.early_stopping.patience",
    "init_lora_weights": "lora.init",
}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The schema classes inside a field's type (`Source` in `str | Source | list[str | Source]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def _section_class(loc: tuple) -> type[BaseModel] | None:
    """The schema class that owns the keys at `loc`, for did-you-mean suggestions."""
    cls: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list: same class as the list's items
        field = cls.model_fields.get(part)
        models = _models_in(field.annotation) if field else []
        if not models:
            return None
        cls = models[0]
    return cls


def describe(err: dict[str, Any], raw: dict) -> tuple[tuple, str]:
    """A pydantic error as (key path in the user's terms, message)."""
    loc, node, path = err["loc"], raw, []
    for part in loc:
        if (isinstance(node, dict) and part in node) or (
            isinstance(node, list) and isinstance(part, int) and part < len(node)
        ):
            path.append(part)
            node = node[part]
        elif err["type"] == "missing" and part == loc[-1]:
            path.append(part)
        else:
            err["_union_alternative"] = True  # a pydantic union tag ('str', 'list[str]'), not the user's key
    if not path:
        # the one rule that spans sections (task vs data.format) is reported on `task`
        path = ["task"]
    kind = err["type"]
    if kind == "extra_forbidden" and len(path) == 1 and _flat_key_hint(str(path[0])):
        return tuple(path), f"unknown key ({_flat_key_hint(str(path[0]))})"
    if kind == "extra_forbidden":
        owner = _section_class(tuple(path[:-1]))
        known = list(owner.model_fields) if owner else []
        alias = ALIASES.get(str(path[-1]))
        close = [alias] if alias in known else difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6)
        # another tool's name, or one of our keys, that belongs to another section (`train.lora_r`): point there
        elsewhere = None if alias in known else _flat_key_hint(str(path[-1]))
        hint = elsewhere or (f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}")
        return tuple(path), f"unknown key ({hint})"
    if kind == "missing":
        return tuple(path), "required key is missing"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    else:
        got = repr(err["input"])
        got = got if len(got) <= 60 else f"{got[:40]}... ({len(got)} characters)"
        msg = f"{msg[0].lower()}{msg[1:]} (got {got})"
    return tuple(path), msg


def _flat_key_hint(key: str) -> str | None:
    """For a key at the top of the file, or in the wrong section, that belongs in a section (axolotl and TRL
    files are flat)."""
    if key in FLAT_KEYS:
        target = FLAT_KEYS[key]
        return f"ours is {target}" if " " not in target else target
    owners = [name for name in Recipe.model_fields if (cls := _section_class((name,))) and key in cls.model_fields]
    return f"ours is {owners[0]}.{key}" if len(owners) == 1 else None
