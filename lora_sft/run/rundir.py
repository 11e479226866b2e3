"""The run directory: the one module that names a run's files and folders, writes and reads them, and owns
a run's lifecycle (create, reopen for resume, finish, overwrite):

    .lora_sft-run     the marker, written first: this folder holds a lora_sft run (JSON: version, creation time)
    adapter/          PEFT adapter (adapter_model.safetensors, adapter_config.json), tokenizer, README.md card
    recipe.yaml       the fully resolved recipe, defaults filled in
    manifest.json     library versions, seed, data fingerprint, start and end time
    metrics.jsonl     one JSON object per logged step and per eval
    loss.png          train and eval loss and the learning rate against step, redrawn at each checkpoint (plots.py)
    tensorboard/      (train.report_to: tensorboard) TensorBoard's event files
    summary.json      final losses, eval metrics before and after, tokens, speed, peak memory, wall time
    checkpoints/      Trainer checkpoints, written atomically, resumable with `train --resume` (checkpoint.py)
    eval.md           (`eval`) the base / fine-tuned table; its numbers are summary.json `evaluation`
    export/           (`export`) adapter/, merged/, fidelity.json (`ExportDir`)

Only these names are ever removed by `train --overwrite`: a file of the user's inside the folder stays.
eval.md, export/ and summary.json `evaluation` are derived from adapter/ and are removed when a new
adapter is written. An export folder is marked too (`.lora_sft-export`, which lists the files the export
wrote), so an export replaces only an earlier export, and of it only those files (`files.OwnedFolder`): a file
of the user's in an export folder stays, there and when export/ is removed.

What is written is typed: `Manifest`, `Summary`, `Evaluation`, `FidelityReport` (their JSON is the
contract: the same keys in the same order). Reading them needs neither the model nor the data stage: opening a
finished run again through those stages (`open_run`) and rendering the model card (adapter/README.md, `write_card`)
are a layer up, in lora_sft.export.reopen and lora_sft.export.card.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from lora_sft.distributed import main_only
from lora_sft.errors import UserError, shown
from lora_sft.paths import resolved
from lora_sft.run import lock
from lora_sft.run.files import OwnedFolder, write_atomic, write_json
from lora_sft.run.lock import LOCK
from lora_sft.run.records import Evaluation, FidelityReport, Manifest, Resumed, Summary, now

# The names of everything a run writes (and nothing else: `--overwrite` removes exactly these).
MARKER = ".lora_sft-run"
RECIPE = "recipe.yaml"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
ADAPTER = "adapter"
CHECKPOINTS = "checkpoints"
EVAL_REPORT = "eval.md"
EXPORT = "export"
LOSS_PLOT = "loss.png"
TENSORBOARD = "tensorboard"
ARTIFACTS = (
    MARKER,
    RECIPE,
    MANIFEST,
    METRICS,
    LOSS_PLOT,
    TENSORBOARD,
    SUMMARY,
    ADAPTER,
    CHECKPOINTS,
    EVAL_REPORT,
    EXPORT,
)
EXPORT_MARKER = ".lora_sft-export"  # written first into an export folder
EXPORT_ADAPTER, EXPORT_MERGED, FIDELITY = "adapter", "merged", "fidelity.json"  # inside an export folder
EXPORT_GGUF = "gguf"  # inside an export folder: the .gguf file and the Ollama Modelfile (gguf_export.py)
EXPORT_NAMES = (EXPORT_MARKER, EXPORT_ADAPTER, EXPORT_MERGED, EXPORT_GGUF, FIDELITY)  # all an export writes
CARD = "README.md"  # the model card, in adapter/ (and in an export's adapter/ and merged/)
ADAPTER_CONFIG = "adapter_config.json"  # peft's name: what makes adapter/ an adapter
MARKER_VERSION = 1


def entries(folder: Path, n: int = 2) -> str:
    """The first `n` names in `folder` (folders with a trailing /) and how many more, for messages."""
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_writable(target: Path, where: str, key: str) -> None:
    """`target`, a folder to create or fill, can be: not a file, and its nearest existing ancestor takes a
    new folder (probed with an empty folder made and removed at once). Raises UserError, writes nothing."""
    ancestor = target
    try:
        if target.exists() and not target.is_dir():
            raise UserError(f"{where}: {target} is a file, not a folder; set {key} to a folder")
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise UserError(
                f"{where}: cannot create {target}: {ancestor} is a file, not a folder; set {key} to a folder"
            )
        os.rmdir(tempfile.mkdtemp(prefix=".lora_sft-probe-", dir=ancestor))
    except OSError as e:
        raise UserError(
            f"{where}: cannot create {target}: {ancestor} does not take new folders ({e.strerror}); set {key} to a folder you can write"
        ) from None


# ---------------------------------------------------------------- typed records of what a run writes


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---------------------------------------------------------------- the run directory


def _record(line: str) -> dict | None:
    """One metrics.jsonl record; None for a line that a killed process left half-written."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


