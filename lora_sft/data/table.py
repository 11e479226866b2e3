"""Rows on disk: checked examples and tokenized samples live in Arrow files, memory-mapped, so the data stage
holds one bounded batch of rows as Python objects at a time, whatever the number of rows.

A checked example is stored pickled (its messages may carry any value a row had, and come back exactly);
which rows train and which evaluate, in what order, is an array of row numbers beside the file. Tokenized
samples are stored as int32 lists, one Arrow row per sample.
"""

from __future__ import annotations

import atexit
import contextlib
import mmap
import os
import pickle
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa

from lora_sft.data.formats import Example
from lora_sft.errors import UserError

BATCH = 1000  # rows turned into Python objects at once
EXAMPLE = "example"  # the column of a checked-rows file: one pickled Example per row, its row number its seq
MAX_PROBLEMS = 20  # problem lines a data check prints; the rest are counted in one more line


SHOWN_ROWS = 5  # the rows named in a line that says one problem of several rows; the rest are counted

# A row's problem line: the place (a file and its line, or a hub split's row) and what is wrong there.
_ROW_LINE = re.compile(r"(?P<where>.+?)(?P<sep>:| row )(?P<at>\d+): (?P<what>.*)", re.DOTALL)


@dataclass
class _Entry:
    """One problem line as it will be printed: one row's problem, or the same problem of several rows of a file."""

    where: str | None  # the file (None: a line that names no row, printed as it is)
    sep: str  # between the file and the row: ':' (a line), ' row ' (a hub split's row)
    what: str
    at: list[str]  # the first SHOWN_ROWS rows
    rows: int = 1

    def line(self) -> str:
        if self.where is None:
            return self.what
        more = f" and {self.rows - len(self.at)} more ({self.rows} rows)" if self.rows > len(self.at) else ""
        return f"{self.where}{self.sep}{', '.join(self.at)}{more}: {self.what}"


class Problems:
    """Problem lines in the order they come, the first MAX_PROBLEMS kept and the rest only counted: a data
    set where every row is bad costs no more memory than one with a few bad rows. The same problem of several
    rows of one file is one line that names the first rows and counts them (`data.jsonl:1, 2, 3, 4, 5 and 27 more
    (32 rows): missing field 'instruction' ...`), not a line per row."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []
        self.count = 0  # the problems found, each row's counted once

    def add(self, lines: list[str]) -> None:
        for line in lines:
            m = _ROW_LINE.fullmatch(line)
            entry = _Entry(m["where"], m["sep"], m["what"], [m["at"]]) if m else _Entry(None, "", line, [])
            self._merge(entry)

    def extend(self, other: Problems, merge: bool = True) -> None:
        """Add another part's problems: of the same rows' next part (`merge`: a problem both have is one line), or
        of another source (which may read the same file again: its rows are other rows)."""
        hidden = other.count - sum(e.rows for e in other.entries)  # the other's problems beyond its lines
        for entry in other.entries:
            self._merge(_Entry(entry.where, entry.sep, entry.what, list(entry.at), entry.rows), merge)
        self.count += hidden

    def _merge(self, entry: _Entry, merge: bool = True) -> None:
        self.count += entry.rows
        if merge and entry.where is not None:
            for e in self.entries:
                if (e.where, e.sep, e.what) == (entry.where, entry.sep, entry.what):
                    e.at += entry.at[: SHOWN_ROWS - len(e.at)]
                    e.rows += entry.rows
                    return
        if len(self.entries) < MAX_PROBLEMS:
            self.entries.append(entry)

    @property
    def lines(self) -> list[str]:
        return [e.line() for e in self.entries]

    def __bool__(self) -> bool:
        return self.count > 0

    def error(self) -> UserError:
        rest = self.count - sum(e.rows for e in self.entries)
        more = [f"{rest} more problem{'s' if rest > 1 else ''} in the data not shown; fix these and run again"]
        return UserError(self.lines + (more if rest else []))


def work_dir(under: Path | None) -> Path:
    """A folder for this process's Arrow files, removed when the process exits; under the cache root when the
    cache is on (so a finished file moves into the cache by a rename), else in the temporary folder."""
    if not _WORK_DIRS and not _MADE:
        atexit.register(remove_work_dirs)
        _remove_on_sigterm()
    if under is not None:
        _MADE.extend(reversed([p for p in (under, *under.parents) if not p.exists()]))  # outermost first
        under.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"lora_sft-work-{os.getpid()}-", dir=under))
    _WORK_DIRS.append(folder)
    return folder


_WORK_DIRS: list[Path] = []  # this process's work folders (`work_dir`)
_MADE: list[Path] = []  # the folders above them that `work_dir` created (the cache root on a first run)


def _remove_on_sigterm() -> None:
    """SIGTERM's default action ends the process without atexit: while it is the handler, remove the work folders
    first, then end by the same signal (the exit status a job scheduler expects). A handler someone else installed
    (the training guard's, a launcher's) is left alone; only the main thread may install one."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return
    owner = os.getpid()  # a worker process forked from this one has copies of the lists: not its folders

    def on_sigterm(signum: int, frame: Any) -> None:
        if os.getpid() == owner:
            remove_work_dirs()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def remove_work_dirs() -> None:
    """Remove this process's work folders, and the folders created to hold them if nothing else went there (a
    first run that stopped at bad input leaves no cache folder): at exit, or before a process leaves without the
    interpreter's exit (`distributed.stop`'s os._exit, which skips atexit)."""
    while _WORK_DIRS:
        shutil.rmtree(_WORK_DIRS.pop(), ignore_errors=True)
    while _MADE:
        with contextlib.suppress(OSError):  # not empty: the cache holds something now, keep it
            _MADE[-1].rmdir()
        _MADE.pop()


