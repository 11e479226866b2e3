"""How lora_sft writes a file or a folder that may already be there: atomically, and only over what it wrote itself.

The ownership rule, one for every command that replaces what it wrote before:

- A file is replaced in one step (`write_atomic`): a reader, or a run killed meanwhile, sees the old file or the new
  one. A file that a command may find in its way (the image `plot` writes) carries a mark inside (`mark_text`, in its
  metadata), and one without it is never replaced (`check_replaceable`): the command refuses in one line naming the
  file and what to do instead.
- A folder a command fills (an export) has a marker file, written first, that lists once the command is done every
  file it wrote there (`OwnedFolder`). Writing the folder again (`OwnedFolder.staged`) builds the new contents in a
  staging folder inside it, so every rename stays on one file system; refuses, before anything is changed, a new file
  whose place holds something lora_sft did not write; marks the folder as holding both the old files and the new ones
  (a process killed half-way leaves nothing the next run would not clean up); moves the old files aside and the new
  ones in, the marker last; then removes what it moved aside and the folders that leaves empty. A failure before the
  end puts the old files back, and a file the user put in the folder, at any depth, is never moved.
- Removing a folder's contents (`OwnedFolder.remove`: a new adapter makes the run's export stale) removes the same
  files and keeps every other.

A marker from before the list (or a folder the marker's command wrote before it had one) names no files: its files
are then every file under the names the command writes (`names`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from lora_sft.errors import UserError

FILES = "files"  # the marker's key: what the command wrote, relative paths
STAGING, ASIDE = ".lora_sft-staging-", ".lora_sft-old-"  # inside a folder being replaced (hidden: push skips them)
MARK_BYTES = 64 * 1024  # a file's mark is looked for in its first and last bytes (metadata sits at either end)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """`write(tmp)` writes the file next to `path`, which then replaces `path` in one step: a reader (or a run
    killed meanwhile) sees the old file or the new one, never half of one; one that fails leaves no .tmp file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, value) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2, default=str) + "\n"))


# ---------------------------------------------------------------- a single file: a mark inside


def mark_text(command: str) -> str:
    """What a file written by `command` carries in its metadata to say so."""
    return f"lora_sft {command}"


def holds_mark(path: Path, command: str) -> bool:
    """The file carries `mark_text(command)` (looked for where metadata sits: its first and last bytes)."""
    mark = mark_text(command).encode()
    try:
        with path.open("rb") as f:
            head = f.read(MARK_BYTES)
            f.seek(max(0, f.seek(0, os.SEEK_END) - MARK_BYTES))
            tail = f.read()
    except OSError:
        return False
    return mark in head or mark in tail


def check_replaceable(path: Path, command: str, where: str, fix: str) -> None:
    """Refuse (one line, nothing written) to replace a file that `command` did not write."""
    if (path.exists() or path.is_symlink()) and not holds_mark(path, command):
        raise UserError(
            f"{where}: {path} exists and lora_sft did not write it; `{command}` replaces only its own: {fix}"
        )


# ---------------------------------------------------------------- a folder: a marker listing what was written


def _files(root: Path) -> set[str]:
    """Every file (and symlink) under `root`, as relative POSIX paths; symlinked folders are not entered."""
    found = set()
    for folder, dirs, names in os.walk(root):
        base = Path(folder)
        links = [d for d in dirs if (base / d).is_symlink()]
        dirs[:] = [d for d in dirs if d not in links]
        found |= {(base / n).relative_to(root).as_posix() for n in [*names, *links]}
    return found


