"""The recipe: the one source of truth for a run.

`Recipe` is the root of the nested pydantic models (the sections in sections.py and training.py), every one
with `extra="forbid"`; load.py reads it from YAML with its line numbers kept, so every problem is reported
as `file:line: key.path: what is wrong`. Field docstrings are the documentation (`validate --explain`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import PrivateAttr, field_validator, model_validator

from lora_sft.recipe.sections import (
    DataSection,
    EvalSection,
    HubSection,
    LoraSection,
    ModelSection,
    QuantSection,
    Section,
)
from lora_sft.recipe.source import RecipeSource
from lora_sft.recipe.training import TrainSection

SEED_MAX = 2**32 - 1  # numpy's seed range; torch and random take it too


class Recipe(Section):
    task: Literal["causal_lm", "classification"]
    """causal_lm: instruction or chat SFT of a causal LM; classification: a sequence classifier with a new head."""
    output_dir: str
    """The run directory (relative paths resolve against the working directory)."""
    seed: int = 42
    """Seeds data splits, shuffling, adapter init and dropout."""
    model: ModelSection
    quant: QuantSection = QuantSection()
    lora: LoraSection = LoraSection()
    data: DataSection
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    hub: HubSection = HubSection()

    _source: RecipeSource | None = PrivateAttr(None)
    _train_as_written: TrainSection | None = PrivateAttr(None)  # set by `with_train`: what saved_dict stores

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        if not 0 <= seed <= SEED_MAX:
            raise ValueError(f"must be between 0 and {SEED_MAX} (got {seed})")
        return seed

    @model_validator(mode="after")
    def _task_matches_format(self) -> Recipe:
        formats = self.data.formats()
        if formats and (self.task == "classification") != (formats == {"classification"}):
            want = "classification" if self.task == "classification" else "alpaca, prompt_completion, messages or text"
            raise ValueError(f"task {self.task} needs data.format {want} (got {', '.join(sorted(formats))})")
        return self

    @model_validator(mode="after")
    def _stream_settings(self) -> Recipe:
        """data.streaming: the settings of other sections a stream needs or cannot serve."""
        if not self.data.streaming:
            return self
        if self.train.max_steps is None:
            raise ValueError(
                "data.streaming: true needs train.max_steps (a stream has no known length, so epochs cannot be counted); set train.max_steps"
            )
        if self.task != "causal_lm":
            raise ValueError(
                "data.streaming: true needs task causal_lm (classification reads every label first); set data.streaming: false"
            )
        if self.lora.init == "eva":
            raise ValueError(
                "data.streaming: true cannot run lora.init eva (its data pass needs a sized dataset); use another lora.init or data.streaming: false"
            )
        return self

    def where(self, *path: str | int) -> str:
        """`file:line: key.path` for a place in this recipe, for error messages."""
        return self._source.where(path) if self._source else ".".join(map(str, path))

    def with_train(self, **settings: Any) -> Recipe:
        """This recipe with train settings lora_sft resolved for the run (the memory planner's micro batch,
        grad_accum and gradient checkpointing), which training uses; `saved_dict` still gives the train section
        as the user wrote it, so the run directory stores (and a resume compares) the user's recipe."""
        resolved = self.model_copy(update={"train": self.train.model_copy(update=settings)})
        resolved._train_as_written = self._train_as_written or self.train
        return resolved

    def resolved_dict(self) -> dict[str, Any]:
        """The fully resolved recipe, defaults filled in (what the run directory stores)."""
        return self.model_dump(mode="json")

    def saved_dict(self) -> dict[str, Any]:
        """`resolved_dict` with every local path made absolute (against the working directory, as they were read):
        output_dir, a local model folder, a .jinja chat template, data sources that are local files, folders or
        globs. Hub ids stay as written. What the run directory stores, so `eval`, `export` and `generate` work
        on it from any directory."""
        out = self.resolved_dict()
        if self._train_as_written is not None:  # the user's train section, not the settings resolved for this run
            out["train"] = self._train_as_written.model_dump(mode="json")

        def absolute(path: str) -> str:
            return str(Path(path).expanduser().resolve())

        def local(path: str) -> bool:
            return bool(path) and (any(ch in path for ch in "*?[") or Path(path).expanduser().exists())

        out["output_dir"] = absolute(self.output_dir)
        if Path(self.model.path).expanduser().exists():  # the rule model.resolve_source applies: a folder that exists
            out["model"]["path"] = absolute(self.model.path)
        template = self.data.chat_template
        if template and Path(template).expanduser().is_file():
            out["data"]["chat_template"] = absolute(template)
        for split in ("train", "eval"):
            value = out["data"][split]
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                path = item if isinstance(item, str) else None if item is None else item["path"]
                if path is None or not local(path):
                    continue
                if any(ch in path for ch in "*?["):  # a glob: anchor it, keep the pattern
                    fixed = path if Path(path).expanduser().is_absolute() else str(Path.cwd() / Path(path).expanduser())
                else:
                    fixed = absolute(path)
                if isinstance(item, str):
                    items[i] = fixed
                else:
                    item["path"] = fixed
            out["data"][split] = items if isinstance(value, list) else items[0]
        return out
