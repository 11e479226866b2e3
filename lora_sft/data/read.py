"""Sources -> rows, each row remembering where it came from (`file:line`) for error messages.

A source is a file, a folder of files, a glob, or a hub dataset. `fingerprint` hashes a source's
bytes without parsing them, so a cache hit costs one read.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..recipe import Source


@dataclass(frozen=True)
class Row:
    place: str  # "data/train.jsonl:12", for messages
    value: dict


SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.lower().endswith(SUFFIXES) or spec.count("/") > 1 or "\\" in spec


def files_of(source: Source, where: str) -> list[Path] | None:
    """The files a source names, in a stable order; None for a hub dataset."""
    spec = source.path
    if any(ch in spec for ch in "*?["):
        found = sorted(Path(f) for f in glob.glob(spec, recursive=True) if f.lower().endswith(SUFFIXES))
        if not found:
            raise UserError(f"{where}: no data file matches {spec!r} ({', '.join(SUFFIXES)}; paths resolve against {Path.cwd()})")
        return found
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not found:
            raise UserError(f"{where}: the folder {path} holds no data files ({', '.join(SUFFIXES)})")
        return found
    if path.exists():
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{where}: {spec}: unsupported file type '{path.suffix}'; use {', '.join(SUFFIXES)}")
        return [path]
    if _looks_local(spec):
        raise UserError(f"{where}: file not found: {spec} (paths resolve against the working directory {Path.cwd()})")
    return None


def _hub(source: Source, where: str):
    import datasets

    try:
        return datasets.load_dataset(source.path, name=source.subset, split=source.split, revision=source.revision)
    except Exception as e:  # the hub and datasets raise many kinds; all mean "cannot load this source"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{where}: cannot load hub dataset {source.path!r} split {source.split!r} ({first}); check the id, split and network, or use a local file") from None


def fingerprint(source: Source, where: str) -> str:
    """sha256 of the source's bytes (hub: the dataset's own fingerprint), without parsing rows."""
    digest = hashlib.sha256(source.model_dump_json().encode())
    files = files_of(source, where)
    if files is None:
        digest.update(_hub(source, where)._fingerprint.encode())
    for f in files or []:
        try:
            digest.update(str(f).encode() + b"\0" + f.read_bytes())
        except OSError as e:
            raise UserError(f"{where}: cannot read {f} ({e.strerror})") from None
    return digest.hexdigest()


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte {e.start}); save the file as UTF-8") from None


def _jsonl(path: Path) -> list[Row]:
    rows = []
    for n, line in enumerate(_decode(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append(Row(f"{path}:{n}", value))
    return rows


def _json(path: Path) -> list[Row]:
    try:
        value = json.loads(_decode(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} as some exports write it
    if not isinstance(value, list):
        raise UserError(f"{path}:1: a .json data file holds a list of row objects; use .jsonl for one object per line")
    return [Row(f"{path}: row {i + 1}", v) for i, v in enumerate(value)]


def _csv(path: Path) -> list[Row]:
    reader = csv.DictReader(_decode(path).splitlines())
    rows = []
    for record in reader:
        if None in record:
            raise UserError(f"{path}:{reader.line_num}: more fields than the header has ({len(reader.fieldnames)})")
        rows.append(Row(f"{path}:{reader.line_num}", dict(record)))
    return rows


def _parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not a readable parquet file"
        raise UserError(f"{path}: cannot read it as parquet ({e})") from None
    return [Row(f"{path}: row {i + 1}", r) for i, r in enumerate(records)]


def _txt(path: Path) -> list[Row]:
    return [Row(f"{path}:{n}", {"text": line}) for n, line in enumerate(_decode(path).splitlines(), 1) if line.strip()]


READERS = {".jsonl": _jsonl, ".json": _json, ".csv": _csv, ".parquet": _parquet, ".txt": _txt}


def read_source(source: Source, where: str) -> list[Row]:
    """Every row of a source, each a dict, with its place."""
    files = files_of(source, where)
    if files is None:
        rows = [Row(f"{source.path}[{source.split}] row {i + 1}", r) for i, r in enumerate(_hub(source, where))]
        if not rows:
            raise UserError(f"{where}: hub dataset {source.path!r} split {source.split!r} has no rows")
        return rows
    rows = []
    for path in files:
        try:
            found = READERS[path.suffix.lower()](path)
        except OSError as e:
            raise UserError(f"{where}: cannot read {path} ({e.strerror})") from None
        if not found:
            raise UserError(f"{path}:1: the file holds no rows; add data or remove it from {where.split(': ')[-1]}")
        for row in found:
            if not isinstance(row.value, dict):
                raise UserError(f"{row.place}: a row must be a JSON object, not {type(row.value).__name__}")
        rows.extend(found)
    return rows
