"""One writer per run directory: `train` (fresh, --overwrite or --resume), `export` and `eval` hold the run
directory's lock while they write into it, and a second writer is refused before it changes anything, naming the
command and the process that holds it.

The lock is an advisory `flock` on `.lora_sft-lock` in the run directory, which also records who holds it (pid,
host, command, since when). The kernel drops a flock when its process ends, however it ends (kill -9 included), so
a lock left by a dead process is never in the way: a stale record is just overwritten by the next holder. Under a
launcher only the main process takes it (the others write nothing of the run directory)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lora_sft.errors import UserError

LOCK = ".lora_sft-lock"


def holder(root: Path) -> dict[str, Any] | None:
    """Who holds the run directory's lock now, or None when nobody does (no lock file, or a dead holder's)."""
    path = Path(root) / LOCK
    if not path.is_file():
        return None
    with path.open("r") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _record(f)
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _record(f) -> dict[str, Any]:
    """What the holder wrote into the lock file it holds (pid, host, command, since), or a pid of "?" where it has
    not written it yet."""
    f.seek(0)
    try:
        return json.loads(f.read() or "{}") or {"pid": "?"}
    except ValueError:
        return {"pid": "?"}


def refusal(root: Path, who: dict[str, Any], where: str) -> str:
    """The one line a second writer gets."""
    command = who.get("command", "another lora_sft command")
    place = f"pid {who.get('pid', '?')}" + (f" on {who['host']}" if who.get("host") else "")
    since = f", since {who['since']}" if who.get("since") else ""
    return f"{where}: {root} is in use by `{command}` ({place}{since}); wait for it to end or stop it, or use another run directory"


def check_free(root: Path, where: str) -> None:
    """Refuse, before anything is written, a run directory another process is writing into."""
    if (who := holder(root)) is not None:
        raise UserError(refusal(Path(root), who, where))


@contextlib.contextmanager
def held(root: Path | str, command: str, where: str | None = None) -> Iterator[None]:
    """Hold the run directory's lock for the block: refused in one line (exit 2) when another process holds it.
    The lock file is removed when the block ends, so a run directory holds it only while a command writes."""
    root = Path(root)
    f = _acquire(root / LOCK, where or str(root))
    try:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record))
        f.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            (root / LOCK).unlink()  # while still held: a process waiting on this file retries on the new one
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _acquire(path: Path, where: str):
    """The lock file, open and locked by this process; refused when another process holds it. A file removed by
    the holder that just released it is locked in vain, so the lock is taken again on the file now at `path`."""
    for _ in range(100):
        f = path.open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _record(f)
            f.close()
            raise UserError(refusal(path.parent, who, where)) from None
        try:
            same = os.stat(path).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return f
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
    raise UserError(f"{where}: {path.parent}: cannot take the run directory's lock ({LOCK} keeps changing)")
