"""Sources -> rows, each row remembering where it came from (`file:line`) for error messages.

A source is a file, a folder of files (hidden files and folders left out), a glob, or a hub dataset.
Text is UTF-8 (a byte order mark is dropped); .jsonl and .txt lines end at \n only, and CSV is read
as a whole so quoted fields keep their newlines. `fingerprint` hashes a source's bytes without
parsing them, so a cache hit costs one read.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_sft import compat
from lora_sft.errors import UserError, one_line, shown
from lora_sft.paths import is_utf8, not_a_file
from lora_sft.recipe.sections import Source

if TYPE_CHECKING:
    from datasets import Dataset


@dataclass(frozen=True)
class Row:
    """A row of a source; a row that could not be read carries the `problem` line instead of a value."""

    place: str  # "data/train.jsonl:12", for messages
    value: dict | None
    problem: str | None = None


def _bad(place: str, message: str) -> Row:
    return Row(place, None, f"{place}: {message}")


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _looks_local(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.lower().endswith(SUFFIXES)
        or spec.count("/") > 1
        or "\\" in spec
    )


def _folder_files(folder: Path, where: str) -> list[Path]:
    """The data files under a folder, hidden files and folders (.git, .ipynb_checkpoints) left out;
    a subfolder that cannot be listed is an error, not silently skipped."""

    def refuse(e: OSError) -> None:
        raise UserError(
            f"{where}: cannot read the folder {e.filename} ({e.strerror}); fix its permissions or remove it"
        )

    found: list[Path] = []
    for top, dirs, files in os.walk(folder, onerror=refuse):
        _refuse_saved_dataset(Path(top), set(files), where)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(top) / f for f in files if not f.startswith(".") and Path(f).suffix.lower() in SUFFIXES]
    return sorted(found)


def _refuse_saved_dataset(folder: Path, files: set[str], where: str) -> None:
    """A folder `datasets`' save_to_disk wrote (Arrow shards beside state.json and dataset_info.json, or a
    dataset_dict.json above a folder per split) is one data set, not a folder of data files: its JSON files hold
    the library's bookkeeping, not rows. Refused in one line saying what it is and how to hand it over."""
    if "dataset_dict.json" in files:
        load = f"datasets.load_from_disk({str(folder)!r})['train']"
    elif {"state.json", "dataset_info.json"} <= files:
        load = f"datasets.load_from_disk({str(folder)!r})"
    else:
        return
    raise UserError(
        f"{where}: {shown(folder)} is a folder that `datasets` save_to_disk wrote, not a folder of data files; write its rows to a file with {load}.to_json('train.jsonl') (or .to_parquet) and name that"
    )


def _not_found(spec: str, where: str) -> UserError:
    near = [f"{spec}{s}" for s in SUFFIXES if Path(f"{spec}{s}").expanduser().is_file()]
    hint = (
        f"; did you mean {' or '.join(near)}?"
        if near
        else f" (paths resolve against the working directory {Path.cwd()})"
    )
    return UserError(f"{where}: file not found: {spec}{hint}")


def _checked(files: list[Path], where: str) -> list[Path]:
    """`files`, each a regular file with a UTF-8 name; refused up front otherwise: a named pipe would block the
    first read for ever (and a data file is read twice, to fingerprint it and to read its rows), and a name that is
    not UTF-8 cannot be written into the run's records."""
    for path in files:
        if not is_utf8(str(path)):
            raise UserError(
                f"{where}: the file name {shown(path)} is not valid UTF-8; rename it (a run records its data files' names as UTF-8)"
            )
        if (kind := not_a_file(path)) is not None:
            raise UserError(f"{where}: {shown(path)} is {kind}, not a file; write the data to a file and name that")
    return files


def files_of(source: Source, where: str) -> list[Path] | None:
    """The files a source names, in a stable order, each a regular file; None for a hub dataset."""
    spec = source.path
    if not spec.strip():
        raise UserError(f"{where}: the path is empty; name a data file, a folder, a glob or a hub dataset id")
    if any(ch in spec for ch in "*?["):
        found = sorted(
            Path(f) for f in glob.glob(spec, recursive=True) if f.lower().endswith(SUFFIXES)
        )  # glob skips hidden names
        if not found:
            raise UserError(
                f"{where}: no data file matches {spec!r} ({', '.join(SUFFIXES)}; paths resolve against {Path.cwd()})"
            )
        return _checked(found, where)
    path = Path(spec).expanduser()
    if path.is_dir():
        found = _folder_files(path, where)
        if not found:
            raise UserError(f"{where}: the folder {path} holds no data files ({', '.join(SUFFIXES)})")
        return _checked(found, where)
    if path.exists():
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{where}: {spec}: unsupported file type '{path.suffix}'; use {', '.join(SUFFIXES)}")
        return _checked([path], where)
    # `data/alpaca` is a hub id only when `data/` is not a local folder
    if _looks_local(spec) or ("/" in spec and Path(spec.split("/")[0]).is_dir()):
        raise _not_found(spec, where)
    return None


