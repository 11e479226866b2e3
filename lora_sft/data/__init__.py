"""The data stage: sources -> checked rows -> tokens and labels (packed or not), train and eval.

`check` needs no tokenizer (`validate` runs it); `build` tokenizes, applies the gate on samples
left with nothing to train, packs, and caches the result by a fingerprint of the data, the data
options and the tokenizer. Every row is checked before anything is written, and every problem is
reported at once, in file order (at most MAX_PROBLEMS lines, then a count of the rest).

Rows never all live as Python objects: they are read, checked and tokenized a batch at a time into Arrow
files (table.py), memory-mapped; shuffles, the eval split, weights, the gate, statistics and packing work
on arrays of row numbers and lengths, and the splits are gathered from the files by index.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from lora_sft.data import cache, table
from lora_sft.data.formats import Options, check_row, label_id, label_names, tokenize_batch
from lora_sft.data.packing import PackedCollator, bins_of, pack_columns
from lora_sft.data.read import files_of, iter_source
from lora_sft.data.read import fingerprint as source_fingerprint
from lora_sft.data.table import Examples
from lora_sft.errors import UserError
from lora_sft.recipe.schema import Recipe, Source
from lora_sft.tokens import IGNORE_INDEX as IGNORE

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class Checked:
    """Rows that passed the format checks, before tokenization: the train and eval examples in their order,
    read from a memory-mapped file a batch at a time (never all held as Python objects)."""

    train: Examples
    eval: Examples
    labels: list[str] | None  # classification only


@dataclass
class DataBundle:
    train: Dataset  # rows of {input_ids, labels, ...}, memory-mapped Arrow
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


MAX_PROBLEMS = table.MAX_PROBLEMS  # problem lines a data check prints; the rest are counted in one more line
MAX_PROCESSES = 8  # data.num_proc's default: the available cores, at most this many


def _cat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)


def _weighted(rows: np.ndarray, weight: float | None, rng: random.Random) -> np.ndarray:
    if weight is None:
        return rows
    whole, part = int(weight), weight - int(weight)
    picked = rng.sample(range(len(rows)), round(len(rows) * part))  # the draws of sampling the rows themselves
    return np.concatenate([np.tile(rows, whole), rows[np.asarray(picked, dtype=np.int64)]])


def _where(recipe: Recipe, split: str, i: int, *key: str) -> str:
    """The recipe place of a split's i-th source: `data.train.2` in a list, plain `data.train` otherwise."""
    return (
        recipe.where("data", split, i, *key)
        if isinstance(getattr(recipe.data, split), list)
        else recipe.where("data", split, *key)
    )


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
        if (line := _unknown_column(recipe, split, i, source, present)) is not None:
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
            problems.extend(found)
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


_FINGERPRINTS: dict[str, str] = {}  # a source's fingerprint by its stamp (`_stamp`): hashed once a process
_UNSAVED: dict[str, str] = {}  # fingerprints hashed here that the cache does not know yet (cache.remember_fingerprints)


def _stamp(source: Source, where: str) -> str | None:
    """The source's options and its files' paths, sizes, inodes and times: while it holds, so do the files'
    bytes (as git's index assumes). None for a hub dataset or a file that cannot be read (hashed every time)."""
    try:
        files = files_of(source, where)
        if files is None:
            return None
        stats = [(str(f), (st := f.stat()).st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns) for f in files]
    except OSError:
        return None
    return json.dumps([source.model_dump_json(), stats])


def _source_fingerprints(recipe: Recipe) -> list[str]:
    out = []
    for split in ("train", "eval"):
        for i, source in enumerate(recipe.data.sources(split)):
            where = _where(recipe, split, i)
            stamp = _stamp(source, where)
            if stamp is None:
                out.append(source_fingerprint(source, where))
                continue
            if stamp not in _FINGERPRINTS:
                known = cache.known_fingerprint(stamp) if recipe.data.cache else None
                _FINGERPRINTS[stamp] = known or source_fingerprint(source, where)
                if known is None:
                    _UNSAVED[stamp] = _FINGERPRINTS[stamp]
            out.append(_FINGERPRINTS[stamp])
    return out