def _safe(root: Path, rel: str) -> bool:
    """`rel`, read from a marker anyone could edit, names a place inside `root` reached through real folders only."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or any(p in ("", ".", "..") for p in parts):
        return False
    return not any((root / Path(*parts[:i])).is_symlink() for i in range(1, len(parts)))


def _prune(root: Path, paths: set[str]) -> None:
    """Remove the folders (inside `root`, not `root`) that removing `paths` left empty, deepest first."""
    folders = {parent for p in paths for parent in PurePosixPath(p).parents if str(parent) != "."}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        with contextlib.suppress(OSError):
            (root / folder).rmdir()


class OwnedFolder:
    """A folder a command fills: `marker` (a JSON file) says lora_sft wrote it and lists what; `names` are the
    entries the command writes, which an older marker without the list is taken to cover."""

    def __init__(self, root: Path, marker: str, names: tuple[str, ...]):
        self.root = root
        self.marker = root / marker
        self.names = names

    def _listed(self) -> list[str] | None:
        """The files the marker lists; None where it lists none (no marker, or one from before the list)."""
        try:
            listed = json.loads(self.marker.read_text()).get(FILES)
        except (OSError, ValueError, AttributeError):
            return None
        return listed if isinstance(listed, list) and all(isinstance(p, str) for p in listed) else None

    def written(self) -> set[str]:
        """The files lora_sft wrote in the folder that are there now (relative POSIX paths, the marker included)."""
        listed = self._listed()
        if listed is None:  # an older folder: everything under the names the command writes
            listed = [p for p in _files(self.root) if PurePosixPath(p).parts[0] in self.names]
        ours = {p for p in listed if _safe(self.root, p)} | {self.marker.name}
        return {p for p in ours if (self.root / p).is_file() or (self.root / p).is_symlink()}

    def remove(self) -> None:
        """Remove what lora_sft wrote here (the marker last) and the folders that leaves empty; keep every other
        file, and the folder itself while it holds one."""
        legacy = self._listed() is None
        ours = self.written()
        for rel in [*sorted(ours - {self.marker.name}), self.marker.name]:
            (self.root / rel).unlink(missing_ok=True)
        _prune(self.root, ours)
        for name in self.names if legacy else ():  # an older folder's empty folders under its names
            if (self.root / name).is_dir() and not (self.root / name).is_symlink():
                for folder, _, _ in os.walk(self.root / name, topdown=False):
                    with contextlib.suppress(OSError):
                        Path(folder).rmdir()
        with contextlib.suppress(OSError):
            self.root.rmdir()

    @contextlib.contextmanager
    def staged(self, where: str, fix: str) -> Iterator[Path]:
        """A staging folder whose files, when the block succeeds, replace what lora_sft wrote in the folder (see the
        module's docstring); the block writes the marker first. On any failure the folder is as it was, and so
        is its parent (a folder made for it is removed). `where` and `fix` word the refusal of a file in the way."""
        made = [p for p in (self.root, *self.root.parents) if not p.exists()]
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=STAGING, dir=self.root))
        try:
            yield staging
            self._swap(staging, where, fix)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if made and not any(self.root.iterdir()):
                for folder in made:  # deepest first
                    with contextlib.suppress(OSError):
                        folder.rmdir()

    def _in_the_way(self, rel: str, old: set[str]) -> bool:
        """A new file's place, or a folder on its way there, holds something lora_sft did not write."""
        for folder in (str(p) for p in PurePosixPath(rel).parents if str(p) != "."):
            place = self.root / folder
            if folder not in old and (place.is_symlink() or (place.exists() and not place.is_dir())):
                return True
        return rel not in old and ((self.root / rel).exists() or (self.root / rel).is_symlink())

    def _swap(self, staging: Path, where: str, fix: str) -> None:
        """Move the staged files in over the ones lora_sft wrote before (the module's docstring says how)."""
        marker = self.marker.name
        old, new = self.written(), _files(staging)
        if in_the_way := [rel for rel in sorted(new - {marker}) if self._in_the_way(rel, old)]:
            more = f" (and {len(in_the_way) - 1} more)" if len(in_the_way) > 1 else ""
            raise UserError(
                f"{where}: {self.root / in_the_way[0]}{more} is in the way: lora_sft did not write it and would replace it; {fix}"
            )
        head = json.loads((staging / marker).read_text())
        write_json(staging / marker, head | {FILES: sorted(new - {marker})})
        before = self.marker.read_bytes() if self.marker.is_file() else None
        aside = Path(tempfile.mkdtemp(prefix=ASIDE, dir=self.root))
        moved_out: list[str] = []
        moved_in: list[str] = []
        try:
            # from here on a process killed half-way leaves a marker that names every file it may have put here
            write_json(self.marker, head | {FILES: sorted((old | new) - {marker})})
            for rel in sorted(old - {marker}):
                (aside / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.root / rel, aside / rel)
                moved_out.append(rel)
            for rel in sorted(new - {marker}):
                (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, self.root / rel)
                moved_in.append(rel)
            os.replace(staging / marker, self.marker)  # last: the folder is the new one
        except BaseException:  # put the old files back, as they were
            for rel in reversed(moved_in):
                os.replace(self.root / rel, staging / rel)
            _prune(self.root, set(moved_in))
            for rel in reversed(moved_out):
                (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(aside / rel, self.root / rel)
            if before is None:
                self.marker.unlink(missing_ok=True)
            else:
                write_atomic(self.marker, lambda tmp: tmp.write_bytes(before))
            shutil.rmtree(aside, ignore_errors=True)
            raise
        shutil.rmtree(aside)
        _prune(self.root, old - new)
