"""The run directory's typed records: what manifest.json, summary.json (with its `evaluation`) and fidelity.json
hold, each a dataclass that writes and reads its own JSON. They import nothing of the model or data stages, so a
run's records can be read (by `plot`, a dashboard, a script) without loading either."""

from __future__ import annotations

import platform
import sys
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

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


def _json(value: Any) -> Any:
    if isinstance(value, list):
        return [_json(v) for v in value]
    return value.to_json() if isinstance(value, Record) else value


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
            out[f.name] = _json(value)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]):
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass
class Resumed(Record):
    """manifest.json `resumed`: one entry per --resume, the step and checkpoint it continued from; `inexact`
    (--allow-inexact): what the checkpoint lacked, so what the resumed run started anew (Gap.text: the file, what
    it holds, why), e.g. "optimizer.pt (the optimizer state) is missing"."""

    from_step: int
    checkpoint: str
    inexact: list[str] = field(default_factory=list)

    OPTIONAL = ("inexact",)


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
    resumed: list[Resumed] = field(default_factory=list)  # one entry per --resume
    model_file: dict[str, Any] | None = None  # a GGUF base: its name, size, sha256, type (gguf_source.GGUFFile.record)

    OPTIONAL = ("resumed", "model_file")

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Manifest:
        manifest = super().from_json(raw)
        manifest.resumed = [Resumed.from_json(r) for r in manifest.resumed if isinstance(r, dict)]
        return manifest

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
