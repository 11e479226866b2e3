"""The run's settings, resolved once: what the recipe means on this machine (or one named with `--target`) under
this launcher.

The recipe says what the user asked for; several of its values only mean something on a machine: compute dtype
`auto` is bf16 on a GPU with native bf16 and fp32 elsewhere, `train.distributed auto` is FSDP only under an
accelerate FSDP config, `data.group_by_length` acts only on unpacked causal-LM samples, the model goes to this
process's GPU or to the CPU. Each such rule lives here, once. The preflight builds a `RunSettings` from the recipe,
the machine and the launcher (`resolve`), the memory planner fills in the micro batch and checkpointing it picked
(`with_memory`), and the stages take it in place of the recipe: they read the same section names (`settings.quant`,
`settings.lora`, `settings.train`, ...) and the facts resolved here (`settings.dtype`, `settings.fsdp`, ...), and
never derive them again.

A `Machine` is this one (`Machine.here`) or one the user names (`validate --target cuda:24GiB`), so a laptop
without a GPU can check a GPU recipe with that GPU's compute dtype and allocator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from lora_sft import distributed
from lora_sft.distributed import World
from lora_sft.errors import UserError
from lora_sft.recipe.training import memory_bytes

if TYPE_CHECKING:
    from lora_sft.recipe.schema import Recipe
    from lora_sft.recipe.sections import DataSection, EvalSection, HubSection, LoraSection, ModelSection, QuantSection
    from lora_sft.recipe.training import TrainSection

# What a named GPU offers a run of its memory: the rest goes to the display, other programs and the driver (the
# recipe library's GPU sizes are planned against this share).
GPU_USABLE = 0.9
# What an Apple-silicon Mac offers a run of its unified memory (macOS keeps the rest for itself and other programs).
MAC_USABLE = 0.75
TARGET = re.compile(r"^(?P<kind>cuda|mps|cpu)(?::(?P<size>\d+(?:\.\d+)?\s*[KMGT]i?B))?$")
TARGETS = "cuda:24GiB, cuda:8GiB, mps:16GiB, cpu or cpu:32GiB"


@dataclass(frozen=True)
class Machine:
    """The machine a run is planned for. `kind` is where lora_sft trains there: a CUDA GPU or the CPU (an
    Apple-silicon Mac trains on its CPU cores: lora_sft loads the 4-bit base with bitsandbytes on CUDA or CPU).
    `memory`: what the run may take, in bytes; None reads this machine's free memory when planning."""

    kind: Literal["cuda", "cpu"]
    bf16: bool | None  # native bf16 (a GPU of compute capability 8.0 and up); None: ask this machine's GPU
    name: str  # how the plan names it: "this machine", or the --target as given
    total: int | None = None  # its memory in all (named machines; this one is read when planning)
    memory: int | None = None
    note: str | None = None  # what the plan says of the target

    @property
    def named(self) -> bool:
        return self.total is not None

    def native_bf16(self) -> bool:
        """bf16 runs natively here: what compute dtype auto picks (torch's default also counts the slow emulation of
        older GPUs, which `including_emulation=False` leaves out)."""
        if self.kind != "cuda":
            return False
        return self.bf16 if self.bf16 is not None else torch.cuda.is_bf16_supported(including_emulation=False)

    @classmethod
    def here(cls) -> Machine:
        return cls("cuda" if torch.cuda.is_available() else "cpu", None, "this machine")

    @classmethod
    def target(cls, text: str) -> Machine:
        """`cuda:24GiB` (a GPU of that size, with bf16: an RTX 30xx or newer), `mps:16GiB` (an Apple-silicon Mac of
        that unified memory), `cpu` (this machine's CPU memory) or `cpu:32GiB`."""
        m = TARGET.match(text.strip())
        if m is None or (m["kind"] != "cpu" and not m["size"]):
            raise UserError(f"--target {text}: not a machine lora_sft can plan for; use one of {TARGETS}")
        if m["kind"] == "cpu" and not m["size"]:
            return cls("cpu", False, text)
        size = memory_bytes(m["size"].replace(" ", ""))
        if m["kind"] == "cuda":
            usable = int(size * GPU_USABLE)
            return cls("cuda", True, text, size, usable, f"a GPU leaves a run about {GPU_USABLE:.0%} of its memory")
        if m["kind"] == "cpu":
            return cls("cpu", False, text, size, size, "the CPU memory named")
        note = f"an Apple-silicon Mac: lora_sft trains on its CPU cores in fp32 (bitsandbytes' 4-bit layers run on CUDA or the CPU); macOS and other programs keep about {1 - MAC_USABLE:.0%} of its unified memory"
        return cls("cpu", False, text, size, int(size * MAC_USABLE), note)


