"""Several processes under a launcher (torchrun, accelerate launch): which one this is, and what differs for it.

lora_sft adds no process-group code of its own: the launcher sets RANK / LOCAL_RANK / WORLD_SIZE, accelerate's
`PartialState` (which the Trainer uses too) starts the process group, and the Trainer runs DDP (or FSDP). This module
answers "am I the process that writes?", what the Trainer
must be told (`trainer_arguments`), and makes every rank stop after the same step on a signal (`agreed_signal`);
train.py's `RankSeeds` seeds each rank's dropout.

Data parallel (DDP) in short: every rank holds the whole 4-bit base and the adapter on its own device, reads its
share of each global batch (Trainer's sampler orders the data with `data_seed`, the same on every rank, and
accelerate hands the micro batches out in turn), and the adapter's gradients are averaged across ranks before each
optimizer step. The global batch is micro_batch_size x grad_accum x processes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

import torch

T = TypeVar("T")
P = ParamSpec("P")
E = TypeVar("E", bound=BaseException)
N = TypeVar("N", int, float)


@dataclass(frozen=True)
class World:
    rank: int  # this process among all of them (0: the main process, the only one that writes)
    local_rank: int  # this process on its machine: the GPU it uses
    size: int  # processes in all
    launched: bool = False  # a launcher (torchrun, accelerate launch) started it, even as the only one

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


ALONE = World(rank=0, local_rank=0, size=1)

# ---------------------------------------------------------------- the launcher's variables (issue 23)
#
# torchrun and accelerate launch set all of these together. They are read in one place (`_read`), once per set of
# values, and checked whole (`check_launcher`, first thing in every command): a variable that is not a number, a
# rank outside the world, RANK without WORLD_SIZE (a process that thinks it is not the main one, alone, writes
# nothing), or several processes without the address they meet at, is one line naming the variable, exit 2.

VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
FIX = "unset it, or start lora_sft with torchrun --nproc_per_node N (or accelerate launch), which sets it"


@functools.lru_cache(maxsize=8)
def _read(values: tuple[str | None, ...]) -> tuple[World, tuple[str, ...]]:
    """This process's place from the launcher's variables (`VARIABLES`' values, None where unset), and what is wrong
    with them; an unreadable number counts as its default (a process alone), which `check_launcher` refuses."""
    env = dict(zip(VARIABLES, values, strict=True))
    problems: list[str] = []

    def number(name: str, default: int, least: int) -> int:
        text = env[name]
        if text is None:
            return default
        try:
            value = int(text.strip())
        except ValueError:
            value = least - 1
        if value < least:
            problems.append(
                f"{name}={text!r}: the launcher's {name} must be a whole number, {least} or more; {FIX} correctly"
            )
            return default
        return value

    size = number("WORLD_SIZE", 1, 1)
    rank, local_rank = number("RANK", 0, 0), number("LOCAL_RANK", 0, 0)
    if env["WORLD_SIZE"] is None and rank > 0:
        problems.append(
            f"RANK={rank} is set without WORLD_SIZE: this process would be process {rank} of one, which writes nothing (only process 0 writes); {FIX.replace('sets it', 'sets RANK and WORLD_SIZE together')}"
        )
    elif rank >= size:
        problems.append(f"RANK={rank} but WORLD_SIZE={size}: ranks run from 0 to {size - 1}; {FIX} correctly")
    if local_rank > rank and not problems:
        problems.append(
            f"LOCAL_RANK={local_rank} but RANK={rank}: a process's rank on its machine is never above its rank; {FIX} correctly"
        )
    launched = env["LOCAL_RANK"] is not None or size > 1
    if (
        launched and not problems
    ):  # torchrun sets all five; a process group starts from them (env://) and needs every one
        missing = [name for name in VARIABLES if not (env[name] or "").strip()]
        if missing:
            names = f"{missing[0]} is" if len(missing) == 1 else f"{', '.join(missing[:-1])} and {missing[-1]} are"
            given = f"WORLD_SIZE={size}" if size > 1 else f"LOCAL_RANK={env['LOCAL_RANK']}"
            problems.append(
                f"{given} but {names} not set: a launch needs RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; start lora_sft with torchrun --nproc_per_node {size} (or accelerate launch), which sets them all, or unset {given.split('=')[0]}"
            )
        port = (env["MASTER_PORT"] or "").strip()
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            problems.append(
                f"MASTER_PORT={port!r}: the port the processes meet at must be a number from 1 to 65535; {FIX} correctly"
            )
    return World(rank, local_rank, size, launched), tuple(problems)


def _values() -> tuple[str | None, ...]:
    return tuple(os.environ.get(name) for name in VARIABLES)


def world() -> World:
    """This process's place, from the launcher's variables (one process alone without a launcher)."""
    return _read(_values())[0]


def launcher_problems() -> list[str]:
    """What is wrong with the launcher's variables in this environment (none: a launcher's, or no launcher)."""
    return list(_read(_values())[1])


def check_launcher() -> None:
    """Refuse launcher variables that do not describe a launch, before anything is read or written."""
    if problems := launcher_problems():
        from lora_sft.errors import UserError

        raise UserError(problems)


def planned(processes: int | None) -> World:
    """The world `validate --nproc N` plans for: this process's place, under a launcher of N processes; None:
    this process's own (WORLD_SIZE under a launcher, else one process)."""
    me = world()
    if processes is None:
        return me
    return World(me.rank, me.local_rank, processes, launched=True)


