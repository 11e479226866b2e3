"""A finished run, rebuilt from its run directory (what `export`, `eval` and `generate` start from).

It goes through the stages that trained it: the saved recipe.yaml is loaded with `load_recipe`, the
data is checked and tokenized by the data stage, the base is loaded by `model.load_base` (4-bit as
trained, or unquantized in a chosen dtype) and the adapter comes from `adapter/`, with the tokenizer
(and its chat template) saved next to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from . import data as data_stage
from . import model as model_stage
from .errors import UserError
from .recipe import QuantSection, Recipe, load_recipe

@dataclass
class TrainedRun:
    root: Path
    recipe: Recipe
    plan: model_stage.ModelPlan
    checked: data_stage.Checked
    tokenizer: object

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def saved(self, name: str) -> dict:
        """A file the run wrote (recipe.yaml as trained, manifest.json, summary.json); {} if absent."""
        path = self.root / name
        if not path.is_file():
            return {}
        return yaml.safe_load(path.read_text()) if name.endswith(".yaml") else json.loads(path.read_text())

    def unpacked(self) -> TrainedRun:
        """The same run with data.packing off: one sample per row, with an attention mask (what a plain load
        or a generation is given). The model is the same; packing changes only how samples share rows."""
        if not self.recipe.data.packing:
            return self
        return replace(self, recipe=self.recipe.model_copy(update={"data": self.recipe.data.model_copy(update={"packing": False})}))

    def bundle(self) -> data_stage.DataBundle:
        return data_stage.build(self.recipe, self.tokenizer, self.checked)

    def base(self, dtype: str | None = None):
        """The frozen base: quantized as trained (dtype None), or unquantized in `dtype` (bf16, fp16, fp32)."""
        from transformers import set_seed

        recipe = self.recipe if dtype is None else self.recipe.model_copy(update={"quant": QuantSection(mode="none", compute_dtype=dtype)})
        set_seed(recipe.seed)  # a new head (classification) starts as it did in training: the base measured before training
        return model_stage.load_base(recipe, self.plan)

    def model(self, dtype: str | None = None):
        """Base + the saved adapter, in eval mode (peft's own loader: the adapter as a user loads it)."""
        model = model_stage.load_adapter(self.base(dtype), self.adapter)
        model.eval()
        return model

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = dict(data_stage.collator(self.recipe, self.tokenizer)(items))
        batch.pop("num_real_tokens", None)  # packed rows: a count for the Trainer, not a model input
        return batch


def open_run(path: str | Path, eval_file: str | None = None) -> TrainedRun:
    """Load a finished run's recipe, data and tokenizer; `eval_file` replaces its eval split."""
    root = Path(path).expanduser().resolve()
    for needed in ("recipe.yaml", "adapter/adapter_config.json"):
        if not (root / needed).is_file():
            raise UserError(f"{path}: not a finished run directory ({needed} is missing); pass the output_dir of a run that `train` completed")
    # Nothing is trained here: no gradient checkpointing.
    recipe = load_recipe(root / "recipe.yaml", ["train.gradient_checkpointing=false"])
    checked = data_stage.check(recipe)
    if eval_file is not None:
        if not Path(eval_file).expanduser().exists():  # named by its flag: the run's recipe.yaml has no such path
            raise UserError(f"--data {eval_file}: file not found (paths resolve against the working directory {Path.cwd()})")
        eval_file = str(Path(eval_file).expanduser().resolve())
        # The labels stay those the head was trained with; a label the file adds is an error naming its row.
        data = recipe.data.model_copy(update={"eval": eval_file, "eval_fraction": 0.0, "labels": checked.labels})
        recipe = recipe.model_copy(update={"data": data})
        checked = data_stage.check(recipe)
    source = model_stage.resolve_source(recipe)
    plan = model_stage.plan_model(recipe, source, checked.labels)
    tokenizer = model_stage.load_tokenizer(recipe, model_stage.ModelSource(str(root / "adapter"), "run directory"))
    return TrainedRun(root, recipe, plan, checked, tokenizer)
