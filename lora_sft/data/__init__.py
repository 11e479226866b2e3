"""The data stage: sources -> checked rows -> tokens and labels (packed or not), train and eval.

`check` needs no tokenizer (`validate` runs it); `build` tokenizes, applies the gate on samples
left with nothing to train, packs, and caches the result by a fingerprint of the data, the data
options and the tokenizer. Every row is checked before anything is written, and every problem is
reported at once, in file order (at most MAX_PROBLEMS lines, then a count of the rest).
"""

from __future__ import annotations

import hashlib
import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

import torch

from ..errors import UserError
from ..recipe import Recipe, Source
from ..tokens import IGNORE_INDEX as IGNORE
from ..tokens import count_trained
from . import cache
from .formats import Example, Options, Tokenized, check_row, label_id, label_names, tokenize, tokenize_classification
from .packing import PackedCollator, pack
from .read import fingerprint as source_fingerprint
from .read import read_source

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class Checked:
    """Rows that passed the format checks, before tokenization."""

    train: list[Example]
    eval: list[Example]
    labels: list[str] | None  # classification only


@dataclass
class DataBundle:
    train: Dataset  # rows of {input_ids, labels, ...}
    eval: Dataset | None
    labels: list[str] | None
    fingerprint: str  # data bytes + data options + tokenizer: the cache key
    stats: dict[str, Any] = field(default_factory=dict)


LENGTH = "length"  # the token count of an unpacked causal_lm sample (Trainer's length_column_name)


def groups_by_length(recipe: Recipe) -> bool:
    """data.group_by_length where it acts: causal_lm samples, unpacked (packed rows are all about max_length)."""
    return (
        recipe.data.group_by_length
        and recipe.task == "causal_lm"
        and not (recipe.data.packing or recipe.data.streaming)
    )


MAX_PROBLEMS = 20  # problem lines a data check prints; the rest are counted in one more line


def _capped(problems: list[str]) -> list[str]:
    if len(problems) <= MAX_PROBLEMS:
        return problems
    rest = len(problems) - MAX_PROBLEMS
    return problems[:MAX_PROBLEMS] + [
        f"{rest} more problem{'s' if rest > 1 else ''} in the data not shown; fix these and run again"
    ]


def _weighted(rows: list, weight: float | None, rng: random.Random) -> list:
    if weight is None:
        return rows
    whole, part = int(weight), weight - int(weight)
    return rows * whole + rng.sample(rows, round(len(rows) * part))


def _where(recipe: Recipe, split: str, i: int, *key: str) -> str:
    """The recipe place of a split's i-th source: `data.train.2` in a list, plain `data.train` otherwise."""
    return (
        recipe.where("data", split, i, *key)
        if isinstance(getattr(recipe.data, split), list)
        else recipe.where("data", split, *key)
    )


@dataclass
class _Part:
    """One source's checked rows, with the seeded generator that shuffles, limits and weights them."""

    split: str
    index: int
    source: Source
    rows: list[Example]
    rng: random.Random


def _unknown_column(recipe: Recipe, split: str, i: int, source: Source, rows: list) -> str | None:
    """A `columns` entry naming a column that no row has would drop that field everywhere."""
    good = [r.value for r in rows if r.value is not None]
    if not good:  # every row is bad: those lines say more than the mapping
        return None
    present = set().union(*good)
    for ours, theirs in source.columns.items():
        if theirs not in present:
            shown = sorted(present)
            have = ", ".join(shown[:20]) + (f", ... ({len(shown)} in all)" if len(shown) > 20 else "")
            return f"{_where(recipe, split, i, 'columns', ours)}: no row of {source.path} has the column '{theirs}' (its rows have: {have}); fix the mapping"
    return None


def _read_all(recipe: Recipe) -> tuple[list[_Part], list[str]]:
    """Every row of every source, checked, and every problem, in file order: sources in recipe order,
    files in path order, rows in line order. Nothing is shuffled yet, so the problems come in the
    order a person fixes them."""
    opts, parts, problems, seq = options(recipe), [], [], 0
    for split in ("train", "eval"):
        for i, source in enumerate(recipe.data.sources(split)):
            try:
                rows = read_source(source, _where(recipe, split, i))
            except UserError as e:
                problems += e.problems
                continue
            if (line := _unknown_column(recipe, split, i, source, rows)) is not None:
                problems.append(line)  # every row would report the missing field: one line says it
                continue
            examples = []
            for row in rows:
                if row.problem is not None:
                    problems.append(row.problem)
                    continue
                assert source.format is not None  # DataSection's validator gives every source a format
                try:
                    example = check_row(row, source.format, source.columns, opts)
                except UserError as e:
                    problems += e.problems
                    continue
                example.seq, seq = seq, seq + 1
                examples.append(example)
            parts.append(_Part(split, i, source, examples, random.Random(f"{recipe.seed}:{split}:{i}")))
    return parts, problems