class RunDir:
    def __init__(self, root: str | Path):
        self.root = resolved(root, shown(root))
        self.marker = self.root / MARKER
        self.recipe = self.root / RECIPE
        self.manifest = self.root / MANIFEST
        self.metrics = self.root / METRICS
        self.loss_plot = self.root / LOSS_PLOT
        self.tensorboard = self.root / TENSORBOARD
        self.summary = self.root / SUMMARY
        self.adapter = self.root / ADAPTER
        self.checkpoints = self.root / CHECKPOINTS
        self.eval_report = self.root / EVAL_REPORT
        self.export = self.root / EXPORT
        self.card = self.adapter / CARD

    @property
    def name(self) -> str:
        """The run's name: its folder's (what `plot` labels it with, and the trackers' run name)."""
        return self.root.name

    # -- what the folder holds
    def holds_run(self) -> bool:
        """The folder holds a lora_sft run: it has the marker, or (a run from before the marker) a recipe.yaml
        next to a manifest.json that lora_sft wrote. A user's own recipe.yaml does not make a run."""
        if self.marker.is_file():
            return True
        try:
            info = json.loads(self.manifest.read_text())
        except (OSError, ValueError):
            return False
        return (
            self.recipe.is_file()
            and isinstance(info, dict)
            and "data_fingerprint" in info
            and "lora_sft" in (info.get("versions") or {})
        )

    def finished(self) -> bool:
        return self.summary.is_file()

    def writer(self, command: str):
        """The run directory's lock held for `command` (export, eval) while it writes here; nothing to hold where
        the folder holds no run (the command then says what is wrong with it)."""
        return lock.held(self.root, command) if self.holds_run() else contextlib.nullcontext()

    def is_empty(self) -> bool:
        """No files in the folder; a lock file a killed command left (`run.lock`) does not count."""
        return not self.root.exists() or (self.root.is_dir() and not any(p.name != LOCK for p in self.root.iterdir()))

    def read_recipe(self) -> dict:
        return yaml.safe_load(self.recipe.read_text())

    def read_manifest(self) -> dict:
        return json.loads(self.manifest.read_text())

    def read_summary(self) -> Summary | None:
        return Summary.from_json(read_json(self.summary)) if self.summary.is_file() else None

    def read_metrics(self) -> list[dict]:
        """metrics.jsonl's records, in order (without a line that a running or killed process left half-written)."""
        if not self.metrics.is_file():
            return []
        try:
            text = self.metrics.read_text(encoding="utf-8", errors="replace")  # a damaged line is skipped below
        except OSError as e:
            raise UserError(f"{self.metrics}: cannot read it ({e.strerror}); fix its permissions") from None
        return [record for line in text.splitlines() if isinstance(record := _record(line), dict)]

    def logged_eval_before(self) -> dict | None:
        """The eval of the untrained model that the first part of a resumed run logged at step 0."""
        for record in self.read_metrics():
            if record.get("step") == 0 and any(k.startswith("eval_") for k in record):
                return record
        return None

    # -- the lifecycle: create, reopen, log, finish. Under a launcher only the main process writes: every
    # method that writes is `main_only` (on the other processes it does nothing and returns None)
    @main_only
    def create(self, recipe_dict: dict, manifest: Manifest) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.mark()  # first: from here on the folder is recognisably a run, whatever else fails
        self.checkpoints.mkdir(exist_ok=True)
        self.write_recipe(recipe_dict)
        self.metrics.write_text("")
        write_json(self.manifest, manifest.to_json())

    @main_only
    def reopen(self, step: int, checkpoint: Path, recipe_dict: dict, inexact: list[str] | None = None) -> Manifest:
        """Continue the run from `checkpoint` (at `step`): drop log records of the steps about to be redone, the
        summary of an earlier finish; the manifest records the resume (`inexact`: what the checkpoint lacked)."""
        kept = [
            line
            for line in self.metrics.read_text().splitlines()
            if (record := _record(line)) and record.get("step", 0) <= step
        ]
        self.metrics.write_text("".join(f"{line}\n" for line in kept))
        self.mark()  # a run from before the marker gets one
        self.write_recipe(recipe_dict)  # the options that may change did
        self.summary.unlink(missing_ok=True)
        info = Manifest.from_json(self.read_manifest())
        info.ended = None
        info.resumed.append(Resumed(step, str(checkpoint), inexact or []))
        return info

    @main_only
    def mark(self) -> None:
        if not self.marker.is_file():
            from lora_sft import __version__

            write_json(self.marker, {"version": MARKER_VERSION, "lora_sft": __version__, "created": now()})

    @main_only
    def write_recipe(self, recipe_dict: dict) -> None:
        self.recipe.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))

    @main_only
    def log(self, record: dict) -> None:
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")

    @main_only
    def save_adapter(
        self, model, tokenizer, initial: tempfile.TemporaryDirectory | None = None, state: dict | None = None
    ) -> None:
        """adapter/: the PEFT adapter and the tokenizer (its chat template); what described the old one goes.
        `initial` (lora.init pissa/olora, `model.save_initial`): the adapter as it started on the residual base;
        adapter/ is then the plain LoRA of rank 2 x rank that applies the training to the original base.
        `state`: the trainable tensors gathered whole when FSDP shards the model (`distributed.full_adapter_state`),
        which peft then saves instead of the model's own shards."""
        self.drop_derived()
        # lora_sft never resizes or adapts an embedding: saying so spares peft's "auto" check, which looks the base
        # up on the hub (a request, or a warning offline) on every save
        if initial is None:
            model.save_pretrained(self.adapter, save_embedding_layers=False, state_dict=state)
        else:
            self.save_converted(model, Path(initial.name) / "initial")
        tokenizer.save_pretrained(self.adapter)

    def save_converted(self, model, initial: Path) -> None:
        """peft's conversion: A' = [A | A0], B' = [B | -B0], so B'A' = BA - B0A0 on top of W (rank and alpha doubled
        in adapter_config.json, the scale kept). It writes back only lora_A and lora_B: the rest the adapter trains
        (a head in modules_to_save, new token rows) is put back as trained."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import load_file, save_file

        model.save_pretrained(
            self.adapter, save_embedding_layers=False, path_initial_model_for_weight_conversion=str(initial)
        )
        weights = self.adapter / "adapter_model.safetensors"
        converted = load_file(weights)
        trained = get_peft_model_state_dict(model, save_embedding_layers=False)
        rest = {k: v.detach().cpu().contiguous() for k, v in trained.items() if k not in converted}
        rest = {k: v for k, v in rest.items() if ".lora_A." not in k and ".lora_B." not in k}
        if rest:
            save_file({**converted, **rest}, weights, metadata={"format": "pt"})

    @main_only
    def finish(self, manifest: Manifest, summary: Summary) -> None:
        manifest.ended = now()
        write_json(self.manifest, manifest.to_json())
        self.write_summary(summary)

    @main_only
    def write_summary(self, summary: Summary) -> None:
        write_json(self.summary, summary.to_json())

    @main_only
    def write_evaluation(self, evaluation: Evaluation, markdown: str) -> None:
        """eval.md and summary.json `evaluation` (what `eval` and the eval section measured); eval.md replaced in one
        step, so a link there is replaced, never the file it points to."""
        write_atomic(self.eval_report, lambda tmp: tmp.write_text(markdown))
        summary = self.read_summary()
        if summary is None:  # `eval` on a run whose summary is gone: the evaluation alone, as before
            write_json(self.summary, {"evaluation": evaluation.to_json()})
            return
        summary.evaluation = evaluation
        self.write_summary(summary)

    # -- removing: only what a run wrote
    @main_only
    def remove_run(self) -> None:
        """`--overwrite`: remove every artifact a run writes (ARTIFACTS and their .tmp files), the marker last;
        anything else in the folder (a file of the user's) stays."""
        names = (
            [n for n in ARTIFACTS if n != MARKER]
            + [f"{n}.tmp" for n in (MARKER, MANIFEST, SUMMARY, LOSS_PLOT)]
            + [MARKER]
        )
        for name in names:
            path = self.root / name
            if name == EXPORT and path.is_dir() and not path.is_symlink():
                ExportDir(path).owned().remove()  # only what export wrote: a file of the user's there stays
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    @main_only
    def drop_derived(self) -> None:
        """A new adapter/ is about to be written: eval.md, export/ and summary.json `evaluation` describe the old one."""
        self.eval_report.unlink(missing_ok=True)
        if self.export.is_dir() and not self.export.is_symlink():
            ExportDir(self.export).owned().remove()  # only what export wrote: a file of the user's there stays
        elif self.export.exists() or self.export.is_symlink():
            self.export.unlink()
        if self.summary.is_file():
            summary = json.loads(self.summary.read_text())
            if isinstance(summary, dict) and summary.pop("evaluation", None) is not None:
                write_json(self.summary, summary)


class ExportDir:
    """An export folder (RUN_DIR/export or --out): its marker, adapter/, merged/, fidelity.json."""

    def __init__(self, root: Path):
        self.root = root
        self.marker = root / EXPORT_MARKER
        self.adapter = root / EXPORT_ADAPTER
        self.merged = root / EXPORT_MERGED
        self.gguf = root / EXPORT_GGUF
        self.fidelity = root / FIDELITY

    def is_export(self) -> bool:
        """An earlier lora_sft export: marked, or (from before the marker) a fidelity.json that export wrote."""
        if self.marker.is_file():
            return True
        try:
            report = read_json(self.fidelity)
        except (OSError, ValueError):
            return False
        return isinstance(report, dict) and "pairs" in report and "run_dir" in report

    def owned(self) -> OwnedFolder:
        """The folder under the ownership rule: what an export wrote here (its marker lists it) is all that a new
        export replaces, or a new adapter removes."""
        return OwnedFolder(self.root, EXPORT_MARKER, EXPORT_NAMES)

    def mark(self, run_root: Path) -> None:
        write_json(self.marker, {"version": MARKER_VERSION, "created": now(), "run_dir": str(run_root)})

    def write_fidelity(self, report: FidelityReport) -> None:
        write_json(self.fidelity, report.to_json())

    def write_cards(self, card: str, merged_card: str | None) -> None:
        (self.adapter / CARD).write_text(card)
        if merged_card is not None:
            (self.merged / CARD).write_text(merged_card)
