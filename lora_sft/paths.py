"""Paths the user names, checked as one rule everywhere: a name that is UTF-8, a regular file where a file is read
(a named pipe would block the read for ever), and a path resolved without a symlink loop ending the run in a
traceback. Each problem is a `UserError` that names the path as `errors.shown` writes it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lora_sft.errors import UserError, shown


def is_utf8(text: str) -> bool:
    """False for a name holding a byte that is not UTF-8 (Python decodes such file names and arguments to \\udcXX)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def not_a_file(path: Path) -> str | None:
    """What `path` is when it exists and is not a regular file (after links): "a named pipe (FIFO)", "a folder", ...;
    None for a regular file or a path that does not exist (the caller says what is missing)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken link" if path.is_symlink() else None
    except OSError as e:  # a symlink loop, a name too long
        return f"unreadable ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def resolved(path: str | os.PathLike[str], where: str) -> Path:
    """`path` with ~ expanded, made absolute and its links resolved; a symlink loop on the way is a UserError."""
    try:
        return Path(path).expanduser().resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11-3.12 raise RuntimeError("Symlink loop from ..."); later OSError
        why = "it runs through a symlink loop" if isinstance(e, RuntimeError) or e.errno == 40 else e.strerror
        raise UserError(
            f"{where}: cannot use {shown(os.fspath(path))}: {why}; fix the links or name another path"
        ) from None