def _hold_out(recipe: Recipe, parts: list[_Part]) -> list[Example]:
    """data.eval_fraction: the eval rows, taken from the train sources (seeded) before any weight repeats a row."""
    pool = [e for p in parts for e in p.rows]
    order = list(range(len(pool)))
    random.Random(recipe.seed).shuffle(order)
    n_eval = max(1, round(len(pool) * recipe.data.eval_fraction))
    if n_eval >= len(pool):
        raise UserError(f"{recipe.where('data', 'eval_fraction')}: {len(pool)} rows leave none to train on; lower it")
    held = {pool[j].seq for j in order[:n_eval]}
    for p in parts:
        p.rows = [e for e in p.rows if e.seq not in held]
    return [e for e in pool if e.seq in held]


def _labels(recipe: Recipe, train: list[Example], evals: list[Example]) -> list[str]:
    """Classification labels: data.labels, else those of the train rows (an eval-only label is an error)."""
    d = recipe.data
    labels = label_names(train, d.labels)
    if len(labels) < 2:
        raise UserError(f"{recipe.where('data', 'train')}: classification needs at least 2 labels, found {labels}")
    bad: dict[int, list[str]] = {}
    for e in train + evals:
        try:
            label_id(e, labels, derived=d.labels is None)
        except UserError as x:
            bad.setdefault(e.seq, x.problems)
    if bad:
        raise UserError(_capped([line for seq in sorted(bad) for line in bad[seq]]))
    return labels


def check(recipe: Recipe) -> Checked:
    """Read and check every row of every source (all problems at once, in file order); then, per
    source, shuffle (seeded) and limit; split off the eval rows; then apply the weights."""
    d = recipe.data
    parts, problems = _read_all(recipe)
    if problems:
        raise UserError(_capped(problems))
    for p in parts:
        if d.shuffle:
            p.rng.shuffle(p.rows)
        p.rows = p.rows[: p.source.limit]
    train_parts = [p for p in parts if p.split == "train"]
    evals = _hold_out(recipe, train_parts) if d.eval_fraction > 0 else None
    for p in parts:
        if p.split == "eval" and evals is not None:
            continue
        n = len(p.rows)
        p.rows = _weighted(p.rows, p.source.weight, p.rng)
        if n and not p.rows:
            problems.append(
                f"{_where(recipe, p.split, p.index, 'weight')}: weight {p.source.weight} keeps none of the {n} rows of {p.source.path}; raise it or remove the source"
            )
    if problems:
        raise UserError(_capped(problems))
    train = [e for p in train_parts for e in p.rows]
    if evals is None:
        evals = [e for p in parts if p.split == "eval" for e in p.rows]
    labels = _labels(recipe, train, evals) if d.formats() == {"classification"} else None
    return Checked(train, evals, labels)


def options(recipe: Recipe) -> Options:
    d = recipe.data
    return Options(d.max_length, d.truncation, d.train_on_inputs, d.train_turns, tuple(d.train_roles))


def cache_key(recipe: Recipe, tokenizer) -> str:
    """What the tokenized data depends on: the sources' bytes, the data options, the seed, the tokenizer."""
    parts = [
        cache.VERSION,
        recipe.task,
        str(recipe.seed),
        recipe.data.model_dump_json(exclude={"group_by_length"}),  # the order batches are drawn in, not the tokens
        cache.tokenizer_fingerprint(tokenizer),
    ]
    for split in ("train", "eval"):
        for i, source in enumerate(recipe.data.sources(split)):
            parts.append(source_fingerprint(source, _where(recipe, split, i)))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


_WORKER: tuple = ()  # (tokenizer, options, labels), inherited by forked tokenizer processes


def _tokenize_one(example: Example, tokenizer, opts: Options, labels) -> Tokenized:
    try:
        if labels is not None:
            return tokenize_classification(example, tokenizer, opts, labels)
        return tokenize(example, tokenizer, opts)
    except UserError as e:  # a row the template cannot render or mask: collected, reported with the others
        return Tokenized([], problems=e.problems)


