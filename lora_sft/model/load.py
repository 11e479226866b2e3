"""Loading the base for training: quantized as the recipe says (bitsandbytes NF4 / FP4 / int8, or unquantized), in the
settings' compute dtype and device, frozen, its 4-bit layers kept in their trainable layout; and a saved adapter
loaded onto it with peft's own loader."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from lora_sft import compat
from lora_sft.errors import UserError
from lora_sft.model.plan import ModelPlan
from lora_sft.model.source import task_class
from lora_sft.recipe.sections import QuantSection

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import (
        BitsAndBytesConfig,
        PreTrainedModel,
    )

    from lora_sft.settings import RunSettings


def quantization_config(
    quant: QuantSection, skip: list[str], dtype: torch.dtype, fsdp: bool = False
) -> BitsAndBytesConfig | None:
    """bitsandbytes' settings for quant.mode, computing in `dtype`; `fsdp`: the 4-bit weights packed into tensors of the compute dtype
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
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype if fsdp else torch.uint8,
        llm_int8_skip_modules=skip,  # the name is historical: it applies to 4-bit too
    )


def load_base(settings: RunSettings, plan: ModelPlan, log: Callable[[str], object] | None = None) -> PreTrainedModel:
    """The frozen base, quantized as the recipe says, in the compute dtype, where the settings place it (a model FSDP
    will divide among the processes into CPU memory); heads stay unquantized. `log`: gets one line on a
    classification head (transformers' own load report is not printed)."""
    recipe = settings
    import bitsandbytes as bnb

    plan.source.weights_ready()
    with _quiet_load():
        loaded = task_class(recipe.task).from_pretrained(
            plan.source.path,
            config=plan.config,
            revision=recipe.model.revision,
            trust_remote_code=recipe.model.trust_remote_code,
            quantization_config=quantization_config(recipe.quant, plan.heads, settings.dtype, fsdp=settings.fsdp),
            dtype=settings.dtype,
            # FSDP: every process loads it (transformers 5.24's rank-0-only loading skips quantized models)
            device_map=settings.device_map,
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
            compat.keep_trainable_layout(module)
    # Training never generates; without a KV cache transformers also masks packed rows per sample.
    model.config.use_cache = False
    # "auto" is resolved by the memory planner before train loads the base; a caller that loads without it gets
    # checkpointing on, the setting that always fits
    if settings.train.gradient_checkpointing is not False:
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

    from lora_sft.console import bars_on_terminal_only

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
def peft_wrap():
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

    with peft_wrap():
        return PeftModel.from_pretrained(base, str(adapter))


# ---------------------------------------------------------------- lora.init: how A and B start
