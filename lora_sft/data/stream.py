"""data.streaming: the train data as a stream, checked, tokenized and packed on the fly, resumable exactly.

The train sources are read one after another (`read.stream_source`: .jsonl and .txt line by line, a hub dataset
with datasets' streaming mode) in blocks of `data.stream_buffer` rows. A block's rows are checked (a bad row stops
the run with its file:line), shuffled together (data.shuffle; seeded by seed, the pass and the block), tokenized,
and with data.packing packed together best-fit into rows of max_length; then its items (samples or packed rows)
are handed to the Trainer in order. At the end of the sources the stream starts its next pass, so the data loops
until train.max_steps. Memory is bounded by one block.

A block is a pure function of where it starts (the pass, the block number, the source and row it starts at), so
the stream's position is small: that start and the items of the block already trained on (`Position`). Each
checkpoint saves the position of the last item the saved steps trained on (`AtomicCheckpoints`' extras), and a
resumed run reads the block again from there and skips what was trained: the batches are exactly those of the
unbroken run, and Trainer's own skip (which would iterate every batch since the start) is turned off
(`ignore_data_skip`).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import TrainerCallback

from lora_sft import compat, distributed
from lora_sft.data import cache as data_cache
from lora_sft.data import table
from lora_sft.data.checking import Checked, options
from lora_sft.data.encode import Tokenized, tokenize
from lora_sft.data.formats import Example, check_row
from lora_sft.data.keys import _where
from lora_sft.data.packing import pack
from lora_sft.data.read import Row, files_of, read_source, stream_source
from lora_sft.data.read import fingerprint as source_fingerprint
from lora_sft.data.tokenized import DataBundle
from lora_sft.errors import UserError
from lora_sft.recipe.schema import Recipe
from lora_sft.tokens import count_trained

if TYPE_CHECKING:
    from datasets import Dataset

    from lora_sft.data.table import Examples


@dataclass(frozen=True)
class Position:
    """Where the stream is: a block's start and the items of that block already trained on."""

    passes: int = 0  # whole passes over the train sources done
    block: int = 0  # blocks of this pass before this one
    source: int = 0  # the train source this block starts in ...
    row: int = 0  # ... and the row of that source it starts at
    skip: int = 0  # items (samples or packed rows) of this block already trained on


@dataclass(frozen=True)
class _Block:
    """A block the stream has produced: its first item's number in the run, its start, its size, what follows."""

    first: int
    start: Position
    items: int
    after: Position


def _launcher_refused(recipe: Recipe, world: distributed.World) -> None:
    if world.launched:
        raise UserError(
            f"{recipe.where('data', 'streaming')}: streaming trains in one process (the stream is not split between processes); run without torchrun or accelerate launch, or set data.streaming: false"
        )


def _rows(recipe: Recipe, source: int = 0, row: int = 0) -> Iterator[tuple[int, int, Row]]:
    """(source index, row index in that source, row) of one pass over the train sources from (source, row) on;
    a source's `limit` ends it early."""
    for i, s in enumerate(recipe.data.sources("train")):
        if i < source:
            continue
        first = row if i == source else 0
        rows = stream_source(s, _where(recipe, "train", i), first)
        for n, r in enumerate(itertools.islice(rows, None if s.limit is None else max(s.limit - first, 0)), first):
            yield i, n, r


def _check(recipe: Recipe, row: Row, index: int) -> Example:
    """A train row checked as the data stage checks it; a bad row is a UserError with its place."""
    if row.problem is not None:
        raise UserError(row.problem)
    source = recipe.data.sources("train")[index]
    assert source.format is not None  # DataSection's validator gives every source a format
    return check_row(row, source.format, source.columns, options(recipe))


def _tokenized(examples: Sequence[Example], tokenizer, recipe: Recipe) -> list[Tokenized]:
    opts = options(recipe)
    return [tokenize(e, tokenizer, opts) for e in examples]


def _items(recipe: Recipe, results: list[Tokenized]) -> list[dict]:
    """A block's samples, packed together when data.packing is on."""
    samples = [s for r in results for s in r.samples]
    return pack(samples, recipe.data.max_length)[0] if recipe.data.packing else samples


