"""Checkpoints that survive a crash, and the rules for starting, resuming or overwriting a run directory.

Trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, trainer_state.json with the
step, which is the data position) into the folder its `output_dir` names. lora_sft points that at
`checkpoints/.staging/`, so a checkpoint is first written where nothing is resumed from; `AtomicCheckpoints`
(a `TrainerCallback`, public hooks only) then, in `on_save`, writes the counts file (tokens counted, the
recipe identity: it is the completion marker, written last), fsyncs every file, renames the folder to
`checkpoints/checkpoint-N`, fsyncs the parent and keeps the last K. Only `checkpoint-N` folders holding
the marker are ever resumed from, so a save cut short (a kill, a full disk) is never picked up. A save
that fails is reported by `save_errors`: the previous checkpoint is intact and says so.

`check_output_dir` refuses an output_dir that is not safe to write a run into (the working directory,
the recipe's or the data's folder, a folder of someone else's files, ...), for `train` and `validate`.
`start` decides what happens to `output_dir` before anything is written: a fresh run, a refusal
(a run is already there), `--overwrite`, or `--resume [PATH]`, which is checked completely first:
the recipe may not have changed in a way that matters, and the checkpoint must belong to this recipe
(its recipe hash and its adapter shapes).
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

import yaml
from safetensors import SafetensorError
from transformers import TrainerCallback

from lora_sft import distributed
from lora_sft.distributed import world
from lora_sft.errors import RunError, UserError
from lora_sft.model import gguf_source
from lora_sft.recipe.schema import Recipe
from lora_sft.run.rundir import MANIFEST, RECIPE, Manifest, RunDir, check_writable, entries

if TYPE_CHECKING:
    from lora_sft.model.load import ModelPlan

STAGING = ".staging"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.json"  # Trainer's name; it holds the step
COUNTS = "lora_sft_counts.json"  # the trainer's own running totals (tokens seen and trained)
EXTRA = "lora_sft_{}.json"  # a state saved beside the counts (`AtomicCheckpoints` extras): lora_sft_stream.json


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


def _identity_changes(a: dict, b: dict) -> list[str]:
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
    return _identity_changes(identity(saved), identity(now))


# ---------------------------------------------------------------- is output_dir safe to write a run into?

GLOB = "*?["


def _data_place(spec: str) -> tuple[Path, str, bool] | None:
    """A data source's local file or folder (a glob: the folder it searches), what it is, and whether files in
    folders below it are read (a folder source, or a `**` glob); None for a hub dataset or an empty path (the
    data stage refuses that one)."""
    if not spec.strip():
        return None
    if any(ch in spec for ch in GLOB):
        parts = Path(spec).expanduser().parts
        first = next(i for i, part in enumerate(parts) if any(ch in part for ch in GLOB))
        return Path(*parts[:first]) if first else Path("."), "the folder of the data glob", "**" in spec
    path = Path(spec).expanduser()
    if path.exists():
        return path, "the data folder" if path.is_dir() else "the data file", path.is_dir()
    return None


def _protected(recipe: Recipe, model_folder: str | None, root: Path) -> list[tuple[Path, str, bool]]:
    """(path, what it is, whether a run may not sit below it either) for everything a run must never hold or replace."""
    places = [
        (Path("/"), "the root folder", False),
        (Path.home(), "your home folder", False),
        (Path.cwd(), "the working directory", False),
    ]
    if recipe._source is not None:
        file = Path(recipe._source.file).expanduser().resolve()
        if not (
            file == root / RECIPE and RunDir(root).holds_run()
        ):  # a run's own saved recipe, used to resume it, is the run's
            places.append((file.parent, f"the folder holding the recipe {recipe._source.file}", False))
    for split in ("train", "eval"):
        for source in recipe.data.sources(split):
            if found := _data_place(source.path):
                path, what, below = found
                places.append((path, f"{what} {source.path} (data.{split})", below))
    if model_folder:
        places.append((Path(model_folder), f"the model folder {model_folder} (model.path)", False))
    template = recipe.data.chat_template
    if template and Path(template).expanduser().is_file():
        places.append((Path(template).expanduser(), f"the chat template {template} (data.chat_template)", False))
    return [(p.resolve(), what, below) for p, what, below in places]


def check_output_dir(recipe: Recipe, model_folder: str | None = None) -> None:
    """Refuse an output_dir that a run must not be written into, whatever the flags: one line, nothing written.

    Refused: `/`, the home folder, the working directory, the recipe's folder, a local data file or folder
    (or a glob's folder), the model folder, the chat template file, any folder holding one of these
    (symlinks resolved); a folder inside a data folder (the run's metrics.jsonl would be read as data);
    a file, a place that cannot be created or written; an existing folder of other files that holds no run.
    `model_folder` is the resolved local model folder (None for a hub model)."""
    where = recipe.where("output_dir")
    run_dir = RunDir(recipe.output_dir)
    root = run_dir.root
    fix = "set output_dir to a folder of its own, e.g. runs/my-run"
    for path, what, below in _protected(recipe, model_folder, root):
        if root == path:
            raise UserError(f"{where}: {recipe.output_dir} is {what}; a run must have a folder of its own: {fix}")
        if root in path.parents:
            raise UserError(
                f"{where}: {recipe.output_dir} ({root}) holds {what}; a run must have a folder of its own: {fix}"
            )
        if below and path in root.parents:
            raise UserError(
                f"{where}: {recipe.output_dir} is inside {what}, so the run's files (metrics.jsonl) would be read as data next time; set output_dir to a folder outside it"
            )
    check_writable(root, where, "output_dir")
    if root.is_dir() and not run_dir.is_empty() and not run_dir.holds_run():
        raise UserError(
            f"{where}: {root} is not empty ({entries(root)}) and holds no lora_sft run; lora_sft writes only into a new or empty folder or a run of its own: set another output_dir"
        )


# ---------------------------------------------------------------- starting or resuming a run


@dataclass
class Start:
    resume_from: Path | None = None  # a checkpoint folder, or None for a fresh run
    replace: bool = False  # --overwrite: remove the run in output_dir before writing the new one


LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def adapter_shapes(checkpoint: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {"A": shape, "B": shape}} from a checkpoint's adapter_model.safetensors header (no weights read)."""
    from safetensors import safe_open

    out: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(checkpoint / "adapter_model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
            if m := LORA_KEY.match(key):
                out.setdefault(m.group("module"), {})[m.group("ab")] = tuple(f.get_slice(key).get_shape())
    return out


def _checkpoint_identity(checkpoint: Path) -> dict | None:
    """The recipe identity a checkpoint was written with: its counts file, or (older checkpoints) its run's recipe.yaml."""
    try:
        counts = json.loads((checkpoint / COUNTS).read_text())
        if isinstance(counts, dict) and isinstance(counts.get("recipe"), dict):
            return counts["recipe"]
    except (OSError, ValueError):
        pass
    run = RunDir(checkpoint.parent.parent)
    if checkpoint.parent == run.checkpoints and run.holds_run():
        try:
            return identity(run.read_recipe())
        except (OSError, ValueError, yaml.YAMLError, AttributeError):
            return None
    return None


def processes_of(checkpoint: Path) -> int:
    """How many processes wrote `checkpoint` (its recipe identity says so under a launcher; 1 otherwise)."""
    saved = _checkpoint_identity(checkpoint) or {}
    size = saved.get("processes", 1)
    return size if isinstance(size, int) and size > 0 else 1


def _plural(items: list[str], n: int = 3) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def belongs(checkpoint: Path, recipe: Recipe, targets: list[str]) -> str | None:
    """Why `checkpoint` cannot continue a run of `recipe` (a different recipe identity, other adapted modules or
    another LoRA rank), or None when it can."""
    now = identity(recipe.saved_dict())
    saved = _checkpoint_identity(checkpoint)
    if saved is not None and recipe_hash(saved) != recipe_hash(now):
        diff = _identity_changes(saved, now) or ["the recipe hash differs"]
        return f"the checkpoint was written by a run with another recipe: {'; '.join(diff)}"
    if not (checkpoint / "adapter_model.safetensors").is_file():
        return "the checkpoint has no adapter_model.safetensors"
    try:
        shapes = adapter_shapes(checkpoint)
    except Exception as e:  # safetensors raises its own error types for a damaged header
        return f"cannot read the checkpoint's adapter_model.safetensors ({type(e).__name__}: {e})"
    missing, extra = [t for t in targets if t not in shapes], sorted(set(shapes) - set(targets))
    if missing or extra:
        parts = ([f"not {_plural(missing)}"] if missing else []) + ([f"also {_plural(extra)}"] if extra else [])
        return f"the checkpoint adapts {len(shapes)} modules, this recipe {len(targets)}: {', '.join(parts)}"
    rank = recipe.lora.rank
    for module in targets:
        a, b = shapes[module].get("A"), shapes[module].get("B")
        if not a or not b or a[0] != rank or b[-1] != rank:
            found = a[0] if a else (b[-1] if b else "?")
            return f"the checkpoint's LoRA rank is {found} ({module}), this recipe's lora.rank is {rank}"
    return None


def start(
    recipe: Recipe, resume: str | bool | None, overwrite: bool, fingerprint: str, plan: ModelPlan | None = None
) -> Start:
    """Decide what to do with output_dir; raises UserError before anything is written.
    `plan`: the model plan, whose targets (the modules it adapts) are checked against a checkpoint's adapter, and
    whose GGUF file (a GGUF base) against the one the run was trained from."""
    targets = plan.targets if plan is not None else None
    run_dir = RunDir(recipe.output_dir)
    held = run_dir.holds_run()
    where = recipe.where("output_dir")
    if resume and overwrite:
        raise UserError(f"{where}: --resume and --overwrite contradict each other; pick one")
    if not resume:
        if held and not overwrite:
            what = "a finished run" if run_dir.finished() else "an unfinished run"
            raise UserError(
                f"{where}: {run_dir.root} already holds {what}; continue it with --resume, replace it with --overwrite, or set another output_dir"
            )
        return Start(replace=held)

    if resume is True:
        if not held:
            raise UserError(f"{where}: --resume: {run_dir.root} holds no run to resume; drop --resume to start one")
        found = checkpoints(run_dir.checkpoints)
        if not found:
            raise UserError(
                f"{where}: --resume: {run_dir.checkpoints} holds no complete checkpoint (the run stopped before its first save); start over with --overwrite"
            )
        checkpoint = found[-1]
    else:
        checkpoint = Path(resume).expanduser().resolve()
        if (named := RunDir(checkpoint)).checkpoints.is_dir():  # a run directory: its latest checkpoint
            found = checkpoints(named.checkpoints)
            if not found:
                raise UserError(f"--resume {resume}: no complete checkpoint in {named.checkpoints}")
            checkpoint = found[-1]
        elif not (checkpoint / STATE).is_file():
            raise UserError(
                f"--resume {resume}: not a checkpoint folder (no {STATE}); give a run directory or one of its checkpoints/checkpoint-N"
            )
        elif not complete(checkpoint):
            raise UserError(
                f"--resume {resume}: the checkpoint is incomplete (no {COUNTS}, written last: its save was cut short); give a complete one of {checkpoint.parent}"
            )
        if not held:
            raise UserError(
                f"{where}: --resume {resume}: {run_dir.root} holds no run; resume into the run directory the checkpoint came from"
            )
    try:
        saved, manifest = run_dir.read_recipe(), run_dir.read_manifest()
        changed = changes(saved, recipe.saved_dict())
    except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as e:
        raise UserError(
            f"{where}: --resume: cannot read the run's {RECIPE} or {MANIFEST} in {run_dir.root} ({type(e).__name__}); start over with --overwrite"
        ) from None
    if not changed and manifest.get("data_fingerprint") != fingerprint:
        changed.append("the contents of the data files")
    if plan is not None and (why := gguf_source.changed(manifest.get("model_file"), plan.source.gguf)):
        changed.append(why)
    if changed:
        raise UserError(
            f"--resume refused, the recipe changed since {run_dir.recipe}: {'; '.join(changed)}; undo the change or start a new run (another output_dir or --overwrite)"
        )
    if (then := processes_of(checkpoint)) != (now := world().size):
        # each step's samples (the global batch is micro batch x grad_accum x processes) and each rank's RNG state
        raise UserError(
            f"--resume refused: {checkpoint} was trained by {then} process(es), this run has {now}; its global batch "
            f"and each process's random state belong to {then}: launch the resume with {then} process(es) in all, as the run was"
        )
    if targets is not None and (why := belongs(checkpoint, recipe, targets)):
        raise UserError(
            f"--resume refused: {checkpoint} does not belong to this recipe: {why}; resume from a checkpoint of this run ({run_dir.checkpoints})"
        )
    return Start(resume_from=checkpoint)


def reopen(run_dir: RunDir, checkpoint: Path, recipe_dict: dict) -> Manifest | None:
    """Continue a run directory from `checkpoint`: a save cut short is cleared, the run directory reopened."""
    shutil.rmtree(staging(run_dir.checkpoints), ignore_errors=True)
    return run_dir.reopen(step_of(checkpoint), checkpoint, recipe_dict)


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
