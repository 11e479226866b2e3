"""Checkpoints that survive a crash, and the rules for starting, resuming or overwriting a run directory.

Trainer writes a checkpoint (adapter, optimizer, scheduler, RNG states, trainer_state.json with the
step, which is the data position) straight into `checkpoint-N`; a kill halfway leaves a folder that
looks complete and is not. `AtomicSaves` makes Trainer write into `checkpoints/.staging/`, fsyncs
every file, renames the folder into place and fsyncs the parent, then keeps the last K. Only
`checkpoint-N` folders are ever resumed from, so a half-written one is never picked up.

`start` decides what happens to `output_dir` before anything is written: a fresh run, a refusal
(a run is already there), `--overwrite`, or `--resume [PATH]`, which is refused when the recipe
changed in a way that matters.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import RunError, UserError
from .recipe import Recipe
from .rundir import RunDir

STAGING = ".staging"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE = "trainer_state.json"  # Trainer's name; it holds the step
COUNTS = "lora_sft_counts.json"  # the trainer's own running totals (tokens seen and trained)


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


def checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in `folder`, oldest step first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(found)]


def step_of(checkpoint: Path) -> int:
    return json.loads((checkpoint / STATE).read_text())["global_step"]


class AtomicSaves:
    """Trainer mixin: a checkpoint appears under its final name only once every byte is on disk.

    Trainer has no hook around its checkpoint writer, so this overrides the two methods that name the
    folder (`_get_output_dir`) and write it (`_save_checkpoint`) and calls the originals unchanged.
    """

    _staging: Path | None = None
    counted: tuple[str, ...] = ()  # attributes of the trainer saved with each checkpoint and restored on resume

    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        root = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = root / STAGING
        shutil.rmtree(staging, ignore_errors=True)
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
            (staging / name / COUNTS).write_text(json.dumps({k: getattr(self, k) for k in self.counted}))
            fsync_tree(staging / name)
            target = root / name
            if target.exists():  # the same step saved again (resumed from an earlier checkpoint)
                os.replace(target, staging / "replaced")
            os.replace(staging / name, target)
            fsync_dir(root)
        except Exception as e:  # a full disk, a write error, a permission problem
            previous = checkpoints(root)
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
            detail = (str(e).strip().splitlines() or [""])[0]
            raise RunError(
                f"cannot write the step {self.state.global_step} checkpoint in {getattr(e, 'filename', None) or staging / name} ({type(e).__name__}: {detail}); "
                f"{kept}; free disk space (or fix the folder's permissions) and run again with --resume"
            ) from e
        finally:
            self._staging = None
            shutil.rmtree(staging, ignore_errors=True)
        for old in checkpoints(root)[: -self.args.save_total_limit]:
            (old / STATE).unlink()  # first, so a kill halfway through the removal leaves no resumable-looking folder
            shutil.rmtree(old)


# ---------------------------------------------------------------- starting or resuming a run

# What a resumed run must share with the one it continues; anything else (lr, max_steps, logging, ...) may change.
MATTERS = (("task",), ("model", "path"), ("model", "revision"), ("quant",), ("lora",), ("data",))


def _effective_batch(train: dict) -> int:
    return train["micro_batch_size"] * train["grad_accum"]


def changes(saved: dict, now: dict) -> list[str]:
    """What differs between two resolved recipes in the keys that a resumed run cannot change."""
    out = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in dict.fromkeys([*a, *b]):
                walk(a.get(key), b.get(key), (*path, key))
        elif a != b:
            out.append(f"{'.'.join(path)} {a!r} -> {b!r}")

    for path in MATTERS:
        a, b = saved, now
        for part in path:
            a, b = (a or {}).get(part), (b or {}).get(part)
        walk(a, b, path)
    if _effective_batch(saved["train"]) != _effective_batch(now["train"]):
        out.append(f"effective batch (micro_batch_size * grad_accum) {_effective_batch(saved['train'])} -> {_effective_batch(now['train'])}")
    return out


@dataclass
class Start:
    resume_from: Path | None = None  # a checkpoint folder, or None for a fresh run
    replace: bool = False  # --overwrite: remove the run in output_dir before writing the new one


def start(recipe: Recipe, resume: str | bool | None, overwrite: bool, fingerprint: str) -> Start:
    """Decide what to do with output_dir; raises UserError before anything is written."""
    run_dir = RunDir(recipe.output_dir)
    held = (run_dir.root / "recipe.yaml").is_file()
    where = recipe.where("output_dir")
    if resume and overwrite:
        raise UserError(f"{where}: --resume and --overwrite contradict each other; pick one")
    if not resume:
        if held and not overwrite:
            finished = (run_dir.root / "summary.json").is_file()
            what = "a finished run" if finished else "an unfinished run"
            raise UserError(f"{where}: {run_dir.root} already holds {what}; continue it with --resume, replace it with --overwrite, or set another output_dir")
        return Start(replace=held)

    if resume is True:
        if not held:
            raise UserError(f"{where}: --resume: {run_dir.root} holds no run to resume; drop --resume to start one")
        found = checkpoints(run_dir.checkpoints)
        if not found:
            raise UserError(f"{where}: --resume: {run_dir.checkpoints} holds no complete checkpoint (the run stopped before its first save); start over with --overwrite")
        checkpoint = found[-1]
    else:
        checkpoint = Path(resume).expanduser().resolve()
        if (checkpoint / "checkpoints").is_dir():  # a run directory: its latest checkpoint
            found = checkpoints(checkpoint / "checkpoints")
            if not found:
                raise UserError(f"--resume {resume}: no complete checkpoint in {checkpoint / 'checkpoints'}")
            checkpoint = found[-1]
        elif not (checkpoint / STATE).is_file():
            raise UserError(f"--resume {resume}: not a checkpoint folder (no {STATE}); give a run directory or one of its checkpoints/checkpoint-N")
        if not held:
            raise UserError(f"{where}: --resume {resume}: {run_dir.root} holds no run; resume into the run directory the checkpoint came from")
    saved = yaml.safe_load((run_dir.root / "recipe.yaml").read_text())
    changed = changes(saved, recipe.saved_dict())
    manifest = json.loads((run_dir.root / "manifest.json").read_text())
    if not changed and manifest.get("data_fingerprint") != fingerprint:
        changed.append("the contents of the data files")
    if changed:
        raise UserError(f"--resume refused, the recipe changed since {run_dir.root}/recipe.yaml: {'; '.join(changed)}; undo the change or start a new run (another output_dir or --overwrite)")
    return Start(resume_from=checkpoint)


def _record(line: str) -> dict | None:
    """One metrics.jsonl record; None for a line that a killed process left half-written."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def reopen(run_dir: RunDir, checkpoint: Path, recipe_dict: dict) -> dict:
    """Continue a run directory from `checkpoint`: drop log records of the steps about to be redone."""
    step = step_of(checkpoint)
    shutil.rmtree(run_dir.checkpoints / STAGING, ignore_errors=True)
    kept = [line for line in run_dir.metrics.read_text().splitlines() if (record := _record(line)) and record.get("step", 0) <= step]
    run_dir.metrics.write_text("".join(f"{line}\n" for line in kept))
    (run_dir.root / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict, sort_keys=False))  # the options that may change did
    (run_dir.root / "summary.json").unlink(missing_ok=True)
    info = json.loads((run_dir.root / "manifest.json").read_text())
    info["ended"] = None
    info.setdefault("resumed", []).append({"from_step": step, "checkpoint": str(checkpoint)})
    return info


def restore_counts(trainer, checkpoint: Path) -> None:
    counts = checkpoint / COUNTS
    if counts.is_file():
        for key, value in json.loads(counts.read_text()).items():
            setattr(trainer, key, value)


def logged_eval_before(run_dir: RunDir) -> dict | None:
    """The eval of the untrained model that the first part of a resumed run logged at step 0."""
    for line in run_dir.metrics.read_text().splitlines():
        record = _record(line) or {}
        if record.get("step") == 0 and any(k.startswith("eval_") for k in record):
            return record
    return None