class StreamDataset(IterableDataset):
    """The train data of data.streaming for the Trainer: an endless stream of samples (or packed rows) that starts
    at `start` (a resumed run's position) and remembers where its recent blocks began, so a checkpoint can say
    where the items trained so far end (`position`). No length: the Trainer runs train.max_steps."""

    def __init__(self, recipe: Recipe, tokenizer):
        self.recipe, self.tokenizer = recipe, tokenizer
        self.start, self.consumed = Position(), 0  # where iteration starts; the items trained before it
        # the blocks since the oldest item a checkpoint may still ask for (the dataloader reads a batch ahead)
        self.blocks: deque[_Block] = deque(maxlen=4096)

    def _block(self, pos: Position, rows: list[tuple[int, int, Row]]) -> list[dict]:
        examples = [_check(self.recipe, r, i) for i, _, r in rows]
        if self.recipe.data.shuffle:
            random.Random(f"{self.recipe.seed}:stream:{pos.passes}:{pos.block}").shuffle(examples)
        return _items(self.recipe, _tokenized(examples, self.tokenizer, self.recipe))

    def __iter__(self) -> Iterator[dict]:
        pos, first = self.start, self.consumed - self.start.skip
        size = self.recipe.data.stream_buffer
        while True:  # passes
            fresh, produced = pos.block == 0, 0  # a pass read from its first row must give something
            rows = _rows(self.recipe, pos.source, pos.row)
            while block := list(itertools.islice(rows, size)):
                items = self._block(pos, block)
                last_source, last_row, _ = block[-1]
                after = Position(pos.passes, pos.block + 1, last_source, last_row + 1)
                self.blocks.append(_Block(first, replace(pos, skip=0), len(items), after))
                yield from items[pos.skip :]
                first, produced, pos = first + len(items), produced + len(items), after
            if fresh and not produced:
                raise UserError(
                    f"{self.recipe.where('data', 'train')}: the stream holds no train sample (every row was dropped or left with no trained token at max_length {self.recipe.data.max_length}); check the data or raise data.max_length"
                )
            pos = Position(pos.passes + 1)

    def position(self, consumed: int) -> dict[str, Any]:
        """The state a checkpoint saves after `consumed` items were trained on: the position of the next item."""
        for block in reversed(self.blocks):
            if block.first <= consumed < block.first + block.items:
                return {"consumed": consumed, "position": asdict(block.start) | {"skip": consumed - block.first}}
            if consumed == block.first + block.items:
                return {"consumed": consumed, "position": asdict(block.after)}
        raise RuntimeError(f"data.streaming: the stream has no record of its item {consumed} to save its position")

    def restore(self, state: dict[str, Any]) -> None:
        """Continue where a checkpoint's `position` says (before iterating)."""
        self.start, self.consumed = Position(**state["position"]), int(state["consumed"])
        self.blocks.clear()


class LoaderSeed(TrainerCallback):
    """A torch DataLoader draws a seed for its workers from the global RNG each time it starts iterating, unless it
    has a generator of its own. The unbroken run starts iterating the stream before its first step, a resumed one
    after Trainer restored the checkpoint's RNG states (a map-style dataset's resume draws it while skipping, before
    the restore): that one draw would shift every dropout mask after a resume. Give the train DataLoader (inside
    accelerate's wrappers) a generator of its own, so iterating draws nothing from the global RNG."""

    def on_epoch_begin(self, args, state, control, train_dataloader=None, **kwargs):
        loader = compat.unwrapped_dataloader(train_dataloader)
        if not isinstance(loader, DataLoader):
            raise RuntimeError("data.streaming: Trainer's train dataloader wraps no torch DataLoader")
        loader.generator = torch.Generator().manual_seed(args.data_seed)


def saver(dataset: StreamDataset, per_step: int):
    """`AtomicCheckpoints`' extras for a stream: its position after the saved step's items (`per_step` items each)."""

    def extras(state) -> dict[str, Any]:
        return {"stream": dataset.position(state.global_step * per_step)}

    return extras


# ---------------------------------------------------------------- the preflight: the first block and the eval data


def _head(recipe: Recipe) -> tuple[list[Example], list[str]]:
    """The first stream_buffer train rows, checked: every problem among them, in file order."""
    examples, problems = [], []
    for i, _, row in itertools.islice(_rows(recipe), recipe.data.stream_buffer):
        try:
            examples.append(_check(recipe, row, i))
        except UserError as e:
            problems += e.problems
    return examples, problems


def _eval_rows(recipe: Recipe) -> tuple[list[Example], list[str]]:
    """data.eval, read whole (as the data stage reads it): the checked rows and every problem."""
    examples, problems, opts = [], [], options(recipe)
    for i, source in enumerate(recipe.data.sources("eval")):
        try:
            rows = read_source(source, _where(recipe, "eval", i))
        except UserError as e:
            problems += e.problems
            continue
        for row in rows:
            assert source.format is not None
            try:
                if row.problem is not None:
                    raise UserError(row.problem)
                examples.append(check_row(row, source.format, source.columns, opts))
            except UserError as e:
                problems += e.problems
    return examples, problems