class Mapped:
    """An Arrow stream file as a table whose buffers stay on disk (memory-mapped). `release` drops the pages
    read so far from this process's resident memory (they come back from the page cache when read again),
    so a pass over a file larger than memory keeps the resident set flat."""

    def __init__(self, path: Path):
        self.path = path
        self.map: mmap.mmap | None = None
        self.table = pa.table({EXAMPLE: pa.array([], pa.binary())})  # nothing was written: no rows
        self._gatherer: Gatherer | None = None
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self.table = pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(self.map))).read_all()

    def release(self) -> None:
        if self.map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows `rows` in that order (`Gatherer`: only the chunks holding them are read)."""
        if self._gatherer is None:
            self._gatherer = Gatherer(self.table)
        return self._gatherer.take(rows)


class Gatherer:
    """Rows of a table by index, in the order asked. Arrow's `take` on a column of many chunks first copies the
    whole column into one array, so each gather would cost memory in proportion to all the rows; here each chunk
    gives only its own rows, and only the gathered rows are put in order."""

    def __init__(self, table: pa.Table):
        self.batches = table.to_batches()
        self.starts = np.cumsum([0] + [len(b) for b in self.batches])

    def take(self, idx: np.ndarray) -> pa.Table:
        which = np.searchsorted(self.starts, idx, side="right") - 1
        order = np.argsort(which, kind="stable")
        rows, chunks = idx[order], which[order]
        bounds = np.flatnonzero(np.diff(chunks)) + 1
        parts = [
            self.batches[int(part[0])].take(pa.array(got - self.starts[int(part[0])]))
            for got, part in zip(np.split(rows, bounds), np.split(chunks, bounds))
            if len(part)
        ]
        if not parts:
            return pa.Table.from_batches([self.batches[0].slice(0, 0)])
        grouped = pa.Table.from_batches(parts).combine_chunks()  # rows in `order`
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return grouped.take(pa.array(inverse))


class ArrowWriter:
    """Rows (dicts with the same keys) appended to an Arrow stream file one batch at a time."""

    def __init__(self, path: Path, types: dict[str, pa.DataType] | None = None):
        self.path, self.types = path, types
        self.rows: list[dict] = []
        self.writer: pa.ipc.RecordBatchStreamWriter | None = None
        self.schema: pa.Schema | None = None

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= BATCH:
            self.flush()

    def _schema(self, row: dict) -> pa.Schema:
        types = self.types or {}
        return pa.schema(
            [(k, types.get(k) or (pa.list_(pa.int32()) if isinstance(v, list) else pa.int64())) for k, v in row.items()]
        )

    def write_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        if self.writer is None:
            self.schema = batch.schema
            self.writer = pa.ipc.new_stream(str(self.path), self.schema)
        self.writer.write(batch)

    def flush(self) -> None:
        if not self.rows:
            return
        schema = self.schema or self._schema(self.rows[0])
        columns = {k: [r[k] for r in self.rows] for k in schema.names}
        self.write_batch(pa.RecordBatch.from_pydict(columns, schema=schema))
        self.rows = []

    def close(self) -> int:
        """Rows written; 0 writes no file."""
        self.flush()
        if self.writer is None:
            return 0
        self.writer.close()
        return 1


class ExampleWriter(ArrowWriter):
    def __init__(self, path: Path):
        super().__init__(path, {EXAMPLE: pa.binary()})
        self.written = 0

    def add_example(self, example: Example) -> None:
        self.add({EXAMPLE: pickle.dumps(example, protocol=pickle.HIGHEST_PROTOCOL)})
        self.written += 1

    def mapped(self) -> Mapped:
        self.close()
        return Mapped(self.path)


class Examples(Sequence[Example]):
    """Checked examples in their train (or eval) order: a memory-mapped file of every checked row and the
    row numbers to read, in order (a weighted row appears more than once). Indexing and iteration turn
    rows into Example objects a batch at a time."""

    def __init__(self, rows: Mapped, order: np.ndarray):
        self.rows, self.order = rows, order

    def __len__(self) -> int:
        return len(self.order)

    @overload
    def __getitem__(self, i: int) -> Example: ...
    @overload
    def __getitem__(self, i: slice) -> Examples: ...
    def __getitem__(self, i: int | slice) -> Example | Examples:
        if isinstance(i, slice):
            return Examples(self.rows, self.order[i])
        return pickle.loads(self.rows.table.column(EXAMPLE)[int(self.order[i])].as_py())

    def batches(self, size: int = BATCH) -> Iterator[list[Example]]:
        for start in range(0, len(self.order), size):
            # not the column's own take: on a column of many chunks it first copies all of them into one array
            taken = self.rows.take(self.order[start : start + size]).column(EXAMPLE)
            self.rows.release()
            yield [pickle.loads(b) for b in taken.to_pylist()]

    def __iter__(self) -> Iterator[Example]:
        for batch in self.batches():
            yield from batch

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, Examples) and other.rows is self.rows:
            return np.array_equal(self.order, other.order)
        return isinstance(other, Sequence) and len(other) == len(self) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Examples({len(self)} rows)"
