"""The data stage: files -> checked rows -> tokens and labels, split into train and eval.

`check` needs no tokenizer (it is what `validate` runs); `build` tokenizes. Every row is checked
before anything is written, so bad data never leaves a half-made run directory.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..recipe import Recipe
from .formats import IGNORE, Example, check as check_row, label_id, label_names, tokenize
from .read import read_rows


@dataclass
class Checked:
    """Rows that passed the format checks, before tokenization."""

    train: list[Example]
    eval: list[Example]
    labels: list[str] | None  # classification only
    fingerprint: str  # data bytes + format options


@dataclass
class DataBundle:
    train: list[dict]
    eval: list[dict]
    labels: list[str] | None
    fingerprint: str
    stats: dict = field(default_factory=dict)


def _paths(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def check(recipe: Recipe) -> Checked:
    """Read and check every row of the recipe's data files; split off the eval rows."""
    d = recipe.data
    train_rows, train_hash = read_rows(_paths(d.train), recipe.where("data", "train"))
    eval_rows, eval_hash = read_rows(_paths(d.eval), recipe.where("data", "eval")) if d.eval else ([], "")
    train = [check_row(r, d.format) for r in train_rows]
    evals = [check_row(r, d.format) for r in eval_rows]
    if d.eval_fraction > 0:
        order = list(range(len(train)))
        random.Random(recipe.seed).shuffle(order)
        n_eval = max(1, round(len(train) * d.eval_fraction))
        if n_eval >= len(train):
            raise UserError(f"{recipe.where('data', 'eval_fraction')}: {len(train)} rows leave none to train on; lower it")
        held = set(order[:n_eval])
        evals = [train[i] for i in sorted(held)]
        train = [e for i, e in enumerate(train) if i not in held]
    labels = None
    if d.format == "classification":
        labels = label_names(train + evals, d.labels)
        if len(labels) < 2:
            raise UserError(f"{recipe.where('data', 'train')}: classification needs at least 2 labels, found {labels}")
        for e in train + evals:
            label_id(e, labels)  # raises on an unknown label, naming the row
    options = json.dumps({"data": d.model_dump(mode="json"), "seed": recipe.seed}, sort_keys=True)
    fingerprint = hashlib.sha256(f"{train_hash}{eval_hash}{options}".encode()).hexdigest()
    return Checked(train, evals, labels, fingerprint)


def _tokenize_split(examples: list[Example], recipe: Recipe, tokenizer, labels) -> tuple[list[dict], dict]:
    d = recipe.data
    out, truncated, dropped = [], 0, 0
    for e in examples:
        if labels is not None:
            enc = tokenizer(e.text)
            if len(enc["input_ids"]) > d.max_length:
                truncated += 1
                enc = tokenizer(e.text, truncation=True, max_length=d.max_length)
            item = {k: list(v) for k, v in enc.items()} | {"labels": label_id(e, labels)}
        else:
            item, cut = tokenize(e, tokenizer, d.max_length, d.train_on_inputs)
            truncated += cut
            if all(t == IGNORE for t in item["labels"]):
                dropped += 1  # truncation left no response token: nothing to learn from
                continue
        out.append(item)
    tokens = sum(len(i["input_ids"]) for i in out)
    trained = tokens if labels is not None else sum(sum(t != IGNORE for t in i["labels"]) for i in out)
    return out, {"rows": len(out), "truncated": truncated, "dropped": dropped, "tokens": tokens, "trained_tokens": trained}


def build(recipe: Recipe, tokenizer, checked: Checked | None = None) -> DataBundle:
    """Tokenize the checked rows: input_ids, attention_mask, labels (-100 where no loss)."""
    checked = checked or check(recipe)
    train, train_stats = _tokenize_split(checked.train, recipe, tokenizer, checked.labels)
    evals, eval_stats = _tokenize_split(checked.eval, recipe, tokenizer, checked.labels)
    if not train:
        raise UserError(f"{recipe.where('data', 'max_length')}: every train sample lost its response to truncation at {recipe.data.max_length} tokens; raise it")
    return DataBundle(train, evals, checked.labels, checked.fingerprint, {"train": train_stats, "eval": eval_stats})


class CausalCollator:
    """Pads a batch on the right: input_ids with the pad id, labels with -100, attention_mask with 0."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)

        def pad(key, value):
            return torch.tensor([b[key] + [value] * (width - len(b[key])) for b in batch])

        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": pad("attention_mask", 0), "labels": pad("labels", IGNORE)}
