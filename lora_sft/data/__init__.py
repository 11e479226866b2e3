"""The data stage: sources -> checked rows -> tokens and labels (packed or not), train and eval.

`check` needs no tokenizer (`validate` runs it); `build` tokenizes, applies the gate on samples
left with nothing to train, packs, and caches the result by a fingerprint of the data, the data
options and the tokenizer. Every row is checked before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch

from ..errors import UserError
from ..recipe import Recipe
from . import cache
from .formats import IGNORE, Example, Options, label_id, label_names, tokenize, tokenize_classification
from .formats import check as check_row
from .packing import PackedCollator, pack
from .read import fingerprint as source_fingerprint
from .read import read_source


@dataclass
class Checked:
    """Rows that passed the format checks, before tokenization."""

    train: list[Example]
    eval: list[Example]
    labels: list[str] | None  # classification only


@dataclass
class DataBundle:
    train: object  # a datasets.Dataset of {input_ids, labels, ...}
    eval: object | None
    labels: list[str] | None
    fingerprint: str  # data bytes + data options + tokenizer: the cache key
    stats: dict = field(default_factory=dict)


def _weighted(rows: list, weight: float | None, rng: random.Random) -> list:
    if weight is None:
        return rows
    whole, part = int(weight), weight - int(weight)
    return rows * whole + rng.sample(rows, round(len(rows) * part))


def _where(recipe: Recipe, split: str, i: int) -> str:
    """The recipe place of a split's i-th source: `data.train.2` in a list, plain `data.train` otherwise."""
    return recipe.where("data", split, i) if isinstance(getattr(recipe.data, split), list) else recipe.where("data", split)


def _read_split(recipe: Recipe, split: str) -> list[Example]:
    examples = []
    for i, source in enumerate(recipe.data.sources(split)):
        rows = read_source(source, _where(recipe, split, i))
        rng = random.Random(f"{recipe.seed}:{split}:{i}")
        if recipe.data.shuffle:
            rng.shuffle(rows)
        rows = _weighted(rows[: source.limit], source.weight, rng)
        examples += [check_row(r, source.format, source.columns) for r in rows]
    return examples


def check(recipe: Recipe) -> Checked:
    """Read and check every row of every source; split off the eval rows."""
    train, evals = _read_split(recipe, "train"), _read_split(recipe, "eval")
    d = recipe.data
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
    if d.formats() == {"classification"}:
        labels = label_names(train + evals, d.labels)
        if len(labels) < 2:
            raise UserError(f"{recipe.where('data', 'train')}: classification needs at least 2 labels, found {labels}")
        for e in train + evals:
            label_id(e, labels)  # raises on an unknown label, naming the row
    return Checked(train, evals, labels)


def options(recipe: Recipe) -> Options:
    d = recipe.data
    return Options(d.max_length, d.truncation, d.train_on_inputs, d.train_turns, tuple(d.train_roles))


def cache_key(recipe: Recipe, tokenizer) -> str:
    """What the tokenized data depends on: the sources' bytes, the data options, the seed, the tokenizer."""
    parts = [cache.VERSION, recipe.task, str(recipe.seed), recipe.data.model_dump_json(), cache.tokenizer_fingerprint(tokenizer)]
    for split in ("train", "eval"):
        for i, source in enumerate(recipe.data.sources(split)):
            parts.append(source_fingerprint(source, _where(recipe, split, i)))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


_WORKER: tuple = ()  # (tokenizer, options, labels), inherited by forked tokenizer processes


def _tokenize_chunk(examples: list[Example]) -> list:
    tokenizer, opts, labels = _WORKER
    if labels is not None:
        return [tokenize_classification(e, tokenizer, opts, labels) for e in examples]
    return [tokenize(e, tokenizer, opts) for e in examples]


def _tokenize_all(examples: list[Example], tokenizer, opts: Options, labels, num_proc: int) -> list:
    global _WORKER
    _WORKER = (tokenizer, opts, labels)
    if num_proc == 1 or len(examples) < 2 * num_proc:
        return _tokenize_chunk(examples)
    size = math.ceil(len(examples) / (num_proc * 4))
    chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
    with ProcessPoolExecutor(num_proc, mp_context=get_context("fork")) as pool:
        return [t for part in pool.map(_tokenize_chunk, chunks) for t in part]


def _split(examples: list[Example], recipe: Recipe, tokenizer, labels, name: str) -> tuple[list[dict], dict]:
    d, opts = recipe.data, options(recipe)
    results = _tokenize_all(examples, tokenizer, opts, labels, d.num_proc)
    samples = [s for r in results for s in r.samples]
    untrained = [e for e, r in zip(examples, results) if r.untrained]
    stats = {
        "rows": len(examples),
        "samples": len(samples),
        "truncated": sum(r.truncated for r in results),
        "dropped_no_trained_token": len(untrained),
        "dropped_too_long": sum(r.too_long for r in results),
        "tokens": sum(len(s["input_ids"]) for s in samples),
    }
    stats["trained_tokens"] = stats["tokens"] if labels is not None else sum(sum(t != IGNORE for t in s["labels"][1:]) for s in samples)
    if name == "train" and examples and len(untrained) == len(examples):
        raise UserError(f"{recipe.where('data', 'max_length')}: every train sample lost its response to truncation at {d.max_length} tokens; raise it")
    if name == "train" and examples and len(untrained) / len(examples) > d.max_dropped:
        share = len(untrained) / len(examples)
        raise UserError(
            f"{recipe.where('data', 'max_dropped')}: {len(untrained)} of {len(examples)} train samples ({share:.1%}) have no trained token left "
            f"after truncation to {d.max_length} tokens (first: {untrained[0].place}); raise data.max_length, or accept it with data.max_dropped: {math.ceil(share * 100) / 100}"
        )
    if d.packing and labels is None:
        samples, stats["packing_efficiency"] = pack(samples, d.max_length)
        stats["packed_rows"] = len(samples)
    return samples, stats


def build(recipe: Recipe, tokenizer, checked: Checked | None = None) -> DataBundle:
    """Tokenized train and eval data (from the cache when nothing it depends on changed)."""
    from datasets import Dataset

    key = cache_key(recipe, tokenizer)
    if recipe.data.cache and (hit := cache.load(key)) is not None:
        return DataBundle(hit.train, hit.eval, hit.meta["labels"], key, hit.meta["stats"] | {"cached": True})
    checked = checked or check(recipe)
    train, train_stats = _split(checked.train, recipe, tokenizer, checked.labels, "train")
    evals, eval_stats = _split(checked.eval, recipe, tokenizer, checked.labels, "eval")
    if not train:
        raise UserError(f"{recipe.where('data', 'max_length')}: no train sample is left after truncation to {recipe.data.max_length} tokens; raise it")
    stats = {"train": train_stats, "eval": eval_stats}
    bundle = DataBundle(Dataset.from_list(train), Dataset.from_list(evals) if evals else None, checked.labels, key, stats)
    if recipe.data.cache:
        cache.save(key, bundle.train, bundle.eval, {"labels": checked.labels, "stats": stats})
    return bundle


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


def collator(recipe: Recipe, tokenizer):
    """The batch builder for this recipe's data."""
    if recipe.task == "classification":
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)
    return PackedCollator(tokenizer.pad_token_id) if recipe.data.packing else CausalCollator(tokenizer.pad_token_id)
