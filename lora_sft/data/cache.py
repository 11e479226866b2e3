"""The tokenized-data cache: one folder per fingerprint under $LORA_SFT_CACHE (default ~/.cache/lora_sft).

Written to a temporary folder and renamed into place, so a crash never leaves a half cache that a
later run would pick up. Bump VERSION when the tokenized layout or the masking rules change.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from lora_sft.data.table import Mapped
from lora_sft.errors import UserError, one_line, shown
from lora_sft.paths import not_a_file

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

VERSION = "lora_sft-data-4"  # 2: assistant-first chats mask the header; rows split before weights; 3: a length column; 4: Arrow files, checked rows


def root() -> Path:
    """The tokenized-data folder; UserError when the cache's place is a file (or under one), so nothing can go there."""
    named = os.environ.get("LORA_SFT_CACHE")
    base = Path(named or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lora_sft")
    variable = "LORA_SFT_CACHE" if named else "XDG_CACHE_HOME" if os.environ.get("XDG_CACHE_HOME") else "HOME"
    for place in (base / "tokenized", base, *base.parents):  # the nearest that exists must be a folder
        if place.is_dir():
            break
        if place.exists():
            raise UserError(
                f"{variable}={shown(os.environ.get(variable, ''))}: the data cache would go in {shown(base)}, and {shown(place)} is {not_a_file(place) or 'a file'}, not a folder; point {variable} at a folder (or set data.cache: false)"
            )
    return base / "tokenized"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Everything about a tokenizer that changes its output: vocabulary and rules, specials, template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None), state.pop("padding", None)  # per-call settings a call leaves behind
        body = json.dumps(state, sort_keys=True)
    else:
        body = json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = json.dumps(
        [
            type(tokenizer).__name__,
            tokenizer.chat_template,
            tokenizer.eos_token,
            tokenizer.pad_token,
            tokenizer.bos_token,
            getattr(tokenizer, "add_bos_token", None),
        ],
        default=str,
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()


def _fingerprints_dir() -> Path:
    return root().parent / "fingerprints"


def known_fingerprint(stamp: str) -> str | None:
    """A source's fingerprint (the sha256 of its bytes) that an earlier run computed for files with exactly this
    stamp (paths, sizes, inodes, modification and change times): a second run on a large file need not read it
    again, as git's index trusts a file's stat data."""
    try:
        return (_fingerprints_dir() / _name(stamp)).read_text().strip() or None
    except OSError:
        return None


def remember_fingerprints(found: dict[str, str]) -> None:
    """Keep `known_fingerprint`'s answers (stamp -> fingerprint); called once the data was cached, so a run that
    stopped at bad input writes nothing."""
    folder = _fingerprints_dir()
    if found:
        folder.mkdir(parents=True, exist_ok=True)
    for stamp, digest in found.items():
        path = folder / _name(stamp)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(digest)
        tmp.replace(path)


def _name(stamp: str) -> str:
    return hashlib.sha256(stamp.encode()).hexdigest()


@dataclass
class Cached:
    train: Dataset
    eval: Dataset | None
    meta: dict


def load(key: str) -> Cached | None:
    """The tokenized splits, memory-mapped (nothing is read until a row is); None when not cached, or damaged."""
    from datasets import Dataset

    def read(folder: Path) -> Cached:
        meta = json.loads((folder / "meta.json").read_text())
        meta["labels"], meta["stats"]
        evals = Dataset.from_file(str(folder / "eval.arrow")) if (folder / "eval.arrow").is_file() else None
        return Cached(Dataset.from_file(str(folder / "train.arrow")), evals, meta)

    return _intact(key, read)


T = TypeVar("T")


def _intact(key: str, read: Callable[[Path], T]) -> T | None:
    """`read` of the cache folder of `key`; None when there is none, or when it cannot be read (a file truncated,
    overwritten or removed by hand, a disk error): that folder is set aside and removed, with a note, and the
    caller builds the data again as on a first run."""
    folder = root() / key
    if not (folder / "meta.json").is_file():
        return None
    try:
        return read(folder)
    except Exception as e:  # pyarrow, numpy, json and the file system raise many kinds; all mean "damaged"
        print(
            f"note: the data cache {folder} is damaged ({type(e).__name__}: {one_line(e)}); removed, and built again",
            file=sys.stderr,
            flush=True,
        )
        aside = folder.with_name(f"{key}.damaged-{os.getpid()}")
        with contextlib.suppress(OSError):  # another process set it aside first
            folder.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
        return None


def save(key: str, train: Dataset, evals: Dataset | None, meta: dict) -> None:
    """Keep the splits (each one Arrow file, as `data.build` writes them) under `key`."""
    files = {f"{name}.arrow": _file_of(d) for name, d in (("train", train), ("eval", evals)) if d is not None}
    _store(key, files, {"meta.json": json.dumps(meta)})


@dataclass
class CachedRows:
    rows: Mapped  # every checked row
    train: np.ndarray  # the row numbers of the train examples, in order
    eval: np.ndarray
    labels: list[str] | None


def load_checked(key: str) -> CachedRows | None:
    def read(folder: Path) -> CachedRows:
        meta = json.loads((folder / "meta.json").read_text())
        rows, train, evals = (
            Mapped(folder / "checked.arrow"),
            np.load(folder / "train.npy"),
            np.load(folder / "eval.npy"),
        )
        if any(len(order) and int(order.max()) >= rows.table.num_rows for order in (train, evals)):
            raise ValueError(f"checked.arrow holds {rows.table.num_rows} rows, fewer than the orders name")
        return CachedRows(rows, train, evals, meta["labels"])

    return _intact(key, read)


def save_checked(key: str, rows: Path, train: np.ndarray, evals: np.ndarray, labels: list[str] | None) -> None:
    """Keep the checked rows (the Arrow file `data.check` wrote) and the train and eval orders under `key`."""
    arrays = {}
    for name, order in (("train.npy", train), ("eval.npy", evals)):
        buffer = io.BytesIO()
        np.save(buffer, order)
        arrays[name] = buffer.getvalue()
    _store(
        key, {"checked.arrow": rows} if rows.is_file() else {}, arrays | {"meta.json": json.dumps({"labels": labels})}
    )


def _file_of(dataset: Dataset) -> Path:
    (only,) = dataset.cache_files  # data.build writes each split as one file
    return Path(only["filename"])


def _store(key: str, files: dict[str, Path], small: dict[str, str | bytes]) -> None:
    """A cache folder: `files` linked in (a hard link: no copy, the file is already on this disk), then the small
    files, meta.json last (its presence marks a complete cache); built in a temporary folder and renamed into place."""
    final = root() / key
    tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, path in files.items():
        try:
            os.link(path, tmp / name)
        except OSError:  # another file system: copy
            shutil.copyfile(path, tmp / name)
    for name in sorted(small, key=lambda n: n == "meta.json"):
        value = small[name]
        (tmp / name).write_bytes(value if isinstance(value, bytes) else value.encode())
    try:
        tmp.rename(final)
    except OSError:  # another run cached the same key first; theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