def _hub(source: Source, where: str) -> Dataset:
    import datasets

    try:
        return datasets.load_dataset(source.path, name=source.subset, split=source.split, revision=source.revision)
    except Exception as e:  # the hub and datasets raise many kinds; all mean "cannot load this source"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"{where}: cannot load hub dataset {source.path!r} split {source.split!r} ({first}); {compat.hub_hint('the id, split')}, or use a local file"
        ) from None


def fingerprint(source: Source, where: str) -> str:
    """sha256 of the source's bytes (hub: the dataset's own fingerprint), without parsing rows."""
    digest = hashlib.sha256(source.model_dump_json().encode())
    files = files_of(source, where)
    if files is None:
        digest.update(compat.dataset_fingerprint(_hub(source, where)).encode())
    for f in files or []:
        try:
            digest.update(str(f).encode() + b"\0")
            with f.open("rb") as stream:  # in chunks: a file larger than memory is hashed all the same
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
        except OSError as e:
            raise UserError(f"{where}: cannot read {f} ({e.strerror})") from None
    return digest.hexdigest()


CHUNK = 1 << 22  # a file up to this size is read whole; a larger one is streamed
PIECE = 1 << 20  # bytes checked at once when a large file is checked to be UTF-8


def _not_utf8(path: Path, line: int, byte: int) -> UserError:
    return UserError(f"{path}:{line}: invalid UTF-8 (byte {byte}); save the file as UTF-8")


def _check_utf8(path: Path) -> None:
    """UserError at the first byte that is not UTF-8, read in chunks that end at a newline (no UTF-8
    character holds the byte \\n, so a chunk never splits one)."""
    offset = lines = 0
    with path.open("rb") as f:
        while chunk := f.read(min(PIECE, CHUNK)) + f.readline():
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, lines + chunk[: e.start].count(b"\n") + 1, offset + e.start) from None
            offset, lines = offset + len(chunk), lines + chunk.count(b"\n")


def _stream_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, text) of a UTF-8 file: split on \\n only, a trailing \\r dropped, the byte order
    mark dropped. A file up to CHUNK bytes is read whole; a larger one is checked to be UTF-8 first (so a bad
    byte reports that file alone, as when it is read whole), then read line by line."""
    if path.stat().st_size <= CHUNK:
        for n, line in enumerate(_decode(path).split("\n"), 1):
            yield n, line.removesuffix("\r")
        return
    _check_utf8(path)
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):  # binary lines end at \n only
            line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            yield n, line.removeprefix("\ufeff") if n == 1 else line


def _decode(path: Path) -> str:
    """The file's text; a UTF-8 byte order mark (Excel's "CSV UTF-8") is dropped."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, data[: e.start].count(b"\n") + 1, e.start) from None
    return text.removeprefix("\ufeff")


class _Duplicated(dict):
    """A parsed JSON object that holds (or contains) a duplicate key, which JSON would let the last one win."""

    key: str = ""


def _contains_duplicate(value: Any) -> str | None:
    if isinstance(value, _Duplicated):
        return value.key
    if isinstance(value, list):  # lists are not hooked: look inside them for objects already marked
        for item in value:
            if (key := _contains_duplicate(item)) is not None:
                return key
    return None


def _first_repeat(keys: Iterable[str]) -> str | None:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            return key
        seen.add(key)
    return None


def _object(pairs: list[tuple[str, object]]) -> dict:
    repeated = _first_repeat(k for k, _ in pairs)
    if repeated is None:
        repeated = next((key for _, v in pairs if (key := _contains_duplicate(v)) is not None), None)
    if repeated is None:
        return dict(pairs)
    marked = _Duplicated(pairs)
    marked.key = repeated
    return marked


def _parse(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object)


