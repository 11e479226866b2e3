"""Checkpoints that survive a crash.

Trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, trainer_state.json with the
step, which is the data position) into the folder its `output_dir` names. lora_sft points that at
`checkpoints/.staging/`, so a checkpoint is first written where nothing is resumed from; `AtomicCheckpoints`
(a `TrainerCallback`, public hooks only) then, in `on_save`, writes the counts file (tokens counted, the
recipe identity: it is the completion marker, written last), fsyncs every file, renames the folder to
`checkpoints/checkpoint-N`, fsyncs the parent and keeps the last K. Only `checkpoint-N` folders holding
the marker are ever resumed from, so a save cut short (a kill, a full disk) is never picked up. A save
that fails is reported by `save_errors`: the previous checkpoint is intact and says so. Whether a run may start,
resume or overwrite is `run.start`'s.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from transformers import TrainerCallback

from lora_sft import distributed
from lora_sft.distributed import world
from lora_sft.errors import RunError
from lora_sft.run.records import Manifest
from lora_sft.run.rundir import RunDir

if TYPE_CHECKING:
    pass

STAGING = ".staging"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.json"  # Trainer's name; it holds the step
COUNTS = "lora_sft_counts.json"  # the trainer's own running totals (tokens seen and trained)
EXTRA = "lora_sft_{}.json"  # a state saved beside the counts (`AtomicCheckpoints` extras): lora_sft_stream.json
STREAM = EXTRA.format("stream")  # data.streaming: where the stream's steps ended
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's name
OPTIMIZER, SCHEDULER, SCALER = "optimizer.pt", "scheduler.pt", "scaler.pt"  # Trainer's names


def rng_files(processes: int) -> list[str]:
    """Trainer's RNG state files: one for a single process, one per process under a launcher."""
    return ["rng_state.pth"] if processes == 1 else [f"rng_state_{rank}.pth" for rank in range(processes)]


def fsync_tree(folder: Path) -> None:
    """Flush every file of `folder` and the folder entries themselves to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def complete(checkpoint: Path) -> bool:
    """A checkpoint whose save finished: Trainer's state file and, written after everything else, the marker."""
    return (checkpoint / STATE).is_file() and (checkpoint / COUNTS).is_file()


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and complete(p)]
    return [p for _, p in sorted(found)]


def step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / STATE).read_text())["global_step"]


def micro_batch_of(checkpoint: Path) -> int | None:
    """The micro batch a checkpoint was trained with (Trainer's train_batch_size), or None if it does not say."""
    try:
        size = json.loads((checkpoint / STATE).read_text()).get("train_batch_size")
    except (OSError, ValueError, AttributeError):
        return None
    return size if isinstance(size, int) and size > 0 else None


def staging(folder: Path) -> Path:
    """Where Trainer writes a checkpoint (its `output_dir`) before `AtomicCheckpoints` moves it into `folder`."""
    return folder / STAGING


# What a checkpoint save can raise: the OS refusing a write (a full disk, EFBIG, permissions), torch.save's
# RuntimeError, safetensors' own error. Anything else (a Trainer API change) is not a disk problem.
SAVE_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError, SafetensorError)


