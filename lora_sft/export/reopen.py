"""A finished run, opened again: what `export`, `eval` and `generate` start from.

The run directory's records (lora_sft.run.rundir) are read without the model or data stages; reopening a run for
export goes through the stages that trained it, so it lives here, one layer up.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from lora_sft import data as data_stage
from lora_sft import model as model_stage
from lora_sft.errors import UserError, one_line, shown
from lora_sft.model import gguf_source
from lora_sft.paths import resolved
from lora_sft.recipe.load import load_recipe
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.sections import QuantSection
from lora_sft.run.rundir import ADAPTER_CONFIG, RunDir
from lora_sft.run.start import token_rows_problem
from lora_sft.settings import RunSettings, resolve


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

    @property
    def settings(self) -> RunSettings:
        """The run's recipe resolved on this machine (its compute dtype: what a snippet or a plain load uses)."""
        return resolve(self.recipe)

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
        return model_stage.load_base(resolve(recipe), self.plan)

    def model(self, dtype: Literal["bf16", "fp16", "fp32"] | None = None):
        """Base + the saved adapter, in eval mode (peft's own loader: the adapter as a user loads it)."""
        base = self.base(dtype)
        try:
            model = model_stage.load_adapter(base, self.adapter)
        except RuntimeError as e:  # torch's load_state_dict: one "size mismatch for NAME: ..." line per tensor
            if "size mismatch" not in str(e):
                raise
            raise self._other_base(e) from None
        model.eval()
        return model

    def _other_base(self, e: RuntimeError) -> UserError:
        """The adapter's tensors do not fit the base that model.path holds now: another model is there."""
        mismatches = [line.strip() for line in str(e).splitlines() if line.strip().startswith("size mismatch for")]
        first = mismatches[0].removeprefix("size mismatch for ").rstrip(".") if mismatches else one_line(e)
        model_path = self.recipe.model.path
        return UserError(
            f"{self.root}: the adapter does not fit the model in {shown(model_path)} (model.path of the run): {len(mismatches)} tensors differ in shape, the first {first}; that folder now holds another model than the run trained on: put the base the run trained on back there (its recipe.yaml names the folder)"
        )

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
        eval_file = str(resolved(eval_file, f"--data {eval_file}"))
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
    if why := token_rows_problem(run_dir.adapter, plan):  # before any weight loads or anything is written
        raise UserError(f"{path}: {why}")
    return FinishedRun(run_dir, recipe, plan, checked, tokenizer)
