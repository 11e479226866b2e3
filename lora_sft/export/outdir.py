"""Where an export is written: `--out` (or RUN_DIR/export) checked so an export never removes or overwrites anything
of the run it reads, nor anything but an earlier export (marked with `.lora_sft-export`), and of an earlier export
only the files it wrote (the marker lists them): a staging folder inside `--out`, moved into place at the end, so a
failure leaves the earlier export as it was and a file of the user's in the folder stays (`run.files.OwnedFolder`).
"""

from __future__ import annotations

import os
from pathlib import Path

from lora_sft.errors import UserError
from lora_sft.run.rundir import ARTIFACTS, EXPORT, ExportDir, check_writable, entries


def is_export(folder: Path) -> bool:
    """An earlier lora_sft export: marked, or (from before the marker) a fidelity.json that export wrote."""
    return ExportDir(folder).is_export()


def check_out(run_root: Path, out: Path) -> None:
    """Refuse an export folder that would remove or overwrite anything but an earlier export (one line, nothing written)."""
    fix = f"give --out a new folder, or leave it out to write {run_root / EXPORT}"
    if out == run_root / EXPORT:
        if out.is_symlink() and not out.exists():  # a link of the user's: never removed, never written through
            raise UserError(
                f"{out}: is a link to {os.readlink(out)}, which does not exist; create that folder, or give --out a folder"
            )
        check_writable(out, "--out", "--out")
        return  # the run's own export folder
    if out == run_root or out in run_root.parents:
        raise UserError(
            f"--out {out}: {'is' if out == run_root else 'holds'} the run directory {run_root}; an export never replaces the run it reads: {fix}"
        )
    for name in ARTIFACTS:
        if name != EXPORT and (out == run_root / name or run_root / name in out.parents):
            raise UserError(
                f"--out {out}: {'is' if out == run_root / name else 'is inside'} the run's {name}; an export never writes into the run it reads: {fix}"
            )
    for place, what in (
        (Path("/"), "the root folder"),
        (Path.home(), "your home folder"),
        (Path.cwd(), "the working directory"),
    ):
        if out == place.resolve() or out in place.resolve().parents:
            raise UserError(f"--out {out}: {'is' if out == place.resolve() else 'holds'} {what}; {fix}")
    check_writable(out, "--out", "--out")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise UserError(
            f"--out {out}: the folder is not empty ({entries(out)}) and holds no lora_sft export; an export replaces only an earlier export: {fix}"
        )


def staged(run_root: Path, out: Path):
    """A staging folder whose files replace, when the block succeeds, what an earlier export wrote in `out` and
    nothing else; on any failure `out` is as it was (see `OwnedFolder.staged`)."""
    return (
        ExportDir(out)
        .owned()
        .staged(
            f"--out {out}",
            f"move it out of {out}, or give --out a new folder (or leave it out to write {run_root / EXPORT})",
        )
    )