def compute_dtype(quant: QuantSection, machine: Machine) -> torch.dtype:
    """quant.compute_dtype on `machine`: auto is bf16 where the GPU runs it natively, else fp32."""
    if quant.compute_dtype == "auto":
        return torch.bfloat16 if machine.native_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quant.compute_dtype]


def uses_fsdp(recipe: Recipe | RunSettings) -> bool:
    """FSDP-QLoRA settings apply: train.distributed fsdp, or auto under an accelerate FSDP config."""
    chosen = recipe.train.distributed
    return chosen == "fsdp" or (chosen == "auto" and distributed.accelerate_fsdp())


def groups_by_length(recipe: Recipe | RunSettings) -> bool:
    """data.group_by_length where it acts: causal_lm samples, unpacked (packed rows are all about max_length)."""
    d = recipe.data
    return d.group_by_length and recipe.task == "causal_lm" and not (d.packing or d.streaming)


@dataclass(frozen=True)
class RunSettings:
    """What a run trains with: the recipe's sections (the train section as the memory planner resolved it) and the
    facts they mean on the machine under the launcher. Built once, by `resolve`; never changed (`with_memory`
    gives a new one)."""

    recipe: Recipe = field(repr=False)  # as the user wrote it: what recipe.yaml saves, `where` for messages
    machine: Machine
    world: World
    train: TrainSection  # the recipe's, with the memory plan's micro batch, grad_accum and checkpointing
    dtype: torch.dtype  # the compute dtype (quant.compute_dtype on the machine)
    fsdp: bool  # the FSDP-QLoRA settings apply (the 4-bit storage in the compute dtype)
    shards: int  # the processes FSDP divides the model among; 0: not sharded (no FSDP, or no launcher)
    grouped: bool  # data.group_by_length acts (Trainer's length-grouped sampler)

    # the sections as written, and the recipe's top-level values
    @property
    def task(self) -> str:
        return self.recipe.task

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def model(self) -> ModelSection:
        return self.recipe.model

    @property
    def quant(self) -> QuantSection:
        return self.recipe.quant

    @property
    def lora(self) -> LoraSection:
        return self.recipe.lora

    @property
    def data(self) -> DataSection:
        return self.recipe.data

    @property
    def eval(self) -> EvalSection:
        return self.recipe.eval

    @property
    def hub(self) -> HubSection:
        return self.recipe.hub

    @property
    def output_dir(self) -> str:
        return self.recipe.output_dir

    def where(self, *path: str | int) -> str:
        """`file:line: key.path` of a recipe key, for messages."""
        return self.recipe.where(*path)

    def saved_dict(self) -> dict[str, Any]:
        """The recipe as the run directory saves it (the user's train section, absolute paths)."""
        return self.recipe.saved_dict()

    @property
    def sharded(self) -> bool:
        return self.shards > 0

    @property
    def device_map(self) -> dict[str, int | str]:
        """Where this process loads the base: under FSDP into CPU memory (FSDP moves each layer's shard to this
        process's GPU, so the whole model never sits on one GPU); else its own GPU, or the CPU. Never "auto": under a
        launcher it would spread every rank's copy over all the machine's GPUs (DDP needs each on one device)."""
        if self.sharded:
            return {"": "cpu"}
        return {"": self.world.local_rank} if self.machine.kind == "cuda" else {"": "cpu"}

    def as_written(self) -> RunSettings:
        """These settings with the train section as the recipe says it (before the memory planner's picks)."""
        return replace(self, train=self.recipe.train)

    def with_memory(self, micro_batch_size: int, grad_accum: int, gradient_checkpointing: bool) -> RunSettings:
        """These settings with the memory planner's picks in the train section (recipe.yaml keeps the user's)."""
        train = self.train.model_copy(
            update={
                "micro_batch_size": micro_batch_size,
                "grad_accum": grad_accum,
                "gradient_checkpointing": gradient_checkpointing,
            }
        )
        return replace(self, train=train)


def resolve(recipe: Recipe, machine: Machine | None = None, world: World | None = None) -> RunSettings:
    """The settings of `recipe` on `machine` (this one by default) under the launcher that started this process."""
    machine = machine or Machine.here()
    world = world or distributed.world()
    fsdp = uses_fsdp(recipe)
    return RunSettings(
        recipe=recipe,
        machine=machine,
        world=world,
        train=recipe.train,
        dtype=compute_dtype(recipe.quant, machine),
        fsdp=fsdp,
        shards=world.size if fsdp and world.launched else 0,
        grouped=groups_by_length(recipe),
    )