def check(recipe: Recipe, world: distributed.World | None = None) -> Checked:
    """`data.check` for a stream: the first stream_buffer train rows and the whole eval data (every problem at once);
    the rest of the stream is checked as it is read. `world`: the processes the run has (validate --nproc plans
    for some; this process's launcher by default)."""
    _launcher_refused(recipe, world or distributed.world())
    head, problems = _head(recipe)
    evals, eval_problems = _eval_rows(recipe)
    if problems or eval_problems:
        capped = table.Problems()
        capped.add(problems + eval_problems)
        raise capped.error()
    if not head:
        raise UserError(f"{recipe.where('data', 'train')}: the stream holds no rows")
    # lists, not Examples files: only stream.build reads them, as sequences (the stream is never gathered by index)
    return Checked(cast("Examples", head), cast("Examples", evals), None)


def fingerprint(recipe: Recipe, tokenizer) -> str:
    """What a resumed stream must find unchanged: the data options, seed, tokenizer, and each train file's path, size
    and modification time (a stream is not read whole to hash it); the eval data's bytes."""
    parts = ["stream", recipe.task, str(recipe.seed), recipe.data.model_dump_json()]
    parts.append(data_cache.tokenizer_fingerprint(tokenizer))
    for i, source in enumerate(recipe.data.sources("train")):
        parts.append(source.model_dump_json())
        for f in files_of(source, _where(recipe, "train", i)) or []:
            st = f.stat()
            parts.append(f"{f}\0{st.st_size}\0{st.st_mtime_ns}")
    for i, source in enumerate(recipe.data.sources("eval")):
        parts.append(source_fingerprint(source, _where(recipe, "eval", i)))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _stats(results: list[Tokenized], items: list[dict], recipe: Recipe) -> dict[str, Any]:
    samples = [s for r in results for s in r.samples]
    stats: dict[str, Any] = {
        "rows": len(results),
        "samples": len(samples),
        "truncated": sum(r.truncated for r in results),
        "dropped_no_trained_token": sum(r.untrained for r in results),
        "dropped_too_long": sum(r.too_long for r in results),
        "tokens": sum(len(s["input_ids"]) for s in samples),
        "trained_tokens": sum(count_trained(s["labels"]) for s in samples),
    }
    if recipe.data.packing and samples:
        stats["packed_rows"] = len(items)
        stats["packing_efficiency"] = stats["tokens"] / (len(items) * recipe.data.max_length)
    return stats


def _gate(recipe: Recipe, examples: Sequence[Example], results: list[Tokenized]) -> None:
    """The max_dropped gate, on the first block: what it says of the first rows it says of the stream."""
    untrained = [e for e, r in zip(examples, results) if r.untrained]
    share = len(untrained) / len(examples)
    if share > recipe.data.max_dropped:
        raise UserError(
            f"{recipe.where('data', 'max_dropped')}: {len(untrained)} of the first {len(examples)} train rows of the stream ({share:.1%}) have no trained token left "
            f"after truncation to {recipe.data.max_length} tokens (first: {untrained[0].place}); raise data.max_length, or accept it with data.max_dropped"
        )


def build(recipe: Recipe, tokenizer, checked: Checked) -> DataBundle:
    """`data.build` for a stream: the first block tokenized (the template on real rows, the gate, the statistics of
    `train` as the first block's), the eval data tokenized whole, and the stream itself as the train data."""
    from datasets import Dataset

    results, eval_results = _tokenized(checked.train, tokenizer, recipe), _tokenized(checked.eval, tokenizer, recipe)
    _gate(recipe, checked.train, results)
    head, evals = _items(recipe, results), _items(recipe, eval_results)
    if not head:
        raise UserError(
            f"{recipe.where('data', 'max_length')}: no sample of the first {len(checked.train)} train rows is left after truncation to {recipe.data.max_length} tokens; raise it"
        )
    stats = {"train": _stats(results, head, recipe) | {"streamed": True}, "eval": _stats(eval_results, evals, recipe)}
    # the Trainer takes the stream where the data stage gives a Dataset: everything else reads no length from it
    train = cast("Dataset", StreamDataset(recipe, tokenizer))
    return DataBundle(train, Dataset.from_list(evals) if evals else None, None, fingerprint(recipe, tokenizer), stats)
