"""The settings a run trains with, fitted to its memory: the device's (or the named --target's) memory, the micro
batch and grad_accum under `train.memory_budget`, `train.gradient_checkpointing: auto`; a run that cannot fit is
refused with the settings that would make it fit, each with its estimate (`planner.estimate`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from lora_sft.errors import UserError
from lora_sft.model.planner import CUDA_CONTEXT, Estimate, Workload, estimate, gib, workload
from lora_sft.model.shapes import TABLE_NOTE, known_models
from lora_sft.recipe.training import memory_bytes

if TYPE_CHECKING:
    from lora_sft.settings import Machine, RunSettings


@dataclass(frozen=True)
class DeviceMemory:
    kind: str  # "cuda" or "cpu"
    total: int
    available: int  # what the run may take: free GPU memory + the context already counted, or MemAvailable + own RSS
    target: str | None = None  # validate --target: the machine named (else this one)
    note: str | None = None  # what the plan says of that machine

    @classmethod
    def of(cls, machine: Machine, baseline: int = 0) -> DeviceMemory:
        """What `machine` offers the run: a named one (validate --target) what its size leaves a run, this one what
        is free now."""
        if machine.total is not None and machine.memory is not None:
            return cls(machine.kind, machine.total, machine.memory, machine.name, machine.note)
        return cls.read(baseline)

    @classmethod
    def read(cls, baseline: int = 0) -> DeviceMemory:
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            # mem_get_info has created the context, which the estimate counts: add it back
            return cls("cuda", total, free + CUDA_CONTEXT)
        info = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, value = line.split(":", 1)
                    info[key] = int(value.split()[0]) * 1024
        except (OSError, ValueError):
            pass
        total = info.get("MemTotal", 0)
        # MemAvailable leaves out this process's own pages, which the estimate counts (its baseline)
        return cls("cpu", total, info.get("MemAvailable", total) + baseline)

    def describe(self) -> str:
        name = "GPU" if self.kind == "cuda" else "CPU memory"
        if self.target is not None:
            return (
                f"{name} of --target {self.target}: {gib(self.available)} available of {gib(self.total)} ({self.note})"
            )
        return f"{name}: {gib(self.available)} available of {gib(self.total)}"


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for the settings the run trains with, and how they were chosen."""

    estimate: Estimate
    device: DeviceMemory
    budget: int | None  # bytes (train.memory_budget), None without one
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    work: Workload = field(repr=False)
    picked: str | None = None  # what the budget or `auto` decided, as a line

    def apply(self, settings: RunSettings) -> RunSettings:
        """The settings training uses: these picks in their train section (recipe.yaml still gets the user's)."""
        return settings.with_memory(
            micro_batch_size=self.micro_batch_size,
            grad_accum=self.grad_accum,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def lines(self, processes: int = 1) -> list[str]:
        """The estimate, term by term, and its verdict. `processes` > 1 (DDP under a launcher): the estimate is
        per process, each holding the whole quantized model on its own GPU."""
        e, w = self.estimate, self.work
        source = f"; {TABLE_NOTE}" if w.shape.source == TABLE_NOTE else ""
        where = f"on {'the GPU' if e.device == 'cuda' else 'the CPU'}"
        if processes > 1:  # DDP: every process holds the whole quantized model and its own activations
            where = f"per {'GPU' if e.device == 'cuda' else 'process'} ({processes} processes, each holding the whole model)"
        out = [
            f"memory estimate {where}: {gib(e.total)} at micro batch {e.micro_batch}, sequence {e.sequence} ({w.sequence_from}), gradient checkpointing {'on' if e.checkpointing else 'off'}{source}"
        ]
        out += [f"  {t.name}: {gib(t.bytes)} ({t.how})" for t in e.terms]
        out += [f"  note: {n}" for n in e.notes]
        limit = self.budget if self.budget is not None else self.device.available
        against = f"the budget of {gib(self.budget)}" if self.budget is not None else self.device.describe()
        verdict = "fits" if e.total <= limit else "does NOT fit (the run may run out of memory)"
        out.append(f"verdict: {verdict} in {against}")
        if self.picked:
            out.append(self.picked)
        return out


def budget_bytes(settings: RunSettings, device: DeviceMemory) -> int | None:
    b = settings.train.memory_budget
    return None if b is None else device.available if b == "auto" else memory_bytes(b)


def _choices(settings: RunSettings) -> list[bool]:
    g = settings.train.gradient_checkpointing
    return [False, True] if g == "auto" else [bool(g)]


def plan_memory(
    settings: RunSettings,
    work: Workload,
    device: DeviceMemory | None = None,
    keep_micro_batch: int | None = None,
) -> MemoryPlan:
    """The settings the run trains with. With train.memory_budget: the largest micro batch (a divisor of the
    effective batch) that fits, checkpointing off whenever some micro batch fits without it (recomputation costs
    about a third of every step; a smaller micro batch at the same effective batch costs less), else on; a run
    that cannot fit is refused. Without a budget: the recipe's micro batch, and `auto` checkpointing on only when
    the run would not fit the device's available memory without it. `keep_micro_batch`: a resumed run keeps the
    micro batch its checkpoint was trained with (its data order depends on it), under a budget; refused if it no
    longer fits."""
    device = device or DeviceMemory.of(settings.machine, work.baseline)
    t = settings.train
    effective = t.micro_batch_size * t.grad_accum
    budget = budget_bytes(settings, device)

    def made(micro: int, ckpt: bool, picked: str | None) -> MemoryPlan:
        return MemoryPlan(
            estimate(settings, work, micro, ckpt), device, budget, micro, effective // micro, ckpt, work, picked
        )

    if budget is None:  # the micro batch as written (a resume keeps it too), checkpointing by the device
        micro, fixed = t.micro_batch_size, t.gradient_checkpointing
        if fixed != "auto":
            return made(micro, bool(fixed), None)
        off = estimate(settings, work, micro, False)
        ckpt = off.total > device.available
        why = "more than" if ckpt else "within"
        return made(
            micro,
            ckpt,
            f"gradient checkpointing (auto): {'on' if ckpt else 'off'}, the run without it needs about {gib(off.total)}, {why} the {gib(device.available)} available",
        )
    micros = [keep_micro_batch] if keep_micro_batch else [m for m in range(effective, 0, -1) if effective % m == 0]
    for ckpt in _choices(settings):
        for micro in micros:
            e = estimate(settings, work, micro, ckpt)
            if e.total <= budget:
                kept = " (the micro batch of the checkpoint resumed from)" if keep_micro_batch else ""
                return made(
                    micro,
                    ckpt,
                    f"picked for the budget of {gib(budget)}: micro batch {micro}{kept} x grad_accum {effective // micro} (effective batch {effective} kept), gradient checkpointing {'on' if ckpt else 'off'}: about {gib(e.total)}",
                )
    raise UserError(refusal(settings, work, budget, keep_micro_batch))


def refusal(settings: RunSettings, work: Workload, limit: int, kept: int | None = None) -> list[str]:
    """Why the run cannot fit `limit`, and the settings that would make it fit, each with its estimate."""
    where = settings.where("train", "memory_budget")
    micro, ckpt = kept or 1, _choices(settings)[-1]
    least = estimate(settings, work, micro, ckpt)
    big = sorted(least.terms, key=lambda t: -t.bytes)[:3]
    lines = [
        f"{where}: the run needs about {gib(least.total)} even at micro batch {micro}{' (the checkpoint resumed from was trained with it)' if kept else ''} with gradient checkpointing {'on' if ckpt else 'off'}, more than the budget of {gib(limit)} (largest: {', '.join(f'{t.name} {gib(t.bytes)}' for t in big)})"
    ]
    for setting, total in fixes(settings, work, limit, micro, ckpt):
        lines.append(f"{where}: it fits with {setting}: about {gib(total)}")
    if len(lines) == 1:
        lines.append(
            f"{where}: nothing lora_sft can change makes it fit; raise the budget or use a device with more memory"
        )
    return lines


def fixes(settings: RunSettings, work: Workload, limit: int, micro: int, ckpt: bool) -> list[tuple[str, int]]:
    """Settings that would make the run fit `limit` (at `micro`, `ckpt`), each with its estimate."""
    out = []
    # a shorter data.max_length: the longest power of two below the sequence that fits
    length = 2 ** (max(work.sequence - 1, 1).bit_length() - 1)
    while length >= 64:
        e = estimate(settings, replace(work, sequence=length), micro, ckpt)
        if e.total <= limit:
            out.append((f"data.max_length={length}", e.total))
            break
        length //= 2
    # bitsandbytes' optimizers are refused under FSDP (settings.TrainSection), which divides the states anyway
    if settings.train.optimizer not in ("adamw_8bit", "paged_adamw_8bit", "sgd") and not work.shards:
        optimizer = "paged_adamw_8bit" if work.device == "cuda" else "adamw_8bit"
        e = estimate(
            replace(settings, train=settings.train.model_copy(update={"optimizer": optimizer})), work, micro, ckpt
        )
        if e.total <= limit:
            out.append((f"train.optimizer={optimizer}", e.total))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in work.targets})
    fewer = [x for x in ("q_proj", "v_proj") if x in leaves] or leaves[:1]
    if len(fewer) < len(leaves):
        targets = {n: s for n, s in work.targets.items() if n.rsplit(".", 1)[-1] in fewer}
        e = estimate(settings, replace(work, targets=targets), micro, ckpt)
        if e.total <= limit:
            out.append((f"lora.target_modules=[{', '.join(fewer)}]", e.total))
    if settings.quant.mode in ("none", "int8"):
        quant = settings.quant.model_copy(update={"mode": "nf4", "double_quant": True})
        nf4 = replace(settings, recipe=settings.recipe.model_copy(update={"quant": quant}))
        e = estimate(nf4, work, micro, ckpt)
        if e.total <= limit:
            out.append(("quant.mode=nf4", e.total))
    smaller = []
    for name, shape in known_models().items():
        # the same run on another model of the table, on this run's device
        other = replace(workload(settings, None, shape, work.sequence, work.baseline), device=work.device)
        e = estimate(settings, other, micro, ckpt)
        params = sum(i * o for i, o in other.linears.values()) + other.unquantized_params
        ours = sum(i * o for i, o in work.linears.values()) + work.unquantized_params
        if e.total <= limit and params < ours:
            smaller.append((e.total, name))
    if smaller:
        total, name = max(smaller)
        out.append((f"a smaller model, e.g. model.path={name}", total))
    return out