# ---------------------------------------------------------------- the rank-0 rules (added for issue 10's "only rank 0 writes")
#
# Under a launcher every process runs the same command. Only the main process writes (the run directory, the
# tokenized-data cache, the console); the others wait where it writes something they read later. A step that can
# fail on one process shares its outcome with all of them (`agree`), so a failure stops every process with the
# same exit code and none waits forever for one that has gone; the main process says what failed.

# How long a process waits for the others (the main process tokenizing the data, writing a checkpoint): the
# Trainer's own default (TrainingArguments.ddp_timeout). Bigger data: fill the cache first with `validate`.
WAIT = timedelta(seconds=1800)


class Elsewhere(Exception):
    """Another process failed (the main process reports it); this one stops too, silently, with the same exit code."""

    def __init__(self, rank: int, code: int):
        self.rank, self.code = rank, code
        super().__init__(f"process {rank} failed (exit {code})")


def started() -> bool:
    """The process group is up (so the processes can wait for each other)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def start() -> None:
    """Under a launcher: start the process group now, through accelerate's PartialState (the Trainer's own
    PartialState later finds it started): gloo on CPU, the GPU backend on GPUs. Alone: nothing."""
    if not world().distributed or started():
        return
    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT)
    if not world().main:  # the main process speaks for all: no library progress bars or warnings from the others
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # "Loading weights" once, not once per process
        transformers_logging.set_verbosity_error()


def shared(error: BaseException) -> bool:
    """The error is one every process stops with (an `agree` shared it, or every process met it the same way):
    the main process prints it, the others stay silent."""
    return isinstance(error, Elsewhere) or bool(getattr(error, "every_rank", False))


def every_rank(error: E, agreed: bool = False) -> E:
    """Mark `error` as one every process raises the same way (a check all of them make on the same values);
    `agreed`: raised by `agree`, so every process is at the same point of the run."""
    error.every_rank = True  # type: ignore[attr-defined]
    error.agreed = agreed  # type: ignore[attr-defined]
    return error


def _outcome(error: BaseException | None) -> tuple[str, int, list[str]] | None:
    """What other processes need to know of a failure: its kind, exit code and lines."""
    from lora_sft.errors import RunError, UserError

    if error is None:
        return None
    if isinstance(error, Elsewhere):
        return ("elsewhere", error.code, [])
    if isinstance(error, UserError):
        return ("user", 2, error.problems)
    if isinstance(error, RunError):
        return ("run", error.code, [str(error)])
    return ("run", 1, [f"{type(error).__name__}: {error} (run again with --debug for the traceback)"])


def agree(error: BaseException | None = None) -> None:
    """Every process calls this at the same point, with its own error or None: if any process failed, every
    process raises. The one that failed re-raises its own error; the main process, if it did not fail, raises
    the first failing process's error (its lines prefixed with `rank N:`); the others raise `Elsewhere`. Alone,
    or without a process group: re-raises `error`. With no error anywhere it is a barrier."""
    if not world().distributed or not started():
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, _outcome(error))
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None and o[0] != "elsewhere"]
    failed = failed or [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    if error is not None:
        raise every_rank(error, agreed=True)
    rank, (kind, code, lines) = failed[0]
    if world().main and kind != "elsewhere":
        from lora_sft.errors import RunError, UserError

        lines = [f"rank {rank}: {line}" for line in lines]
        raise every_rank(UserError(lines) if kind == "user" else RunError("; ".join(lines), code), agreed=True)
    raise Elsewhere(rank, code)


def _attempt(step: Callable[..., T], *args, **kwargs) -> tuple[T | None, Exception | None]:
    try:
        return step(*args, **kwargs), None
    except Exception as e:  # shared with the others by `agree`, then raised again
        return None, e


def together(step: Callable[..., T], *args, **kwargs) -> T:
    """Run `step` on every process at once; a failure anywhere stops every process (`agree`)."""
    result, error = _attempt(step, *args, **kwargs)
    agree(error)
    return result  # type: ignore[return-value]


def main_first(step: Callable[..., T], *args, **kwargs) -> T:
    """Run `step` on the first process of each machine, then on the others, which then read what it wrote (the
    tokenized-data cache); a failure anywhere stops every process (`agree`). Alone: just `step`."""
    if not world().distributed or not started():
        return step(*args, **kwargs)
    first = world().local_rank == 0
    result, error = _attempt(step, *args, **kwargs) if first else (None, None)
    agree(error)
    if not first:
        result, error = _attempt(step, *args, **kwargs)
    agree(error)
    return result  # type: ignore[return-value]


def on_main(step: Callable[..., T], *args, **kwargs) -> T | None:
    """Run `step` on the main process only (it writes); the others wait for it and stop if it fails. Returns
    its result on the main process, None on the others."""
    if not world().distributed:
        return step(*args, **kwargs)
    result, error = _attempt(step, *args, **kwargs) if world().main else (None, None)
    agree(error)
    return result


def main_only(method: Callable[P, T]) -> Callable[P, T | None]:
    """A method that writes: it runs on the main process only, and does nothing on the others (which must not
    write the same files at the same time)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T | None:
        return method(*args, **kwargs) if world().main else None

    return wrapper


