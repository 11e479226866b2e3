"""Several processes under a launcher (torchrun, accelerate launch): which one this is, and waiting for each other.

lora_sft adds no process-group code of its own: the launcher sets RANK / LOCAL_RANK / WORLD_SIZE, accelerate's
`PartialState` (which the Trainer uses too) starts the process group, and the Trainer runs DDP or FSDP. This module
only answers "am I the process that writes?" and lets the others wait while it does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


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
