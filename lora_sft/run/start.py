"""Where a run starts: `check_output_dir` refuses an output_dir that is not safe to write a run into (the working
directory, the recipe's or the data's folder, a folder of someone else's files, ...), for `train` and `validate`;
`start` decides what happens to `output_dir` before anything is written: a fresh run, a refusal (a run is already
there), `--overwrite`, or `--resume [PATH]`, which is checked completely first: the recipe may not have changed in a
way that matters, the checkpoint must belong to this recipe (its recipe hash, its adapter shapes, its processes) and
hold every file an exact resume restores, each readable (`checkpoint.gaps`; --allow-inexact resumes without the ones
a resume can do without), and a finished run is not resumed past its end (its records stay as they are).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from lora_sft.distributed import world
from lora_sft.errors import UserError
from lora_sft.model import gguf_source
from lora_sft.paths import resolved
from lora_sft.recipe.schema import Recipe
from lora_sft.run.rundir import MANIFEST, RECIPE, RunDir, check_writable, entries

if TYPE_CHECKING:
    from lora_sft.model.plan import ModelPlan
from lora_sft.run import lock
from lora_sft.run.checkpoint import (
    ADAPTER_WEIGHTS,
    COUNTS,
    STATE,
    Gap,
    changes,
    checkpoints,
    complete,
    gaps,
    identity,
    identity_changes,
    recipe_hash,
    step_of,
    steps_left,
)

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
    run_dir = RunDir(resolved(recipe.output_dir, where))
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


@dataclass
class Start:
    resume_from: Path | None = None  # a checkpoint folder, or None for a fresh run
    replace: bool = False  # --overwrite: remove the run in output_dir before writing the new one
    inexact: tuple[Gap, ...] = ()  # --allow-inexact: what the checkpoint lacks, resumed without

    @property
    def unreadable(self) -> tuple[str, ...]:
        """The checkpoint's files that are there but cannot be read: Trainer must not see them."""
        return tuple(g.name for g in self.inexact if not g.missing)


LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def adapter_shapes(checkpoint: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    """{module: {"A": shape, "B": shape}} from a checkpoint's adapter_model.safetensors header (no weights read)."""
    from safetensors import safe_open

    out: dict[str, dict[str, tuple[int, ...]]] = {}
    with safe_open(str(checkpoint / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
            if m := LORA_KEY.match(key):
                out.setdefault(m.group("module"), {})[m.group("ab")] = tuple(f.get_slice(key).get_shape())
    return out


TOKEN_ROWS = ".token_adapter.trainable_tokens_delta"  # peft's trainable_token_indices: the added tokens' rows


def token_rows_problem(folder: Path, plan: ModelPlan) -> str | None:
    """Why the adapter in `folder` (adapter/, or a checkpoint) lacks the rows of the tokens its run added (the
    plan's `trainable_tokens`: the tokenizer has more tokens than the base's embedding rows), read from the
    safetensors header; None when every layer has one row per added token. Without them peft's loader fails
    (a KeyError, exit 1) or the rows would stay untrained."""
    if not plan.trainable_tokens or not _fits_the_layers(folder, plan):
        return None  # an adapter of another model: the loader names the layers that differ in shape
    from safetensors import safe_open

    rows: dict[str, int] = {}
    try:
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                if key.endswith(TOKEN_ROWS):
                    rows[key.removeprefix("base_model.model.").removesuffix(TOKEN_ROWS)] = f.get_slice(key).get_shape()[
                        0
                    ]
    except Exception as e:  # safetensors raises its own error types for a damaged header
        return f"cannot read {folder / 'adapter_model.safetensors'} ({type(e).__name__}: {e})"
    for layer, ids in plan.trainable_tokens.items():
        if rows.get(layer) != len(ids):
            held = f"{rows[layer]} rows" if layer in rows else "no rows"
            names = ", ".join(plan.new_tokens[:5]) + (
                f" and {len(plan.new_tokens) - 5} more" if len(plan.new_tokens) > 5 else ""
            )
            return f"the tokenizer saved with the adapter has {len(ids)} tokens past the base's {plan.rows} embedding rows ({names}), and the adapter in {folder} holds {held} for them in {layer}; the adapter and that tokenizer do not belong together: use the adapter/ and tokenizer one run saved, or train again"
    return None


def _fits_the_layers(folder: Path, plan: ModelPlan) -> bool:
    """The adapter's LoRA matrices (A: rank x in, B: out x rank, from the header) fit the base's linear layers."""
    try:
        shapes = adapter_shapes(folder)
    except Exception:  # a damaged header: token_rows_problem says so
        return True
    for module, ab in shapes.items():
        layer = plan.linear_shapes.get(module)
        if layer and "A" in ab and "B" in ab and (ab["A"][-1], ab["B"][0]) != layer:
            return False
    return True


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
        diff = identity_changes(saved, now) or ["the recipe hash differs"]
        return f"the checkpoint was written by a run with another recipe: {'; '.join(diff)}"
    try:  # the file is there and its header whole (`gaps`, checked first)
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
    recipe: Recipe,
    resume: str | bool | None,
    overwrite: bool,
    fingerprint: str | None,
    plan: ModelPlan | None = None,
    allow_inexact: bool = False,
) -> Start:
    """Decide what to do with output_dir; raises UserError before anything is written.
    `plan`: the model plan, whose targets (the modules it adapts) are checked against a checkpoint's adapter, and
    whose GGUF file (a GGUF base) against the one the run was trained from. `fingerprint`: the data's (None: not
    known, validate without the model). `allow_inexact` (--allow-inexact): a checkpoint that lacks a piece an exact
    resume needs (the optimizer, the schedule, the random state, the token totals, the stream position) is resumed
    with what it has, and `Start.inexact` says what it lacked."""
    run_dir = RunDir(recipe.output_dir)
    held = run_dir.holds_run()
    where = recipe.where("output_dir")
    lock.check_free(run_dir.root, where)  # another train, export or eval is writing into it
    if resume and overwrite:
        raise UserError(f"{where}: --resume and --overwrite contradict each other; pick one")
    if allow_inexact and not resume:
        raise UserError("--allow-inexact: it only applies to --resume; drop it, or add --resume")
    if not resume:
        if held and not overwrite:
            raise UserError(f"{where}: {run_dir.root} already holds {_what_is_there(run_dir)}")
        return Start(replace=held)
    checkpoint = _checkpoint_to_resume(run_dir, resume, where)
    inexact = _refuse_gaps(checkpoint, run_dir, recipe, allow_inexact)
    _refuse_changes(recipe, run_dir, fingerprint, plan)
    if (then := processes_of(checkpoint)) != (now := world().size):
        # each step's samples (the global batch is micro batch x grad_accum x processes) and each rank's RNG state
        raise UserError(
            f"--resume refused: {checkpoint} was trained by {then} process(es), this run has {now}; its global batch "
            f"and each process's random state belong to {then}: launch the resume with {then} process(es) in all, as the run was"
        )
    if plan is not None and (why := belongs(checkpoint, recipe, plan.targets) or token_rows_problem(checkpoint, plan)):
        raise UserError(
            f"--resume refused: {checkpoint} does not belong to this recipe: {why}; resume from a checkpoint of this run ({run_dir.checkpoints})"
        )
    _refuse_finished(recipe, run_dir, checkpoint)
    return Start(resume_from=checkpoint, inexact=inexact)


def _what_is_there(run_dir: RunDir) -> str:
    """The run in output_dir and what can be done with it, for the line that refuses to write over it: a finished
    run is not offered --resume, which would have nothing to train."""
    if not run_dir.finished():
        return "an unfinished run; continue it with --resume, replace it with --overwrite, or set another output_dir"
    try:
        summary = run_dir.read_summary()
    except (OSError, ValueError, TypeError, AttributeError):  # not JSON, or not a summary's
        summary = None
    steps = f" ({summary.steps} steps)" if summary is not None else ""
    return (
        f"a finished run{steps}; replace it with --overwrite, set another output_dir, or train it further with "
        "--resume and a larger train.max_steps"
    )


def _refuse_gaps(checkpoint: Path, run_dir: RunDir, recipe: Recipe, allow_inexact: bool) -> tuple[Gap, ...]:
    """A checkpoint that cannot be resumed exactly is refused, naming each missing or unreadable file, before anything
    is written; with --allow-inexact the gaps that do not stop a resume are returned instead (recorded in the
    manifest). The adapter and the step are always needed."""
    found = _gaps(checkpoint, recipe)
    essential = [g for g in found if g.essential]
    if not found or (allow_inexact and not essential):
        return tuple(found)
    earlier = _whole_earlier(run_dir, checkpoint, recipe)
    instead = f"resume from {earlier} (whole), " if earlier else ""
    if essential:
        raise UserError(
            f"--resume refused: {checkpoint} cannot be resumed: {'; '.join(g.text() for g in essential)}; "
            f"{instead}start over with --overwrite"
        )
    raise UserError(
        f"--resume refused: {checkpoint} cannot be resumed exactly: {'; '.join(g.text() for g in found)}; "
        f"{instead}continue without {'it' if len(found) == 1 else 'them'} with --resume --allow-inexact (recorded in "
        f"manifest.json), or start over with --overwrite"
    )


def _gaps(checkpoint: Path, recipe: Recipe) -> list[Gap]:
    # fp16 only when the recipe says so: compute_dtype auto never picks it (`settings.compute_dtype`)
    return gaps(checkpoint, processes_of(checkpoint), recipe.data.streaming, recipe.quant.compute_dtype == "fp16")


def _whole_earlier(run_dir: RunDir, checkpoint: Path, recipe: Recipe) -> Path | None:
    """The latest checkpoint of the run before `checkpoint` that has everything an exact resume needs."""
    earlier = [c for c in checkpoints(run_dir.checkpoints) if c.name != checkpoint.name]
    for candidate in reversed(earlier):
        try:
            if step_of(candidate) < step_of(checkpoint) and not _gaps(candidate, recipe):
                return candidate
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _refuse_finished(recipe: Recipe, run_dir: RunDir, checkpoint: Path) -> None:
    """A finished run (summary.json written) resumed from its last step has nothing left to train: refused, so its
    records (summary.json, the adapter, eval.md) stay as they are. An earlier checkpoint, or a larger max_steps,
    trains again."""
    left = steps_left(checkpoint, recipe.train.max_steps, recipe.train.epochs)
    if run_dir.finished() and left == 0:
        step = step_of(checkpoint)
        raise UserError(
            f"{recipe.where('output_dir')}: --resume: the run in {run_dir.root} is finished ({checkpoint.name} is its "
            f"last step, {step}, and summary.json is written): nothing is left to train and its records stay as they "
            f"are; to train it further set a larger train.max_steps (--resume train.max_steps={2 * step}), or replace "
            "it with --overwrite"
        )


def _checkpoint_to_resume(run_dir: RunDir, resume: str | bool, where: str) -> Path:
    """The checkpoint `--resume` names: the run's latest (`--resume` alone), a run directory's latest, or a
    checkpoint folder, which must be complete; the run directory must hold the run it belongs to."""
    held = run_dir.holds_run()
    if resume is True:
        if not held:
            raise UserError(f"{where}: --resume: {run_dir.root} holds no run to resume; drop --resume to start one")
        found = checkpoints(run_dir.checkpoints)
        if not found:
            raise UserError(
                f"{where}: --resume: {run_dir.checkpoints} holds no complete checkpoint (the run stopped before its first save); start over with --overwrite"
            )
        return found[-1]
    checkpoint = resolved(str(resume), f"--resume {resume}")
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
    return checkpoint


def _refuse_changes(recipe: Recipe, run_dir: RunDir, fingerprint: str | None, plan: ModelPlan | None) -> None:
    """A resume refused when the recipe changed since the run began in a way that matters, or its data (the data
    fingerprint: files, options, tokenizer), or its GGUF base file."""
    where = recipe.where("output_dir")
    try:
        saved, manifest = run_dir.read_recipe(), run_dir.read_manifest()
        changed = changes(saved, recipe.saved_dict())
    except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as e:
        raise UserError(
            f"{where}: --resume: cannot read the run's {RECIPE} or {MANIFEST} in {run_dir.root} ({type(e).__name__}); start over with --overwrite"
        ) from None
    if not changed and fingerprint is not None and manifest.get("data_fingerprint") != fingerprint:
        changed.append("the contents of the data files")
    if plan is not None and (why := gguf_source.changed(manifest.get("model_file"), plan.source.gguf)):
        changed.append(why)
    if changed:
        raise UserError(
            f"--resume refused, the recipe changed since {run_dir.recipe}: {'; '.join(changed)}; undo the change or start a new run (another output_dir or --overwrite)"
        )
