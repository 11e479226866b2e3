"""Checked rows -> the tokenized train and eval data (`build`, a DataBundle), packed or not.

Rows are tokenized in batches, over data.num_proc processes, into Arrow files, memory-mapped; the gate on samples
left with nothing to train, the statistics and packing work on the columns, and the splits are gathered from the
files by index, so memory stays flat whatever the number of rows. The result is cached by a fingerprint of the
data, the data options and the tokenizer (keys.py).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lora_sft.data import cache, chats, table
from lora_sft.data.checking import Checked, _cat, check, options
from lora_sft.data.encode import tokenize_batch
from lora_sft.data.formats import Options
from lora_sft.data.keys import _remember_fingerprints, cache_key
from lora_sft.data.packing import bins_of, pack_columns
from lora_sft.data.table import Examples
from lora_sft.errors import UserError
from lora_sft.recipe.schema import Recipe
from lora_sft.tokens import IGNORE_INDEX as IGNORE

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass
class DataBundle:
    train: Dataset  # rows of {input_ids, labels, ...}, memory-mapped Arrow
    eval: Dataset | None
    labels: list[str] | None
    fingerprint: str  # data bytes + data options + tokenizer: the cache key
    stats: dict[str, Any] = field(default_factory=dict)


LENGTH = "length"  # the token count of an unpacked causal_lm sample (Trainer's length_column_name)


MAX_PROCESSES = 8  # data.num_proc's default: the available cores, at most this many


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
    if not train_stats["trained_tokens"]:  # every label masked: the loss would be 0/0, NaN at the first step
        raise UserError(
            f"{recipe.where('data', 'train')}: no train sample has a trained token ({train_stats['samples']} samples, "
            f"{train_stats['tokens']} tokens, every one masked), so training would stop on a NaN loss at step 1; check that "
            "the chat template renders the trained turns (data.chat_template) and data.train_roles / data.train_on_inputs"
        )
    if checked.labels is None and (dropped := chats.system_dropped(tokenizer, checked.train)) is not None:
        train_stats["system_dropped"] = dropped | {"template": chats.template_name(tokenizer)}
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
