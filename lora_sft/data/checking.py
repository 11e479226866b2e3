"""Sources -> checked rows, train and eval: every row read and checked (no tokenizer needed, `validate` runs it),
every problem reported at once, in file order (at most MAX_PROBLEMS lines, then a count of the rest); then per
source the seeded shuffle and limit, the eval split, and the weights.

The rows go to an Arrow file as they are checked (table.py), memory-mapped; the shuffles, the eval split and
the weights work on arrays of row numbers.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass

import numpy as np

from lora_sft.data import cache, table
from lora_sft.data.formats import FIELDS, Options, check_row, fitting_formats, label_id, label_names
from lora_sft.data.keys import _remember_fingerprints, _where, check_key
from lora_sft.data.read import iter_source
from lora_sft.data.table import Examples
from lora_sft.errors import UserError
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.sections import Source


@dataclass
class Checked:
    """Rows that passed the format checks, before tokenization: the train and eval examples in their order,
    read from a memory-mapped file a batch at a time (never all held as Python objects)."""

    train: Examples
    eval: Examples
    labels: list[str] | None  # classification only


MAX_PROBLEMS = table.MAX_PROBLEMS  # problem lines a data check prints; the rest are counted in one more line


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def _weighted(rows: np.ndarray, weight: float | None, rng: random.Random) -> np.ndarray:
    if weight is None:
        return rows
    whole, part = int(weight), weight - int(weight)
    picked = rng.sample(range(len(rows)), round(len(rows) * part))  # the draws of sampling the rows themselves
    return np.concatenate([np.tile(rows, whole), rows[np.asarray(picked, dtype=np.int64)]])


@dataclass
class _Part:
    """One source's checked rows (their row numbers in the checked-rows file, which are their seqs), with the
    seeded generator that shuffles, limits and weights them."""

    split: str
    index: int
    source: Source
    rows: np.ndarray
    rng: random.Random


def _unknown_column(recipe: Recipe, split: str, i: int, source: Source, present: set[str] | None) -> str | None:
    """A `columns` entry naming a column that no row has would drop that field everywhere. `present`: the
    columns of the rows that could be read (None: no row could be, and those lines say more)."""
    if present is None:
        return None
    for ours, theirs in source.columns.items():
        if theirs not in present:
            shown = sorted(present)
            have = ", ".join(shown[:20]) + (f", ... ({len(shown)} in all)" if len(shown) > 20 else "")
            return f"{_where(recipe, split, i, 'columns', ours)}: no row of {source.path} has the column '{theirs}' (its rows have: {have}); fix the mapping"
    return None


def _other_format(recipe: Recipe, split: str, i: int, source: Source, present: set[str] | None) -> str | None:
    """Rows that have another format's fields and not this one's (a messages file read with format alpaca): every
    row would say the same, so one line names the format they have. None where the rows fit no other format."""
    if present is None or source.columns or present & set(FIELDS[str(source.format)]):
        return None  # rows with some of this format's fields: each row's missing field is the fix
    fits = fitting_formats(dict.fromkeys(present))
    if len(fits) != 1 or source.format in fits:
        return None
    fields = (
        ", ".join(f"`{f}`" for f in FIELDS[fits[0]])
        if fits[0] != "messages" or "messages" in present
        else "`conversations`"
    )
    key = "data.format" if recipe.data.format == source.format else "the source's format"
    return (
        f"{_where(recipe, split, i)}: the rows of {source.path} have {fields} (format {fits[0]}), not the fields of "
        f"format {source.format} ({', '.join(FIELDS[str(source.format)])}); set {key}: {fits[0]}"
    )


def _read_one(recipe: Recipe, split: str, i: int, source: Source, writer: table.ExampleWriter):
    """A source's rows read, checked and written one by one, in file order; their row numbers and problems."""
    assert source.format is not None  # DataSection's validator gives every source a format
    opts, found, present, start = options(recipe), table.Problems(), None, writer.written
    try:
        for row in iter_source(source, _where(recipe, split, i)):
            if row.problem is not None or row.value is None:
                found.add([row.problem or row.place])
                continue
            present = set(row.value) if present is None else present
            present.update(row.value)
            try:
                example = check_row(row, source.format, source.columns, opts)
            except UserError as e:
                found.add(e.problems)
                continue
            example.seq = writer.written
            writer.add_example(example)
    except UserError as e:  # the source cannot be found or loaded at all
        found = table.Problems()
        found.add(e.problems)
    else:
        line = _unknown_column(recipe, split, i, source, present)
        if line is None and writer.written == start:  # no row passed: a file of another format, said once
            line = _other_format(recipe, split, i, source, present)
        if line is not None:
            found = table.Problems()  # every row would report the missing field: one line says it
            found.add([line])
    return np.arange(start, writer.written, dtype=np.int64), found