def _row(place: str, value: Any) -> Row:
    """A parsed row, or a bad one: not an object, or an object with a duplicate key."""
    if not isinstance(value, dict):
        return _bad(place, f"a row must be a JSON object, not {type(value).__name__}")
    if (key := _contains_duplicate(value)) is not None:
        return _bad(place, f"duplicate key '{key}' in a JSON object (JSON keeps only the last); keep one")
    return Row(place, value)


TOO_LONG = f"a number of more than {sys.get_int_max_str_digits()} digits, too long to read; write it as a string"


def _jsonl_row(place: str, line: str) -> Row:
    try:
        return _row(place, _parse(line))
    except json.JSONDecodeError as e:
        return _bad(place, f"invalid JSON ({e.msg} at column {e.colno})")
    except ValueError:  # after JSONDecodeError, its subclass: Python refuses to read an int this long
        return _bad(place, TOO_LONG)
    except RecursionError:
        return _bad(place, "JSON nested too deeply to read; flatten the row")


def _txt_row(place: str, line: str) -> Row:
    return Row(place, {"text": line})


def _jsonl(path: Path) -> Iterator[Row]:
    return (_jsonl_row(f"{path}:{n}", line) for n, line in _stream_lines(path) if line.strip())


def _json(path: Path) -> list[Row]:
    try:
        value = _parse(_decode(path))
    except json.JSONDecodeError as e:
        return [_bad(f"{path}:{e.lineno}", f"invalid JSON ({e.msg} at column {e.colno})")]
    except ValueError:  # an int too long to read (JSONDecodeError, its subclass, is caught first)
        return [_bad(f"{path}:1", TOO_LONG)]
    except RecursionError:
        return [_bad(f"{path}:1", "JSON nested too deeply to read; flatten the data")]
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} as some exports write it
    if not isinstance(value, list):
        return [_bad(f"{path}:1", "a .json data file holds a list of row objects; use .jsonl for one object per line")]
    return [_row(f"{path}: row {i + 1}", v) for i, v in enumerate(value)]


def _csv(path: Path) -> list[Row]:
    """CSV read as a whole (a newline inside a quoted field is kept); a row's place is the line it starts on."""
    csv.field_size_limit(2**31 - 1)  # the default (128 KiB) would refuse a long document in a `text` column
    reader = csv.reader(io.StringIO(_decode(path), newline=""))
    rows: list[Row] = []
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return rows
        except csv.Error as e:
            return [*rows, _bad(f"{path}:{start}", f"cannot read it as CSV ({e})")]
        if not record:  # a blank line
            continue
        if header is None:
            header = record
            repeated = [c for i, c in enumerate(header) if c in header[:i]]
            if repeated:
                return [_bad(f"{path}:{start}", f"duplicate column '{repeated[0]}' in the header; rename one")]
            continue
        if len(record) > len(header):
            rows.append(_bad(f"{path}:{start}", f"more fields than the header has ({len(header)})"))
            continue
        rows.append(Row(f"{path}:{start}", dict(zip(header, record))))


def _parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not a readable parquet file"
        return [_bad(str(path), f"cannot read it as parquet ({one_line(e)})")]
    return [_row(f"{path}: row {i + 1}", r) for i, r in enumerate(records)]


def _txt(path: Path) -> Iterator[Row]:
    return (_txt_row(f"{path}:{n}", line) for n, line in _stream_lines(path) if line.strip())


# .jsonl and .txt are read line by line; a .json, .csv or .parquet file is read whole (one at a time)
READERS: dict[str, Callable[[Path], Iterable[Row]]] = {
    ".jsonl": _jsonl,
    ".json": _json,
    ".csv": _csv,
    ".parquet": _parquet,
    ".txt": _txt,
}


def read_source(source: Source, where: str) -> list[Row]:
    """Every row of a source, in file order, each a dict with its place; a row (or a file) that cannot
    be read is a Row with its `problem`, so the caller reports them all at once. UserError for a
    source that cannot be found or loaded at all."""
    return list(iter_source(source, where))


def iter_source(source: Source, where: str) -> Iterator[Row]:
    """`read_source` one row at a time, so a large source is never held whole (UserError at the first step)."""
    files = files_of(source, where)
    if files is None:
        empty = True
        for i, r in enumerate(_hub(source, where)):
            empty = False
            yield _row(f"{source.path}[{source.split}] row {i + 1}", r)
        if empty:
            raise UserError(f"{where}: hub dataset {source.path!r} split {source.split!r} has no rows")
        return
    for path in files:
        yield from _file_rows(path, where)


