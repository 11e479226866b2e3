"""LoRA on the loaded base: peft's adapter on exactly the modules the plan resolved (checked after peft built it),
and the adapter inits that need more than peft's defaults (PiSSA/OLoRA's saved start, EVA's data pass, LoftQ)."""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from lora_sft import compat
from lora_sft.errors import UserError
from lora_sft.model.load import peft_wrap
from lora_sft.model.plan import ModelPlan, weight_files
from lora_sft.model.source import ModelSource
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.sections import LoraSection

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import (
        PreTrainedModel,
    )

    from lora_sft.settings import RunSettings


def add_lora(
    model: PreTrainedModel, recipe: Recipe | RunSettings, plan: ModelPlan, batches: InitBatches | None = None
) -> PeftModel:
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
    with peft_wrap():
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


def init_problems(recipe: Recipe, source: ModelSource, plan: ModelPlan | None = None) -> list[str]:
    """lora.init combinations that cannot run (dora pairings are refused by the schema); with the model plan, also
    a rank the init cannot give one of the targeted layers (`rank_problems`)."""
    return _base_problems(recipe, source) + (rank_problems(recipe, plan) if plan is not None else [])


# The most rank an init can give a layer of (in, out) features, and why: PiSSA takes the top singular directions of
# W, OLoRA a QR of W, EVA the top singular vectors of the layer's inputs. Above it peft builds A and B of fewer
# rows than lora.rank (pissa, olora: "peft made N parameters trainable, the plan counted M", exit 1 after the model
# loaded) or never converges (eva: its SVD cycles over the batches for more components than the inputs have).
RANK_LIMITS: dict[str, tuple[Callable[[int, int], int], str]] = {
    "pissa": (min, "pissa starts A and B from the weight's singular directions, of which it has min(in, out)"),
    "olora": (min, "olora starts A and B from a QR of the weight, which gives min(in, out) directions"),
    "eva": (lambda n_in, n_out: n_in, "eva starts A from the SVD of the layer's inputs, which have `in` directions"),
}


def rank_problems(recipe: Recipe, plan: ModelPlan) -> list[str]:
    """lora.rank above what lora.init can give a targeted layer (`RANK_LIMITS`), from the layers' shapes in the
    model plan (no weight loaded): one line naming the layer with the least room."""
    lora = recipe.lora
    if lora.init not in RANK_LIMITS:
        return []
    limit, why = RANK_LIMITS[lora.init]
    short = [(limit(*plan.linear_shapes[n]), n) for n in plan.targets if n in plan.linear_shapes]
    short = sorted((room, name) for room, name in short if room < lora.rank)
    if not short:
        return []
    room, name = short[0]
    n_in, n_out = plan.linear_shapes[name]
    more = f" (and {len(short) - 1} more targeted layers)" if len(short) > 1 else ""
    return [
        f"{recipe.where('lora', 'init')}: {lora.init} with lora.rank {lora.rank} cannot apply to {name} ({n_in} in, {n_out} out){more}: {why}, {room} there; set lora.rank to {room} or less, leave {name.rsplit('.', 1)[-1]} out of lora.target_modules, or use init: default"
    ]


def _base_problems(recipe: Recipe, source: ModelSource) -> list[str]:
    """lora.init against the base: its quant.mode, where its weights are."""
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
    if source.gguf is None and not weight_files(Path(source.path))[0]:  # a GGUF's are written before LoftQ runs
        return [
            f"{where}: loftq reads the unquantized weights from safetensors files, and {source.path} has none; convert the weights to safetensors"
        ]
    return []


# inits that move the top of each base weight into A and B, leaving the base a residual W - scale * B0 @ A0:
# adapter/ is saved converted (`save_initial`, rundir's `save_adapter`) to a plain LoRA for the original base
MUTATING_INITS = ("pissa", "olora")


def save_initial(recipe: Recipe | RunSettings, model: PeftModel) -> tempfile.TemporaryDirectory | None:
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

    recipe: Recipe | RunSettings
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


def init_from_data(
    peft_model: PeftModel, recipe: Recipe | RunSettings, plan: ModelPlan, batches: InitBatches | None
) -> None:
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
    from safetensors import safe_open

    stored: dict[str, Path] = {}
    for file in weight_files(folder)[0]:
        with safe_open(str(file), framework="pt") as f:
            stored.update(dict.fromkeys(f.keys(), file))
    prefix = getattr(peft_model.get_base_model(), "base_model_prefix", "") or ""
    lora_4bit = compat.lora_4bit_layer()
    for name, module in peft_model.named_modules():
        if not isinstance(module, lora_4bit):
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