def _remember_fingerprints() -> None:
    cache.remember_fingerprints(_UNSAVED)
    _UNSAVED.clear()


def _data_options(recipe: Recipe) -> str:
    # not group_by_length (the order batches are drawn in) nor num_proc: neither changes a token
    return recipe.data.model_dump_json(exclude={"group_by_length", "num_proc"})


def check_key(recipe: Recipe) -> str:
    """What the checked rows depend on: the sources' bytes, the data options, the seed."""
    parts = [cache.VERSION, "checked", str(recipe.seed), _data_options(recipe), *_source_fingerprints(recipe)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def cache_key(recipe: Recipe, tokenizer) -> str:
    """What the tokenized data depends on: the sources' bytes, the data options, the seed, the tokenizer."""
    parts = [
        cache.VERSION,
        recipe.task,
        str(recipe.seed),
        _data_options(recipe),
        cache.tokenizer_fingerprint(tokenizer),
        *_source_fingerprints(recipe),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def processes(num_proc: int | None, rows: int) -> int:
    """Tokenizing processes: data.num_proc, else the available cores (at most MAX_PROCESSES); one for small data."""
    wanted = num_proc or min(
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, MAX_PROCESSES
    )
    return max(1, min(wanted, rows // (2 * table.BATCH)))


_WORKER: tuple = ()  # (checked rows, tokenizer, options, labels), inherited by forked tokenizer processes


@dataclass
class _Shard:
    """A run of rows tokenized by one process: per row its sample count and what truncation did, per sample
    its length; the samples in an Arrow file."""

    path: Path
    counts: np.ndarray
    truncated: np.ndarray
    too_long: np.ndarray
    untrained: np.ndarray
    lengths: np.ndarray
    problems: table.Problems


def _tokenize_shard(job: tuple[np.ndarray, Path]) -> _Shard:
    rows, tokenizer, opts, labels = _WORKER
    seqs, path = job
    n = len(seqs)
    counts, truncated = np.zeros(n, np.int64), np.zeros(n, bool)
    too_long, untrained = np.zeros(n, bool), np.zeros(n, bool)
    lengths: list[np.ndarray] = []
    writer, problems, at = table.ArrowWriter(path), table.Problems(), 0
    for batch in Examples(rows, seqs).batches():
        results = tokenize_batch(batch, tokenizer, opts, labels)
        sizes = []
        for r in results:
            if r.problems:
                problems.add(r.problems)
            counts[at], truncated[at], too_long[at], untrained[at] = (
                len(r.samples),
                r.truncated,
                r.too_long,
                r.untrained,
            )
            for s in r.samples:
                writer.add(s)
                sizes.append(len(s["input_ids"]))
            at += 1
        lengths.append(np.asarray(sizes, np.int64))
    writer.close()
    return _Shard(path, counts, truncated, too_long, untrained, _cat(lengths), problems)


@dataclass
class _Tokens:
    """Every needed row tokenized: the samples (memory-mapped), and per row where its samples start."""

    needed: np.ndarray  # the rows' seqs, ascending
    files: list[table.Mapped]
    samples: pa.Table | None
    first: np.ndarray
    counts: np.ndarray
    truncated: np.ndarray
    too_long: np.ndarray
    untrained: np.ndarray
    lengths: np.ndarray

    def release(self) -> None:
        for f in self.files:
            f.release()


def _tokenize_rows(checked: Checked, tokenizer, opts: Options, labels, num_proc: int | None, folder: Path) -> _Tokens:
    """Tokenize each row that trains or evaluates once (a weighted row repeats later, by index), in seq order,
    in batches, over processes; the problems of every row at once, in file order."""
    global _WORKER
    needed = np.unique(_cat([checked.train.order, checked.eval.order]))
    _WORKER = (checked.train.rows, tokenizer, opts, labels)
    procs = processes(num_proc, len(needed))
    size = max(table.BATCH, math.ceil(len(needed) / (procs * 4)))
    jobs = [(needed[a : a + size], folder / f"samples-{k}.arrow") for k, a in enumerate(range(0, len(needed), size))]
    if procs == 1:
        shards = [_tokenize_shard(job) for job in jobs]
    else:
        with ProcessPoolExecutor(procs, mp_context=get_context("fork")) as pool:
            shards = list(pool.map(_tokenize_shard, jobs))
    problems = table.Problems()
    for shard in shards:
        problems.extend(shard.problems)
    if problems:
        raise problems.error()
    files = [table.Mapped(s.path) for s in shards]
    tables = [f.table for f in files if f.map is not None]
    counts = _cat([s.counts for s in shards])
    return _Tokens(
        needed,
        files,
        pa.concat_tables(tables) if tables else None,
        np.cumsum(counts) - counts,
        counts,
        _cat([s.truncated for s in shards]).astype(bool),
        _cat([s.too_long for s in shards]).astype(bool),
        _cat([s.untrained for s in shards]).astype(bool),
        _cat([s.lengths for s in shards]),
    )


def _ranges(first: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenation of range(first[k], first[k] + counts[k]) for every k."""
    starts = np.cumsum(counts) - counts
    return np.repeat(first - starts, counts) + np.arange(int(counts.sum()))


def _trained(labels: pa.ChunkedArray | pa.Array) -> int:
    """Trained tokens of a labels column (tokens.count_trained of each row, summed)."""
    lengths = pc.list_value_length(labels).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(labels).to_numpy(zero_copy_only=False)
    trained = values != IGNORE
    starts = (np.cumsum(lengths) - lengths)[lengths > 0]
    return int(trained.sum() - trained[starts].sum())


GATHER = table.BATCH // 2  # samples gathered into an output file at once: each gather from the memory-mapped
# samples maps the pages around every sample it reads (the kernel maps 64 KiB, or a whole large folio, around a
# fault), so fewer at once keeps that part of the resident set small whatever the number of samples


def _write_split(tok: _Tokens, idx: np.ndarray, path: Path, recipe: Recipe, labels, stats: dict) -> Dataset | None:
    """The samples `idx` in order into an Arrow file (packed for data.packing), counting the trained tokens."""
    from datasets import Dataset

    if not len(idx):
        return None
    assert tok.samples is not None
    samples, writer, trained = table.Gatherer(tok.samples), table.ArrowWriter(path), 0
    if recipe.data.packing and labels is None:
        bins = bins_of(tok.lengths[idx], recipe.data.max_length)
        order = np.lexsort((np.arange(len(idx)), bins))  # row by row, the data order inside a row
        ends = np.cumsum(np.bincount(bins))
        for first_bin in range(0, len(ends), GATHER // 4):
            a = int(ends[first_bin - 1]) if first_bin else 0
            b = int(ends[min(first_bin + GATHER // 4, len(ends)) - 1])
            chunk = samples.take(idx[order[a:b]])
            trained += _trained(chunk["labels"])
            writer.write_batch(pack_columns(chunk, bins[order[a:b]]))
            tok.release()
        stats["packing_efficiency"] = stats["tokens"] / (len(ends) * recipe.data.max_length)
        stats["packed_rows"] = len(ends)
    else:
        for a in range(0, len(idx), GATHER):
            chunk = samples.take(idx[a : a + GATHER])
            if labels is None:
                trained += _trained(chunk["labels"])
                # for data.group_by_length: Trainer reads the lengths from this column, not from every row
                chunk = chunk.append_column(LENGTH, pc.list_value_length(chunk["input_ids"]).cast(pa.int64()))
            writer.write_batch(chunk)
            tok.release()
    writer.close()
    tok.release()
    stats["trained_tokens"] = stats["tokens"] if labels is not None else trained
    return Dataset.from_file(str(path))


def _split(examples: Examples, tok: _Tokens, recipe: Recipe, labels, name: str, folder: Path):
    d = recipe.data
    at = np.searchsorted(tok.needed, examples.order)  # each row's place among the tokenized rows
    idx = _ranges(tok.first[at], tok.counts[at])
    untrained = tok.untrained[at]
    stats: dict[str, Any] = {
        "rows": len(examples),
        "samples": len(idx),
        "truncated": int(tok.truncated[at].sum()),
        "dropped_no_trained_token": int(untrained.sum()),
        "dropped_too_long": int(tok.too_long[at].sum()),
        "tokens": int(tok.lengths[idx].sum()),
        "trained_tokens": 0,  # counted as the samples are written
    }
    n, dropped = len(examples), stats["dropped_no_trained_token"]
    if name == "train" and n and dropped == n:
        raise UserError(
            f"{recipe.where('data', 'max_length')}: every train sample lost its response to truncation at {d.max_length} tokens; raise it"
        )
    if name == "train" and n and dropped / n > d.max_dropped:
        share, first = dropped / n, examples[int(np.argmax(untrained))]
        raise UserError(
            f"{recipe.where('data', 'max_dropped')}: {dropped} of {n} train samples ({share:.1%}) have no trained token left "
            f"after truncation to {d.max_length} tokens (first: {first.place}); raise data.max_length, or accept it with data.max_dropped: {math.ceil(share * 100) / 100}"
        )
    return _write_split(tok, idx, folder / f"{name}.arrow", recipe, labels, stats), stats


def build(recipe: Recipe, tokenizer, checked: Checked | None = None) -> DataBundle:
    """Tokenized train and eval data (from the cache when nothing it depends on changed). Rows the
    template cannot render or mask are all reported at once, in file order. Rows are tokenized in
    batches, over data.num_proc processes, into Arrow files; the statistics, the gate and packing
    work on the columns, so memory stays flat whatever the number of rows."""
    key = cache_key(recipe, tokenizer)
    if recipe.data.cache and (hit := cache.load(key)) is not None:
        return DataBundle(hit.train, hit.eval, hit.meta["labels"], key, hit.meta["stats"] | {"cached": True})
    checked = checked or check(recipe)
    folder = table.work_dir(cache.root() if recipe.data.cache else None)
    tok = _tokenize_rows(checked, tokenizer, options(recipe), checked.labels, recipe.data.num_proc, folder)
    train, train_stats = _split(checked.train, tok, recipe, checked.labels, "train", folder)
    evals, eval_stats = _split(checked.eval, tok, recipe, checked.labels, "eval", folder)
    for f in tok.files:  # the samples now live in the split files; the pages mapped so far stay readable
        f.path.unlink(missing_ok=True)
    if train is None:
        raise UserError(
            f"{recipe.where('data', 'max_length')}: no train sample is left after truncation to {recipe.data.max_length} tokens; raise it"
        )
    stats = {"train": train_stats, "eval": eval_stats}
    if recipe.data.cache:
        cache.save(key, train, evals, {"labels": checked.labels, "stats": stats})
        _remember_fingerprints()
    return DataBundle(train, evals, checked.labels, key, stats)


def lengths(dataset: Dataset) -> np.ndarray:
    """The token count of each row, from the Arrow column's offsets (no row becomes Python objects)."""
    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy(zero_copy_only=False)


def largest_token(dataset: Dataset) -> int | None:
    """The largest token id in the rows, from the Arrow column."""
    top = pc.max(pc.list_flatten(dataset.with_format("arrow")["input_ids"])).as_py()
    return None if top is None else int(top)


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