def _file_rows(path: Path, where: str) -> Iterator[Row]:
    empty = True
    try:
        for row in READERS[path.suffix.lower()](path):
            empty = False
            yield row
    except OSError as e:
        if empty:
            empty = False
            yield _bad(
                str(path),
                f"cannot read the file ({e.strerror}); fix its permissions or remove it from {where.split(': ')[-1]}",
            )
        else:  # the file went away while it was read
            raise UserError(f"{where}: cannot read {path} ({e.strerror})") from None
    except UserError as e:  # the file as a whole (invalid UTF-8): checked before its first row
        empty = False
        yield from (Row(str(path), None, p) for p in e.problems)
    if empty:
        yield _bad(f"{path}:1", f"the file holds no rows; add data or remove it from {where.split(': ')[-1]}")


# ---------------------------------------------------------------- streaming (data.streaming)


class _Skip:
    """Rows still to pass over before a stream starts (a resumed run's position): counted, not parsed."""

    def __init__(self, count: int):
        self.left = count
        self.seen = 0  # rows met so far, skipped or not (a file that adds none holds no rows)


def _streamed_lines(path: Path, parse: Callable[[str, str], Row], skip: _Skip) -> Iterator[Row]:
    """A .jsonl or .txt file row by row, as `_jsonl` / `_txt` read it whole: lines end at \n only, blank ones skipped,
    a byte order mark dropped; a line that is not UTF-8 is a bad row at its line."""
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            place = f"{path}:{n}"
            try:
                line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError as e:
                bad = _bad(place, f"invalid UTF-8 (byte {e.start} of the line); save the file as UTF-8")
                skip.seen += 1
                if skip.left:
                    skip.left -= 1
                    continue
                yield bad
                continue
            if n == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            skip.seen += 1
            if skip.left:  # a row before the stream's start: counted, not parsed
                skip.left -= 1
                continue
            yield parse(place, line)


STREAMED: dict[str, Callable[[str, str], Row]] = {".jsonl": _jsonl_row, ".txt": _txt_row}


def _streamed_file_rows(path: Path, where: str, skip: _Skip) -> Iterator[Row]:
    """One file's rows for a stream: .jsonl and .txt line by line, the other types read whole (as `read_source`)."""
    before = skip.seen
    suffix = path.suffix.lower()
    try:
        rows = _streamed_lines(path, STREAMED[suffix], skip) if suffix in STREAMED else iter(READERS[suffix](path))
        for row in rows:
            if suffix not in STREAMED:
                skip.seen += 1
            if skip.left and suffix not in STREAMED:
                skip.left -= 1
                continue
            yield row
    except OSError as e:
        yield _bad(
            str(path),
            f"cannot read the file ({e.strerror}); fix its permissions or remove it from {where.split(': ')[-1]}",
        )
        return
    except UserError as e:  # the file as a whole (invalid UTF-8 in a file read whole)
        yield from (Row(str(path), None, p) for p in e.problems)
        return
    if skip.seen == before:
        yield _bad(f"{path}:1", f"the file holds no rows; add data or remove it from {where.split(': ')[-1]}")


def stream_source(source: Source, where: str, start: int = 0) -> Iterator[Row]:
    """A source's rows one at a time, in `read_source`'s order and with its places, from its `start`-th row on (the
    rows before are counted, not parsed, in .jsonl and .txt files). A hub dataset is read with datasets'
    streaming mode (`load_dataset(..., streaming=True)`): nothing is downloaded whole."""
    files = files_of(source, where)
    if files is None:
        import datasets

        try:
            hub = datasets.load_dataset(
                source.path, name=source.subset, split=source.split, revision=source.revision, streaming=True
            )
        except Exception as e:  # the hub and datasets raise many kinds; all mean "cannot load this source"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UserError(
                f"{where}: cannot stream hub dataset {source.path!r} split {source.split!r} ({first}); {compat.hub_hint('the id, split')}, or use a local file"
            ) from None
        for i, value in enumerate(hub.skip(start) if start else hub, start + 1):
            yield _row(f"{source.path}[{source.split}] row {i}", value)
        return
    skip = _Skip(start)
    for path in files:
        yield from _streamed_file_rows(path, where, skip)