def _read_all(recipe: Recipe, writer: table.ExampleWriter) -> tuple[list[_Part], table.Problems]:
    """Every row of every source, checked, and every problem, in file order: sources in recipe order,
    files in path order, rows in line order. Nothing is shuffled yet, so the problems come in the
    order a person fixes them."""
    parts, problems = [], table.Problems()
    for split in ("train", "eval"):
        for i, source in enumerate(recipe.data.sources(split)):
            rows, found = _read_one(recipe, split, i, source, writer)
            problems.extend(found, merge=False)  # a file read by two sources: each source's rows are its own
            parts.append(_Part(split, i, source, rows, random.Random(f"{recipe.seed}:{split}:{i}")))
    return parts, problems


def _hold_out(recipe: Recipe, parts: list[_Part]) -> np.ndarray:
    """data.eval_fraction: the eval rows, taken from the train sources (seeded) before any weight repeats a row."""
    pool = _cat([p.rows for p in parts])
    order = np.arange(len(pool))
    random.Random(recipe.seed).shuffle(order)  # type: ignore[call-overload]  # the same draws as on a list
    n_eval = max(1, round(len(pool) * recipe.data.eval_fraction))
    if n_eval >= len(pool):
        raise UserError(f"{recipe.where('data', 'eval_fraction')}: {len(pool)} rows leave none to train on; lower it")
    held = np.zeros(len(pool), bool)
    held[order[:n_eval]] = True
    at = 0
    for p in parts:
        p.rows, at = p.rows[~held[at : at + len(p.rows)]], at + len(p.rows)
    return pool[held]


def _labels(recipe: Recipe, train: Examples, evals: Examples) -> list[str]:
    """Classification labels: data.labels, else those of the train rows (an eval-only label is an error)."""
    d = recipe.data
    labels = label_names(train, d.labels)
    if len(labels) < 2:
        raise UserError(f"{recipe.where('data', 'train')}: classification needs at least 2 labels, found {labels}")
    problems = table.Problems()
    for e in Examples(train.rows, np.unique(_cat([train.order, evals.order]))):  # each row once, in seq order
        try:
            label_id(e, labels, derived=d.labels is None)
        except UserError as x:
            problems.add(x.problems)
    if problems:
        raise problems.error()
    return labels


def check(recipe: Recipe) -> Checked:
    """Read and check every row of every source (all problems at once, in file order); then, per
    source, shuffle (seeded) and limit; split off the eval rows; then apply the weights. The rows go
    to an Arrow file as they are checked; with data.cache the result is kept, keyed by the data's bytes
    and options, so a second run reads no row."""
    d = recipe.data
    try:
        key = check_key(recipe) if d.cache else None
    except UserError:  # a source that cannot be found or read: the check below says so with the other problems
        key = None
    if key is not None and (hit := cache.load_checked(key)) is not None:
        return Checked(Examples(hit.rows, hit.train), Examples(hit.rows, hit.eval), hit.labels)
    folder = table.work_dir(cache.root() if d.cache else None)
    try:
        checked = _check(recipe, table.ExampleWriter(folder / "checked.arrow"))
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    if key is not None:
        cache.save_checked(key, checked.train.rows.path, checked.train.order, checked.eval.order, checked.labels)
        _remember_fingerprints()
    return checked


def _check(recipe: Recipe, writer: table.ExampleWriter) -> Checked:
    d = recipe.data
    parts, problems = _read_all(recipe, writer)
    rows = writer.mapped()
    if problems:
        raise problems.error()
    for p in parts:
        if d.shuffle:
            p.rng.shuffle(p.rows)  # type: ignore[call-overload]  # the same draws as on a list
        p.rows = p.rows[: p.source.limit]
    train_parts = [p for p in parts if p.split == "train"]
    held = _hold_out(recipe, train_parts) if d.eval_fraction > 0 else None
    for p in parts:
        if p.split == "eval" and held is not None:
            continue
        n = len(p.rows)
        p.rows = _weighted(p.rows, p.source.weight, p.rng)
        if n and not len(p.rows):
            problems.add(
                [
                    f"{_where(recipe, p.split, p.index, 'weight')}: weight {p.source.weight} keeps none of the {n} rows of {p.source.path}; raise it or remove the source"
                ]
            )
    if problems:
        raise problems.error()
    train = Examples(rows, _cat([p.rows for p in train_parts]))
    evals = Examples(rows, held if held is not None else _cat([p.rows for p in parts if p.split == "eval"]))
    labels = _labels(recipe, train, evals) if d.formats() == {"classification"} else None
    return Checked(train, evals, labels)


def options(recipe: Recipe) -> Options:
    d = recipe.data
    return Options(d.max_length, d.truncation, d.train_on_inputs, d.train_turns, tuple(d.train_roles))