def _tokenize_chunk(examples: list[Example]) -> list:
    tokenizer, opts, labels = _WORKER
    return [_tokenize_one(e, tokenizer, opts, labels) for e in examples]


def _tokenize_all(examples: list[Example], tokenizer, opts: Options, labels, num_proc: int) -> list:
    global _WORKER
    _WORKER = (tokenizer, opts, labels)
    if num_proc == 1 or len(examples) < 2 * num_proc:
        return _tokenize_chunk(examples)
    size = math.ceil(len(examples) / (num_proc * 4))
    chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
    with ProcessPoolExecutor(num_proc, mp_context=get_context("fork")) as pool:
        return [t for part in pool.map(_tokenize_chunk, chunks) for t in part]


def _split(
    examples: list[Example], results: list[Tokenized], recipe: Recipe, labels, name: str
) -> tuple[list[dict], dict]:
    d = recipe.data
    samples = [s for r in results for s in r.samples]
    untrained = [e for e, r in zip(examples, results) if r.untrained]
    stats: dict[str, Any] = {
        "rows": len(examples),
        "samples": len(samples),
        "truncated": sum(r.truncated for r in results),
        "dropped_no_trained_token": len(untrained),
        "dropped_too_long": sum(r.too_long for r in results),
        "tokens": sum(len(s["input_ids"]) for s in samples),
    }
    stats["trained_tokens"] = (
        stats["tokens"] if labels is not None else sum(count_trained(s["labels"]) for s in samples)
    )
    if name == "train" and examples and len(untrained) == len(examples):
        raise UserError(
            f"{recipe.where('data', 'max_length')}: every train sample lost its response to truncation at {d.max_length} tokens; raise it"
        )
    if name == "train" and examples and len(untrained) / len(examples) > d.max_dropped:
        share = len(untrained) / len(examples)
        raise UserError(
            f"{recipe.where('data', 'max_dropped')}: {len(untrained)} of {len(examples)} train samples ({share:.1%}) have no trained token left "
            f"after truncation to {d.max_length} tokens (first: {untrained[0].place}); raise data.max_length, or accept it with data.max_dropped: {math.ceil(share * 100) / 100}"
        )
    if d.packing and labels is None:
        samples, stats["packing_efficiency"] = pack(samples, d.max_length)
        stats["packed_rows"] = len(samples)
    elif labels is None:
        for s in samples:  # for data.group_by_length: Trainer reads the lengths from this column, not from every row
            s[LENGTH] = len(s["input_ids"])
    return samples, stats


def build(recipe: Recipe, tokenizer, checked: Checked | None = None) -> DataBundle:
    """Tokenized train and eval data (from the cache when nothing it depends on changed). Rows the
    template cannot render or mask are all reported at once, in file order."""
    from datasets import Dataset

    key = cache_key(recipe, tokenizer)
    if recipe.data.cache and (hit := cache.load(key)) is not None:
        return DataBundle(hit.train, hit.eval, hit.meta["labels"], key, hit.meta["stats"] | {"cached": True})
    checked = checked or check(recipe)
    opts = options(recipe)
    train_results = _tokenize_all(checked.train, tokenizer, opts, checked.labels, recipe.data.num_proc)
    eval_results = _tokenize_all(checked.eval, tokenizer, opts, checked.labels, recipe.data.num_proc)
    bad: dict[int, list[str]] = {}
    for e, r in zip(checked.train + checked.eval, train_results + eval_results):
        if r.problems:
            bad.setdefault(e.seq, r.problems)  # a weighted row repeats: report it once
    if bad:
        raise UserError(_capped([line for seq in sorted(bad) for line in bad[seq]]))
    train, train_stats = _split(checked.train, train_results, recipe, checked.labels, "train")
    evals, eval_stats = _split(checked.eval, eval_results, recipe, checked.labels, "eval")
    if not train:
        raise UserError(
            f"{recipe.where('data', 'max_length')}: no train sample is left after truncation to {recipe.data.max_length} tokens; raise it"
        )
    stats = {"train": train_stats, "eval": eval_stats}
    bundle = DataBundle(
        Dataset.from_list(train), Dataset.from_list(evals) if evals else None, checked.labels, key, stats
    )
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
