"""Where an export is written: `--out` (or RUN_DIR/export) checked so an export never removes or overwrites anything
of the run it reads, nor anything but an earlier export (marked with `.lora_sft-export`), and a staging folder
beside it, renamed into place at the end, so a failure leaves the earlier export as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
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


@contextlib.contextmanager
def staged(out: Path):
    """A staging folder beside `out`, renamed into place when the block succeeds (an earlier export moved aside,
    then removed); on any failure the staging folder (and any parent folder made for it) is removed and `out`
    is as it was."""
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
            for folder in made:  # deepest first
                with contextlib.suppress(OSError):
                    folder.rmdir()