def _gathered(value: T) -> list[T]:
    """Every process's `value`, in rank order (alone, or before the process group: this one's)."""
    if not world().distributed or not started():
        return [value]
    import torch.distributed as dist

    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def total(value: N) -> N:
    """The sum of `value` over every process (a count or a sum each process keeps for its own batches)."""
    return sum(_gathered(value))


def least(value: T, key: Callable[[T], Any]) -> T:
    """The least of every process's `value` by `key`, the same on every process (the first in rank order on a
    tie)."""
    return min(_gathered(value), key=key)


def finish() -> None:
    """The CLI, after a run that succeeded: every process waits for the others (the main process writes the adapter,
    the card and runs the eval section and the push after training), then leaves the process group, so that no
    process exits with the group still open under it (gloo aborts such a process at exit)."""
    if not world().distributed or not started():
        return
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


def stop(error: BaseException, code: int) -> None:
    """The CLI, after reporting `error`: if every process stops with it at the same point (`agree` raised it),
    wait until all have reported it, so the main process has printed it before any process exits (the launcher
    ends the others as soon as one has exited), leave the process group, and exit with `code` at once.

    At once: without the interpreter's teardown, where torch's C++ objects end gloo's threads. A process stopped
    there once in CI by SIGABRT ("terminate called without an active exception"), after the error was printed, so
    torchrun named the abort, not the error, as the root cause (a race 29 runs here did not reproduce). Nothing
    is left to write: the error is printed, and no process writes after a failure."""
    if not (isinstance(error, Elsewhere) or getattr(error, "agreed", False)):
        return
    if not world().distributed or not started():
        return
    finish()
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream: nothing to flush
            stream.flush()
    os._exit(code)


# ---------------------------------------------------------------- FSDP-QLoRA (train.distributed: fsdp)
# FSDP2 (torch's fully_shard, transformers 5's default) through the Trainer and accelerate: lora_sft picks the
# settings, accelerate wraps the model. The same settings come from recipes/accelerate/fsdp_qlora.yaml, whose
# variables (ACCELERATE_USE_FSDP, FSDP_*) accelerate launch sets; `settings.uses_fsdp` reads them, so the 4-bit storage is
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
    return world().launched


def fsdp_arguments(fsdp: bool) -> dict:
    """TrainingArguments for FSDP (`fsdp`: the settings' FSDP-QLoRA) under a launcher. An accelerate FSDP config
    already configures accelerate (from its variables), and one process without a launcher has nothing to shard:
    neither needs arguments."""
    if not (fsdp and launched()) or accelerate_fsdp():
        return {}
    return {"fsdp": True, "fsdp_config": dict(FSDP_CONFIG)}


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


def trainer_arguments() -> dict:
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


def agreed_signal(signum: int | None) -> int:
    """The signal any rank has received (0: none), known to every rank: a collective, called by every rank at the
    end of every step, so that all of them save the same checkpoint and stop after the same step."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return signum or 0
    from accelerate import PartialState

    flag = torch.tensor([signum or 0], device=PartialState().device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())
