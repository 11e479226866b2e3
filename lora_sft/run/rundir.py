"""The run directory: the one module that names a run's files and folders, writes and reads them, and owns
a run's lifecycle (create, reopen for resume, finish, overwrite, open a finished run):

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
adapter is written. An export folder is marked too (`.lora_sft-export`), so an export replaces only
an earlier export.

What is written is typed: `Manifest`, `Summary`, `Evaluation`, `FidelityReport` (their JSON is the
contract: the same keys in the same order). The model card (adapter/README.md) is rendered here, by
`RunDir.write_card`, once everything it reports exists (the eval section's results included).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from lora_sft import data as data_stage
from lora_sft.distributed import main_only
from lora_sft.errors import UserError
from lora_sft.model import gguf_source
from lora_sft.model import load as model_stage
from lora_sft.recipe.schema import QuantSection, Recipe, load_recipe

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
CARD = "README.md"  # the model card, in adapter/ (and in an export's adapter/ and merged/)
ADAPTER_CONFIG = "adapter_config.json"  # peft's name: what makes adapter/ an adapter
MARKER_VERSION = 1

LIBRARIES = (
    "lora_sft",
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "evaluate",
    "pydantic",
)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict[str, str]:
    from lora_sft import __version__

    out = {"python": platform.python_version(), "lora_sft": __version__}
    for lib in LIBRARIES[1:]:
        try:
            out[lib] = metadata.version(lib.replace("_", "-"))
        except metadata.PackageNotFoundError:
            out[lib] = "not installed"
    return out


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file next to `path`, which then replaces `path` in one step: a reader (or a run
    killed meanwhile) sees the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    write(tmp)
    tmp.replace(path)


def write_json(path: Path, value) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, default=str) + "\n"))


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


class Record:
    """A dataclass written as a JSON object: its fields in order; optional ones (None, or an empty list) left out
    when absent, so the JSON is what lora_sft always wrote."""

    OPTIONAL: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self.OPTIONAL and value in (None, []):
                continue
            out[f.name] = value.to_json() if isinstance(value, Record) else value
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]):
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class Manifest(Record):
    """manifest.json: how the run was made (command, seed, data fingerprint and stats, library versions, times)."""

    started: str
    ended: str | None
    command: list[str]
    seed: int
    data_fingerprint: str
    data: dict[str, Any]
    model_source: str
    versions: dict[str, str]
    resumed: list[dict[str, Any]] = field(default_factory=list)  # one entry per --resume: from_step, checkpoint
    model_file: dict[str, Any] | None = None  # a GGUF base: its name, size, sha256, type (gguf_source.GGUFFile.record)

    OPTIONAL = ("resumed", "model_file")

    @classmethod
    def new(
        cls, seed: int, fingerprint: str, data_stats: dict, model_source: str, model_file: dict | None = None
    ) -> Manifest:
        return cls(
            now(), None, sys.argv, seed, fingerprint, data_stats, model_source, versions(), model_file=model_file
        )


@dataclass
class Evaluation(Record):
    """summary.json `evaluation` (and eval.md): what `eval` measured on held-out data, base and fine-tuned."""

    data: str  # "eval split", or the --data file
    rows: int
    fine_tuned: dict[str, Any]
    samples: list[dict[str, Any]]
    base: dict[str, Any] | None = None
    generation_skipped: str | None = None  # why no generation metrics
    # the model the responses were generated with, per model measured: what it is, its max |logit diff| to the model
    # scored (the one as trained) on the eval samples, the seconds it took (evaluation.generator)
    generation: dict[str, Any] | None = None

    OPTIONAL = ("base", "generation_skipped", "generation")

    def to_json(self) -> dict[str, Any]:
        out = (
            {"data": self.data, "rows": self.rows}
            | ({"base": self.base} if self.base else {})
            | {"fine_tuned": self.fine_tuned, "samples": self.samples}
        )
        out |= {"generation_skipped": self.generation_skipped} if self.generation_skipped else {}
        return out | ({"generation": self.generation} if self.generation else {})

    def table(self) -> list[str]:
        """The metrics as a markdown table: base | fine-tuned | change, or fine-tuned alone."""
        after, before = self.fine_tuned, self.base
        if before:
            return ["| metric | base | fine-tuned | change |", "| --- | --- | --- | --- |"] + [
                f"| {k} | {before[k]:.4f} | {v:.4f} | {v - before[k]:+.4f} |"
                for k, v in after.items()
                if isinstance(v, int | float)
            ]
        return ["| metric | fine-tuned |", "| --- | --- |"] + [
            f"| {k} | {v:.4f} |" for k, v in after.items() if isinstance(v, int | float)
        ]


@dataclass
class EarlyStopped(Record):
    """summary.json `early_stopping` (train.early_stopping): the metric watched, the best evaluation (adapter/ holds
    its checkpoint) and the step training stopped at (None: it ran to its last step without triggering)."""

    metric: str
    best_step: int | None
    best_metric: float | None
    stopped_at: int | None
    adapter: str  # which checkpoint adapter/ holds, e.g. "checkpoint-4 (the best)"


@dataclass
class Summary(Record):
    """summary.json: the finished run's losses, eval metrics before and after, tokens, speed, memory, time;
    `evaluation` once the eval section (or `eval`) measured the adapter."""

    train_loss: float | None
    train_loss_mean: float
    eval_loss: float | None
    eval: dict[str, Any] | None
    eval_before: dict[str, Any] | None
    steps: int
    epochs: float | None
    tokens_seen: int
    tokens_trained: int
    tokens_per_second: float
    skipped_steps: list[int]
    trainable_params: int
    total_params: int
    peak_memory_mb: float
    peak_memory_kind: str
    train_time_s: float
    wall_time_s: float
    # processes that trained (torchrun / accelerate launch: DDP), and the samples one optimizer step saw over all
    # of them: micro batch x grad_accum x world_size. None in summaries written before lora_sft stated it.
    world_size: int = 1
    global_batch: int | None = None
    early_stopping: EarlyStopped | None = None
    evaluation: Evaluation | None = None

    OPTIONAL = ("global_batch", "early_stopping", "evaluation")

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Summary:
        summary = super().from_json({k: v for k, v in raw.items() if k not in ("evaluation", "early_stopping")})
        if isinstance(raw.get("early_stopping"), dict):
            summary.early_stopping = EarlyStopped.from_json(raw["early_stopping"])
        if isinstance(raw.get("evaluation"), dict):
            summary.evaluation = Evaluation.from_json(raw["evaluation"])
        return summary


@dataclass
class FidelityReport(Record):
    """export/fidelity.json: the three-way comparison of `export`, the plain-library load checks, serving warnings."""

    run_dir: str
    dtype: str
    samples: int
    held_out: bool
    models: dict[str, str]
    positions: int
    tolerance: float
    pairs: dict[str, dict[str, float]]
    perplexity: dict[str, float]
    loaded_plain: dict[str, Any]
    serving_warnings: list[str]
    passed: bool
    problems: list[str]
    train_samples: int = 0  # of `samples`, the train rows (no eval split, or one too small for MIN_POSITIONS)
    tolerance_rule: str = ""  # how `tolerance` was set
    merged_export: dict[str, Any] | None = None
    merge_onto: dict[str, Any] | None = None  # --merged: both merges (dequantized, original) against the trained model
    gguf: dict[str, Any] | None = None  # the GGUF file and its llama.cpp load check (gguf_export.check)

    def to_json(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("merged_export", "merge_onto", "gguf", "serving_warnings", "passed", "problems")
        }
        for optional in ("merged_export", "merge_onto", "gguf"):
            if getattr(self, optional) is not None:
                out[optional] = getattr(self, optional)
        return out | {"serving_warnings": self.serving_warnings, "passed": self.passed, "problems": self.problems}


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
        self.root = Path(root).expanduser().resolve()
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

    def is_empty(self) -> bool:
        return not self.root.exists() or (self.root.is_dir() and not any(self.root.iterdir()))

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
        return [record for line in self.metrics.read_text().splitlines() if isinstance(record := _record(line), dict)]

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
    def reopen(self, step: int, checkpoint: Path, recipe_dict: dict) -> Manifest:
        """Continue the run from `checkpoint` (at `step`): drop log records of the steps about to be redone, the
        summary of an earlier finish; the manifest records the resume."""
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
        info.resumed.append({"from_step": step, "checkpoint": str(checkpoint)})
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
        """eval.md and summary.json `evaluation` (what `eval` and the eval section measured)."""
        self.eval_report.write_text(markdown)
        summary = self.read_summary()
        if summary is None:  # `eval` on a run whose summary is gone: the evaluation alone, as before
            write_json(self.summary, {"evaluation": evaluation.to_json()})
            return
        summary.evaluation = evaluation
        self.write_summary(summary)

    @main_only
    def write_card(self, labels: list[str] | None) -> None:
        """adapter/README.md, rendered from what the run wrote: recipe.yaml, manifest.json, summary.json (with the
        eval section's results when it ran). Called last, once all of these exist."""
        self.card.write_text(self.render_card(labels))

    def render_card(self, labels: list[str] | None) -> str:
        recipe = self.read_recipe()
        summary = self.read_summary()
        config = self.adapter / ADAPTER_CONFIG
        added = config.is_file() and bool(read_json(config).get("trainable_token_indices"))
        return model_card(recipe, self.read_manifest()["data"], summary.to_json() if summary else {}, labels, added)

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
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    @main_only
    def drop_derived(self) -> None:
        """A new adapter/ is about to be written: eval.md, export/ and summary.json `evaluation` describe the old one."""
        self.eval_report.unlink(missing_ok=True)
        if self.export.is_dir() and not self.export.is_symlink():
            shutil.rmtree(self.export)
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

    def mark(self, run_root: Path) -> None:
        write_json(self.marker, {"version": MARKER_VERSION, "created": now(), "run_dir": str(run_root)})

    def write_fidelity(self, report: FidelityReport) -> None:
        write_json(self.fidelity, report.to_json())

    def write_cards(self, card: str, merged_card: str | None) -> None:
        (self.adapter / CARD).write_text(card)
        if merged_card is not None:
            (self.merged / CARD).write_text(merged_card)


# ---------------------------------------------------------------- a finished run, opened again


@dataclass
class FinishedRun:
    """A finished run, rebuilt from its run directory (what `export`, `eval` and `generate` start from).

    It goes through the stages that trained it: the saved recipe.yaml is loaded with `load_recipe`, the data is
    checked and tokenized by the data stage, the base is loaded by `model.load_base` (4-bit as trained, or
    unquantized in a chosen dtype) and the adapter comes from adapter/, with the tokenizer (and its chat
    template) saved next to it."""

    dir: RunDir
    recipe: Recipe
    plan: model_stage.ModelPlan
    checked: data_stage.Checked
    tokenizer: Any  # a transformers tokenizer, loaded from adapter/

    @property
    def root(self) -> Path:
        return self.dir.root

    @property
    def adapter(self) -> Path:
        return self.dir.adapter

    def unpacked(self) -> FinishedRun:
        """The same run with data.packing off: one sample per row, with an attention mask (what a plain load
        or a generation is given). The model is the same; packing changes only how samples share rows."""
        if not self.recipe.data.packing:
            return self
        return replace(
            self, recipe=self.recipe.model_copy(update={"data": self.recipe.data.model_copy(update={"packing": False})})
        )

    def bundle(self) -> data_stage.DataBundle:
        return data_stage.build(self.recipe, self.tokenizer, self.checked)

    def base(self, dtype: Literal["bf16", "fp16", "fp32"] | None = None):
        """The frozen base: quantized as trained (dtype None), or unquantized in `dtype` (bf16, fp16, fp32)."""
        from transformers import set_seed

        recipe = (
            self.recipe
            if dtype is None
            else self.recipe.model_copy(update={"quant": QuantSection(mode="none", compute_dtype=dtype)})
        )
        set_seed(
            recipe.seed
        )  # a new head (classification) starts as it did in training: the base measured before training
        return model_stage.load_base(recipe, self.plan)

    def model(self, dtype: Literal["bf16", "fp16", "fp32"] | None = None):
        """Base + the saved adapter, in eval mode (peft's own loader: the adapter as a user loads it)."""
        model = model_stage.load_adapter(self.base(dtype), self.adapter)
        model.eval()
        return model

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = dict(data_stage.collator(self.recipe, self.tokenizer)(items))
        batch.pop("num_real_tokens", None)  # packed rows: a count for the Trainer, not a model input
        return batch


def open_run(path: str | Path, eval_file: str | None = None) -> FinishedRun:
    """Load a finished run's recipe, data and tokenizer; `eval_file` replaces its eval split."""
    run_dir = RunDir(path)
    for needed in (run_dir.recipe, run_dir.adapter / ADAPTER_CONFIG):
        if not needed.is_file():
            name = needed.relative_to(run_dir.root).as_posix()
            raise UserError(
                f"{path}: not a finished run directory ({name} is missing); pass the output_dir of a run that `train` completed"
            )
    # Nothing is trained here: no gradient checkpointing.
    recipe = load_recipe(run_dir.recipe, ["train.gradient_checkpointing=false"])
    checked = data_stage.check(recipe)
    if eval_file is not None:
        if not Path(eval_file).expanduser().exists():  # named by its flag: the run's recipe.yaml has no such path
            raise UserError(
                f"--data {eval_file}: file not found (paths resolve against the working directory {Path.cwd()})"
            )
        eval_file = str(Path(eval_file).expanduser().resolve())
        # The labels stay those the head was trained with; a label the file adds is an error naming its row.
        data = recipe.data.model_copy(update={"eval": eval_file, "eval_fraction": 0.0, "labels": checked.labels})
        recipe = recipe.model_copy(update={"data": data})
        checked = data_stage.check(recipe)
    source = model_stage.resolve_source(recipe)
    if why := gguf_source.changed(run_dir.read_manifest().get("model_file"), source.gguf):
        raise UserError(
            f"{recipe.where('model', 'path')}: {why}; the adapter belongs to the file it was trained on: put that file back"
        )
    plan = model_stage.plan_model(recipe, source, checked.labels)
    tokenizer = model_stage.load_tokenizer(recipe, model_stage.ModelSource(str(run_dir.adapter), "run directory"))
    model_stage.plan_tokens(plan, tokenizer, None)  # special tokens the run added: the base grows rows for them
    return FinishedRun(run_dir, recipe, plan, checked, tokenizer)


# ---------------------------------------------------------------- the model card


def model_card(
    recipe: dict, data_stats: dict, summary: dict, labels: list[str] | None, added_tokens: bool = False
) -> str:
    """The adapter's README.md from the saved recipe, the manifest's data stats and summary.json: results, the
    eval table (when the eval section or `eval` ran), how to load it (`added_tokens`: the run added special
    tokens, so the base needs rows for them before peft loads the adapter), the recipe."""
    task = recipe["task"]
    base = recipe["model"]["path"]
    tags = [
        "lora",
        "qlora",
        "peft",
        "lora_sft",
        "text-classification" if task == "classification" else "text-generation",
    ]
    auto = "AutoModelForSequenceClassification" if task == "classification" else "AutoModelForCausalLM"
    label_args = f", num_labels={len(labels)}, id2label={dict(enumerate(labels))!r}" if labels else ""
    results = {k: summary.get(k) for k in ("eval_before", "eval", "train_loss", "eval_loss")}
    evaluation = None
    if summary.get("evaluation"):  # what `eval` measured, without its sample generations
        results["evaluation"] = {k: v for k, v in summary["evaluation"].items() if k != "samples"}
        evaluation = Evaluation.from_json(summary["evaluation"])
    from lora_sft import __version__

    # `base_model` is hub metadata: a hub id, never a path that exists only on the training machine.
    # A local folder (the rule model.resolve_source applies: the path exists) is named in the text instead.
    local = Path(base).expanduser().exists()
    name = Path(base).name if local else base
    metadata = "" if local else f"base_model: {base}\n"
    origin = f" The base model is a local folder, `{name}`, not a hub model." if local else ""
    load_from = f"path/to/{name}" if local else base
    grow = (
        'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")\n'
        "# the run added special tokens: the base needs embedding rows for them before the adapter loads\n"
        "if len(tokenizer) > base.get_input_embeddings().num_embeddings:\n"
        "    base.resize_token_embeddings(len(tokenizer))\n"
        if added_tokens
        else ""
    )
    table = ""
    if evaluation is not None:
        table = (
            "\n## Evaluation\n\n"
            + f"{evaluation.rows} held-out samples ({evaluation.data}).\n\n"
            + "\n".join(evaluation.table())
            + "\n"
        )
    init = recipe["lora"].get("init")
    saved_rank = (
        f", init {init}: saved as a rank-{2 * recipe['lora']['rank']} LoRA for the original base"
        if init in model_stage.MUTATING_INITS
        else ""
    )
    return f"""---
{metadata}library_name: peft
tags: {json.dumps(tags)}
---

# LoRA adapter for {name}

Trained with lora_sft {__version__} ({recipe["quant"]["mode"]} base, LoRA rank {recipe["lora"]["rank"]}{saved_rank}, task `{task}`).{origin}

## Data

{data_stats["train"]["rows"]} train samples ({data_stats["train"]["trained_tokens"]} trained tokens), {data_stats["eval"]["rows"]} eval samples.

## Results

```json
{json.dumps(results, indent=2)}
```
{table}
## Use it

```python
from peft import PeftModel
from transformers import {auto}, AutoTokenizer

base = {auto}.from_pretrained("{load_from}"{label_args})
{grow}model = PeftModel.from_pretrained(base, "path/to/adapter")
tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")
```

## Recipe

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```
"""