class AtomicCheckpoints(TrainerCallback):
    """One job: a checkpoint appears as `checkpoints/checkpoint-N`, with its completion marker, only once every
    byte is on disk; the last `keep` complete checkpoints are kept.

    `counts` returns the trainer's running totals (tokens seen and trained), saved in the marker so a resumed
    run's totals are whole; `identity` is what a resumed run must share with this one (see `identity`).

    Under a launcher every process calls these hooks, and Trainer writes a checkpoint from several processes (the
    main one writes the adapter, optimizer and state; each writes its own rng_state_N.pth). Only the main process
    clears, marks, moves and rotates, and only once every process has written its files; the marker holds the
    counts summed over the processes. A failure there stops every process (`distributed.agree`)."""

    def __init__(self, folder: Path, keep: int, counts, identity: dict | None = None, extras=None):
        self.folder, self.keep, self.counts, self.identity = folder, keep, counts, identity
        self.extras = extras  # state -> {name: JSON value}: saved as EXTRA files before the marker (data.streaming)
        self.saving: int | None = None  # the step whose checkpoint Trainer is writing now

    def on_step_end(self, args, state, control, **kwargs):
        # called after the callbacks that ask for a save (the guard, the run log): Trainer saves next
        if not control.should_save:
            return
        self.saving = state.global_step
        # the main process clears the staging folder before any process writes into it
        distributed.on_main(self._clear, self.folder / f"checkpoint-{state.global_step}")

    def discard_staging(self) -> None:
        shutil.rmtree(staging(self.folder), ignore_errors=True)

    def _clear(self, target: Path) -> None:
        shutil.rmtree(staging(self.folder), ignore_errors=True)  # a save cut short earlier
        if target.exists():  # the same step saved again (resumed from an earlier checkpoint): not resumable meanwhile
            (target / COUNTS).unlink(missing_ok=True)

    def on_save(self, args, state, control, **kwargs):
        counts: dict[str, Any] = {k: distributed.total(v) for k, v in self.counts().items()}  # every process's
        if self.identity is not None:
            counts |= {"recipe": self.identity, "recipe_hash": recipe_hash(self.identity)}
        best = getattr(state, "best_model_checkpoint", None)  # a TrainerState has it; set by load_best_model_at_end
        moved = best is not None and Path(best).parent == staging(self.folder)
        if best is not None and moved:
            # load_best_model_at_end: Trainer recorded the best checkpoint where it wrote it (staging); it is read
            # from where it lands, at the end and after a resume (so its saved state says so too)
            state.best_model_checkpoint = str(self.folder / Path(best).name)
        extra = self.extras(state) if self.extras is not None else {}
        distributed.agree()  # every process has written its files (its rng_state_N.pth)
        distributed.on_main(self._complete, state, counts, moved, extra)
        self.saving = None

    def _complete(self, state, counts: dict, best_moved: bool, extra: dict[str, Any]) -> None:
        """Mark the staged checkpoint complete, move it into place, keep the last `keep`."""
        name = f"checkpoint-{state.global_step}"
        written, target = staging(self.folder) / name, self.folder / name
        best = getattr(state, "best_model_checkpoint", None)
        if best_moved:
            state.save_to_json(str(written / STATE))
        for name, value in extra.items():
            (written / EXTRA.format(name)).write_text(json.dumps(value))
        fsync_tree(written)
        (written / COUNTS).write_text(json.dumps(counts))  # the completion marker, after every other file is on disk
        fsync_tree(written)
        if target.exists():
            os.replace(target, staging(self.folder) / "replaced")
        os.replace(written, target)
        fsync_dir(self.folder)
        shutil.rmtree(staging(self.folder), ignore_errors=True)
        for old in checkpoints(self.folder)[: -self.keep]:
            if best and old == Path(state.best_model_checkpoint):
                continue  # the best checkpoint (early stopping) is kept beside the last `keep`: adapter/ gets it
            (old / COUNTS).unlink()  # first, so a kill halfway through the removal leaves no resumable-looking folder
            shutil.rmtree(old)


@contextmanager
def save_errors(saves: AtomicCheckpoints):
    """Around `trainer.train()`: an error while a checkpoint was being written becomes one line that says the
    previous checkpoint is intact (nothing half-written is left); any other error passes through."""
    import torch

    try:
        yield
    except SAVE_ERRORS as e:
        step = saves.saving
        written = staging(saves.folder) / f"checkpoint-{step}"
        if isinstance(e, torch.OutOfMemoryError) or step is None or not written.exists():
            raise
        shutil.rmtree(staging(saves.folder), ignore_errors=True)
        previous = checkpoints(saves.folder)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        detail = (str(e).strip().splitlines() or [""])[0]
        again = "run again with --resume" if previous else "start again with --overwrite"  # --resume needs a checkpoint
        error = RunError(
            f"cannot write the step {step} checkpoint in {getattr(e, 'filename', None) or written} ({type(e).__name__}: {detail}); "
            f"{kept}; free disk space (or fix the folder's permissions) and {again}"
        )
        if distributed.shared(e):  # every process stops with it: the main process prints it
            error = distributed.every_rank(error, agreed=getattr(e, "agreed", False))
        raise error from e


