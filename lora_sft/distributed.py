"""Several processes under a launcher (torchrun, accelerate launch): which one this is, and what differs for it.

lora_sft adds no process-group code of its own: the launcher sets RANK / LOCAL_RANK / WORLD_SIZE, accelerate's
`PartialState` (which the Trainer uses too) starts the process group, and the Trainer runs DDP (or FSDP). This module
answers "am I the process that writes?", says where this process loads its model (`device_map`), what the Trainer
must be told (`trainer_arguments`), seeds each rank's dropout (`RankSeeds`) and makes every rank stop after the
same step on a signal (`agreed_signal`).

Data parallel (DDP) in short: every rank holds the whole 4-bit base and the adapter on its own device, reads its
share of each global batch (Trainer's sampler orders the data with `data_seed`, the same on every rank, and
accelerate hands the micro batches out in turn), and the adapter's gradients are averaged across ranks before each
optimizer step. The global batch is micro_batch_size x grad_accum x processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import TrainerCallback


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


def device_map() -> dict[str, int | str]:
    """Where this process loads the whole model: its own GPU (the launcher's LOCAL_RANK; 0 alone), or the CPU.

    Never "auto": under a launcher it would spread every rank's copy over all the machine's GPUs (and DDP needs
    each rank's model on one device)."""
    return {"": world().local_rank} if torch.cuda.is_available() else {"": "cpu"}


def trainer_arguments(recipe) -> dict:
    """What TrainingArguments must say to train across processes (merged into them with `**`; without a launcher
    the DDP settings act on nothing).

    - `ddp_find_unused_parameters=False`: every trainable parameter (LoRA A/B, a saved head, token rows) gets a
      gradient each step, so DDP need not search the graph for unused ones (Trainer's default searches for a
      peft model, which costs a graph traversal per step); checkpointing is non-reentrant (model.load_base),
      which DDP supports either way.
    - on CPU under a launcher: `use_cpu` and the gloo backend. Without them accelerate finds no GPU and sets up no
      distributed training: every process trains alone on the whole data, and all of them write one run.
    """
    args: dict = {"ddp_find_unused_parameters": False}
    if world().distributed and not torch.cuda.is_available():
        args |= {"use_cpu": True, "ddp_backend": "gloo"}
    return args


class RankSeeds(TrainerCallback):
    """Each rank's dropout (and NEFTune noise) from a seed of its own: `seed + rank`, set when training starts.

    What must be equal on every rank is seeded before this: the adapter's initial weights (`set_seed(recipe.seed)`
    before the model is built; DDP broadcasts rank 0's anyway) and the data order (Trainer's sampler draws from
    its own generator seeded with `data_seed`, not from the global RNG). Dropout masks must differ instead: with
    one seed every rank would drop the same units of its own rows. A resumed run restores each rank's RNG state
    from its checkpoint (`rng_state_{rank}.pth`) after this, so it continues each rank's stream exactly. One
    process alone is left as it was (Trainer seeds it with `seed`)."""

    def on_train_begin(self, args, state, control, **kwargs):
        if args.world_size > 1:
            from transformers import set_seed

            set_seed(args.seed + args.process_index)  # python, numpy, torch (and CUDA)


def agreed_signal(signum: int | None) -> int:
    """The signal any rank has received (0: none), known to every rank: a collective, called by every rank at the
    end of every step, so that all of them save the same checkpoint and stop after the same step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return signum or 0
    from accelerate import PartialState

    flag = torch.tensor([signum or 0], device=PartialState().device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())
