"""Several processes under a launcher (torchrun, accelerate launch): which one this is, and waiting for each other.

lora_sft adds no process-group code of its own: the launcher sets RANK / LOCAL_RANK / WORLD_SIZE, accelerate's
`PartialState` (which the Trainer uses too) starts the process group, and the Trainer runs DDP or FSDP. This module
only answers "am I the process that writes?" and lets the others wait while it does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .recipe import Recipe


@dataclass(frozen=True)
class World:
    rank: int  # this process among all of them (0: the main process, the only one that writes)
    local_rank: int  # this process on its machine: the GPU it uses
    size: int  # processes in all

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from the launcher's variables (one process alone without a launcher)."""
    return World(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        size=int(os.environ.get("WORLD_SIZE", 1)),
    )


# ---------------------------------------------------------------- FSDP-QLoRA (train.distributed: fsdp)
# FSDP2 (torch's fully_shard, transformers 5's default) through the Trainer and accelerate: lora_sft picks the
# settings, accelerate wraps the model. The same settings come from recipes/accelerate/fsdp_qlora.yaml, whose
# variables (ACCELERATE_USE_FSDP, FSDP_*) accelerate launch sets; `uses_fsdp` reads them, so the 4-bit storage is
# right either way.

# TrainingArguments.fsdp_config for train.distributed: fsdp; recipes/accelerate/fsdp_qlora.yaml says the same
FSDP_CONFIG = {
    "version": 2,  # FSDP2: parameters stay the model's own (sharded DTensors), so use_orig_params is not needed
    # one shard group per decoder layer: the classes of the model's _no_split_modules (LlamaDecoderLayer, ...),
    # which accelerate reads from the model when no class is named
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "reshard_after_forward": True,  # full shard: a layer's weights are gathered for its forward and backward only
    # rank 0's weights are sent to the others when the model is sharded; transformers 5.24 and accelerate 1.15 skip
    # this for a 4-bit model, which every process loads (into CPU memory: `model.load_base`)
    "cpu_ram_efficient_loading": True,
    "state_dict_type": "FULL_STATE_DICT",  # checkpoints of the adapter whole, not one file per rank
}


def accelerate_fsdp() -> bool:
    """accelerate launch with an FSDP config (distributed_type: FSDP) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true", "yes")


def launched() -> bool:
    """A launcher (torchrun, accelerate launch) started this process, even as the only one (--nproc_per_node 1)."""
    return "LOCAL_RANK" in os.environ


def uses_fsdp(recipe: Recipe) -> bool:
    """FSDP-QLoRA settings apply: train.distributed fsdp, or auto under an accelerate FSDP config."""
    chosen = recipe.train.distributed
    return chosen == "fsdp" or (chosen == "auto" and accelerate_fsdp())


def fsdp_shards(recipe: Recipe) -> int:
    """The processes FSDP divides the model among; 0 when the model is not sharded (no FSDP, or no launcher)."""
    return world().size if uses_fsdp(recipe) and launched() else 0


def fsdp_arguments(recipe: Recipe) -> dict:
    """TrainingArguments for FSDP under a launcher. An accelerate FSDP config already configures accelerate (from
    its variables), and one process without a launcher has nothing to shard: neither needs arguments."""
    if not (uses_fsdp(recipe) and launched()) or accelerate_fsdp():
        return {}
    return {"fsdp": True, "fsdp_config": dict(FSDP_CONFIG)}


def fsdp_problems(recipe: Recipe) -> list[str]:
    """What cannot run under FSDP: a base or an adapter init FSDP cannot shard or save, a CPU, a contradicting
    accelerate config (train.optimizer is the schema's: `TrainSection`)."""
    import torch

    from .model import MUTATING_INITS, compute_dtype

    where = recipe.where("train", "distributed")
    from_config = recipe.train.distributed == "auto"
    if recipe.train.distributed == "ddp" and accelerate_fsdp():
        return [
            f"{where}: ddp, but accelerate launch was given an FSDP config (ACCELERATE_USE_FSDP=true); set train.distributed: fsdp (or auto), or launch with recipes/accelerate/ddp.yaml"
        ]
    if not uses_fsdp(recipe):
        return []
    why = "train.distributed auto under an accelerate FSDP config" if from_config else "train.distributed: fsdp"
    problems = []
    if recipe.quant.mode == "int8":
        problems.append(
            f"{recipe.where('quant', 'mode')}: int8 cannot be sharded by FSDP ({why}): its weights are int8 with per-row scales kept outside them; use quant.mode: nf4 (FSDP-QLoRA), or train.distributed: ddp"
        )
    if recipe.lora.init in MUTATING_INITS:
        problems.append(
            f"{recipe.where('lora', 'init')}: {recipe.lora.init} rewrites the base weights, which FSDP shards ({why}); use init: default, or train.distributed: ddp"
        )
    if launched() and not torch.cuda.is_available():
        problems.append(
            f"{where}: FSDP needs GPUs ({why}): accelerate runs FSDP on CUDA devices only, and CPU processes would each train the whole model (DDP); use train.distributed: ddp here"
        )
    if accelerate_fsdp():
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            problems.append(
                f"{where}: the accelerate config says fsdp_version {version}; lora_sft runs FSDP2 (FSDP1 is deprecated in transformers 5): set fsdp_version: 2, as recipes/accelerate/fsdp_qlora.yaml does"
            )
        # the Trainer's mixed precision casts every gathered weight to its dtype: the 4-bit storage must be that dtype
        wanted = {"bfloat16": "bf16", "float16": "fp16"}.get(
            str(compute_dtype(recipe.quant)).removeprefix("torch."), "no"
        )
        given = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if given not in ("no", wanted):
            problems.append(
                f"{recipe.where('quant', 'compute_dtype')}: the accelerate config's mixed_precision {given} differs from the compute dtype ({wanted if wanted != 'no' else 'fp32'}): FSDP would cast the 4-bit weights, stored in the compute dtype, to {given}; set mixed_precision: 'no' in the accelerate config (lora_sft sets it from quant.compute_dtype)"
            )
    return problems


def full_adapter_state(model) -> dict | None:
    """Under FSDP: the trainable tensors (the adapter) gathered whole onto the CPU of rank 0 (the other ranks get
    an empty dict); None when the model is not sharded, so peft saves from the model itself. A collective call:
    every process makes it, before rank 0 writes adapter/."""
    from torch.distributed.fsdp import FSDPModule

    if not any(isinstance(m, FSDPModule) for m in model.modules()):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)