# ---------------------------------------------------------------- what a resumed run must share

# What a resumed run must share with the one it continues; anything else (lr, max_steps, logging, ...) may change.
MATTERS = (("task",), ("model", "path"), ("model", "revision"), ("quant",), ("lora",), ("data",))
BATCH = "effective batch (micro_batch_size * grad_accum)"


def identity(recipe_dict: dict) -> dict:
    """The parts of a resolved recipe that a resumed run cannot change: MATTERS and the effective batch; under a
    launcher also the number of processes (the global batch is effective batch x processes, and each process
    restores its own RNG state: `processes_of`)."""
    out: dict = {}
    for path in MATTERS:
        value: Any = recipe_dict
        into = out
        for part in path:
            value = (value or {}).get(part)
        for part in path[:-1]:
            into = into.setdefault(part, {})
        into[path[-1]] = value
    train = recipe_dict.get("train") or {}
    out["effective_batch"] = train.get("micro_batch_size", 1) * train.get("grad_accum", 1)
    if train.get("lora_plus_ratio") is not None:  # its optimizer state (param groups) fits only this setting
        out["train"] = {"lora_plus_ratio": train["lora_plus_ratio"]}
    if (size := world().size) > 1:  # absent for one process, so checkpoints written before this still match
        out["processes"] = size
    return out


def recipe_hash(ident: dict) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def identity_changes(a: dict, b: dict) -> list[str]:
    out = []

    def walk(x, y, path):
        if isinstance(x, dict | None) and isinstance(y, dict | None) and (x or y):  # a section only one side has
            x, y = x or {}, y or {}
            for key in dict.fromkeys([*x, *y]):
                walk(x.get(key), y.get(key), (*path, key))
        elif x != y:
            out.append(f"{'.'.join(path)} {x!r} -> {y!r}")

    for key in dict.fromkeys([*a, *b]):
        if key not in ("effective_batch", "processes"):  # the processes: `start` refuses first, with its own line
            walk(a.get(key), b.get(key), (key,))
    if a.get("effective_batch") != b.get("effective_batch"):
        out.append(f"{BATCH} {a.get('effective_batch')} -> {b.get('effective_batch')}")
    return out


def changes(saved: dict, now: dict) -> list[str]:
    """What differs between two resolved recipes in the keys that a resumed run cannot change."""
    return identity_changes(identity(saved), identity(now))


# ---------------------------------------------------------------- what a resume needs of a checkpoint


@dataclass(frozen=True)
class Gap:
    """A file of a checkpoint that an exact resume needs and cannot use: missing, or there but unreadable (a
    truncated or damaged file). `essential`: no resume at all without it (the adapter, the step to continue from)."""

    name: str  # the file, e.g. optimizer.pt
    what: str  # what it holds, e.g. "the optimizer state"
    problem: str  # "is missing", or "cannot be read (...)"
    essential: bool = False

    @property
    def missing(self) -> bool:
        return self.problem == "is missing"

    def text(self) -> str:
        return f"{self.name} ({self.what}) {self.problem}"


def _state(path: Path) -> dict:
    state = json.loads(path.read_text())
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int) or state["global_step"] < 0:
        raise ValueError("no global_step")
    return state


