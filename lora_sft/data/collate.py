"""The batch builders: padding for causal LM samples, packed rows (packing.py), classification."""

from __future__ import annotations

import torch

from lora_sft.data.packing import PackedCollator
from lora_sft.recipe.schema import Recipe
from lora_sft.settings import RunSettings
from lora_sft.tokens import IGNORE_INDEX as IGNORE


class CausalCollator:
    """Pads a batch on the right: input_ids with the pad id, labels with -100, attention_mask with 0."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = [b["input_ids"] + [self.pad_id] * (width - len(b["input_ids"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [IGNORE] * (width - len(b["labels"])) for b in batch]
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}


def collator(recipe: Recipe | RunSettings, tokenizer):
    """The batch builder for this recipe's data."""
    if recipe.task == "classification":
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)
    return PackedCollator(tokenizer.pad_token_id) if recipe.data.packing else CausalCollator(tokenizer.pad_token_id)
