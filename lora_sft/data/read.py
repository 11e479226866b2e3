"""Data files -> rows, each row remembering where it came from (`file:line`) for error messages."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError


@dataclass(frozen=True)
class Row:
    place: str  # "data/train.jsonl:12", for messages
    value: dict


SUFFIXES = (".jsonl", ".json", ".csv")


def _read_text(path: Path, where: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{where}: file not found: {path} (paths resolve against the working directory {Path.cwd()})") from None
    except IsADirectoryError:
        raise UserError(f"{where}: {path} is a folder; name the data files ({', '.join(SUFFIXES)})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: invalid UTF-8 (byte {e.start}); save the file as UTF-8") from None


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        rows.append(Row(f"{path}:{n}", value))
    return rows


def _json(path: Path, text: str) -> list[Row]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        value = next(iter(value.values()))  # {"data": [...]} as some exports write it
    if not isinstance(value, list):
        raise UserError(f"{path}:1: a .json data file holds a list of row objects; use .jsonl for one object per line")
    return [Row(f"{path}: row {i + 1}", v) for i, v in enumerate(value)]


def _csv(path: Path, text: str) -> list[Row]:
    reader = csv.DictReader(text.splitlines())
    rows = []
    for record in reader:
        if None in record:
            raise UserError(f"{path}:{reader.line_num}: more fields than the header has ({len(reader.fieldnames)})")
        rows.append(Row(f"{path}:{reader.line_num}", dict(record)))
    return rows


def read_rows(paths: list[str], where: str) -> tuple[list[Row], str]:
    """All rows of the files, plus a sha256 fingerprint of their bytes; `where` names the recipe key."""
    rows: list[Row] = []
    digest = hashlib.sha256()
    for name in paths:
        path = Path(name)
        if path.suffix.lower() not in SUFFIXES:
            raise UserError(f"{where}: {name}: unsupported file type '{path.suffix}'; use {', '.join(SUFFIXES)}")
        text = _read_text(path, where)
        digest.update(name.encode() + b"\0" + text.encode())
        reader = {".jsonl": _jsonl, ".json": _json, ".csv": _csv}[path.suffix.lower()]
        found = reader(path, text)
        if not found:
            raise UserError(f"{path}:1: the file holds no rows; add data or remove it from {where.split(': ')[-1]}")
        for row in found:
            if not isinstance(row.value, dict):
                raise UserError(f"{row.place}: a row must be a JSON object, not {type(row.value).__name__}")
        rows.extend(found)
    return rows, digest.hexdigest()