def _json_object(path: Path) -> dict:
    value = json.loads(path.read_text())
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _adapter(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:  # the header, and the file is as long as it says
        f.keys()


def _torch_file(path: Path) -> None:
    from lora_sft.compat import load_trainer_file

    load_trainer_file(str(path))


def gaps(checkpoint: Path, processes: int = 1, streaming: bool = False, fp16: bool = False) -> list[Gap]:
    """What `checkpoint` lacks for an exact resume: each file Trainer and lora_sft restore, there and loadable as
    they load it (the torch files with weights_only, so nothing but tensors is unpickled). `fp16`: the run trains
    in fp16, whose loss scale Trainer saves (scaler.pt). Reads, writes nothing."""
    needed: list[tuple[str, str, Any, bool]] = [
        (STATE, "the step to continue from", _state, True),
        (ADAPTER_WEIGHTS, "the adapter weights", _adapter, True),
        (OPTIMIZER, "the optimizer state", _torch_file, False),
        (SCHEDULER, "the learning-rate schedule", _torch_file, False),
        *((name, "the random state", _torch_file, False) for name in rng_files(processes)),
        (COUNTS, "the token totals", _json_object, False),
    ]
    if fp16:
        needed.append((SCALER, "the fp16 loss scale", _torch_file, False))
    if streaming:
        needed.append((STREAM, "the stream position", _json_object, False))
    found = []
    for name, what, load, essential in needed:
        path = checkpoint / name
        if not path.is_file():
            found.append(Gap(name, what, "is missing", essential))
            continue
        try:
            load(path)
        except Exception as e:  # torch, safetensors and json each raise their own types for a damaged file
            detail = (str(e).strip().splitlines() or [""])[0][:120]
            found.append(Gap(name, what, f"cannot be read ({type(e).__name__}: {detail})", essential))
    return found


def steps_left(checkpoint: Path, max_steps: int | None, epochs: float) -> int | None:
    """How many optimizer steps a run of `max_steps` (or `epochs`, when max_steps is unset) has left after
    `checkpoint`; None when that is unknown (the epochs changed since the checkpoint: Trainer works it out)."""
    state = _state(checkpoint / STATE)
    if max_steps is None:
        if state.get("num_train_epochs") != epochs or not isinstance(state.get("max_steps"), int):
            return None
        max_steps = state["max_steps"]
    return max(max_steps - state["global_step"], 0)


class NothingLeft(Exception):
    """Raised by `StopAtTheEnd` in on_train_begin: the resumed checkpoint is the run's last step."""


class StopAtTheEnd(TrainerCallback):
    """A run resumed from its last step (its checkpoint saved, then a kill before the summary) trains nothing:
    Trainer would run one more step before it checks max_steps. on_train_begin comes after Trainer restored the
    checkpoint (the adapter, the optimizer, the state with its log); `train` catches NothingLeft and finishes the
    run from there. First among the callbacks, so no other one starts anything for a training that does not happen."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step > 0 and state.global_step >= state.max_steps:
            raise NothingLeft


@contextmanager
def readable(checkpoint: Path, unreadable: tuple[str, ...]):
    """The folder Trainer resumes from: `checkpoint` itself, or (--allow-inexact, with files there that cannot be
    read) a temporary folder of links to its other files, so Trainer restores what is there and starts the rest
    anew instead of failing on a damaged file. The checkpoint itself is never changed."""
    if not unreadable:
        yield checkpoint
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lora_sft-resume-") as tmp:
        view = Path(tmp) / checkpoint.name
        view.mkdir()
        for path in checkpoint.iterdir():
            if path.name not in unreadable:
                (view / path.name).symlink_to(path)
        yield view


# ---------------------------------------------------------------- starting or resuming a run


def reopen(run_dir: RunDir, checkpoint: Path, recipe_dict: dict, inexact: tuple[Gap, ...] = ()) -> Manifest | None:
    """Continue a run directory from `checkpoint`: a save cut short is cleared, the run directory reopened; the
    manifest records what the checkpoint lacked (`inexact`, --allow-inexact)."""
    shutil.rmtree(staging(run_dir.checkpoints), ignore_errors=True)
    return run_dir.reopen(step_of(checkpoint), checkpoint, recipe_dict, [g.text() for g in inexact])


def read_extra(checkpoint: Path, name: str) -> Any:
    """A state `AtomicCheckpoints` saved beside the counts (its `extras`), or a RunError if the checkpoint lacks it."""
    path = checkpoint / EXTRA.format(name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read {path} ({type(e).__name__}); resume from a checkpoint this run wrote") from None


def restore_counts(trainer, checkpoint: Path) -> None:
    """The token totals a checkpoint saved (summed over its processes): the main process carries them on, the
    others count from zero (the summary sums the processes' counts)."""
    counts = checkpoint / COUNTS
    if counts.is_file() and distributed.world().main:
        saved = json.loads(counts.read_text())
        for key in trainer.counted:
            if key in saved:
                setattr(trainer, key, saved[key])
