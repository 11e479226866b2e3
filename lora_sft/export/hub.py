"""Push a folder (an adapter, an export, a run directory) to the model hub through huggingface_hub.

The token comes from HF_TOKEN or the saved login (`hf auth login`), read by huggingface_hub itself:
lora_sft never holds it in a file, a log line or an error message. HF_ENDPOINT points at another hub.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from lora_sft.compat import offline_variable
from lora_sft.errors import UserError
from lora_sft.paths import resolved
from lora_sft.run.rundir import CHECKPOINTS

REPO_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]{1,96}$")
SKIP = (f"{CHECKPOINTS}/", ".")  # a run directory's Trainer checkpoints and hidden files stay home


def files_to_push(folder: Path) -> list[Path]:
    out: list[Path] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(rel.startswith(s) or f"/{s}" in f"/{rel}" for s in SKIP):
            out.append(path)
    return out


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_ready(repo_id: str, where: str, upload: bool = True) -> None:
    """A well-formed repository id and, to upload, the hub not switched off and a token to push with."""
    from huggingface_hub import get_token

    if not REPO_ID.match(repo_id):
        raise UserError(
            f"{where}: {repo_id!r} is not a repository id; use NAME or USER/NAME (letters, digits, '-', '_', '.')"
        )
    if not upload:
        return
    if variable := offline_variable():
        raise UserError(
            f"{where}: {variable}={os.environ[variable]} turns the hub off, so nothing can be pushed; unset it (or use push --dry-run)"
        )
    if not get_token():
        raise UserError(f"{where}: no hub token; set HF_TOKEN or run `hf auth login`")


def refuse_failed_export(root: Path) -> None:
    """An export whose check failed (kept for inspection: fidelity.json `passed` false) is never uploaded."""
    import json

    for report in (root / "fidelity.json", root / "export" / "fidelity.json"):
        fidelity = json.loads(report.read_text()) if report.is_file() else {}
        if fidelity.get("passed") is False:
            first = (fidelity.get("problems") or ["a check failed"])[0]
            raise UserError(
                f"{report}: this export failed its checks ({first}) and was kept only for inspection; fix the cause and export again before pushing"
            )


def push(
    folder: str | Path,
    repo_id: str,
    private: bool = True,
    revision: str | None = None,
    dry_run: bool = False,
    log: Callable[[str], object] = print,
) -> list[Path]:
    """Upload every file of `folder` (Trainer checkpoints and hidden files excepted) in one commit."""
    root = resolved(folder, str(folder))
    if not root.is_dir():
        raise UserError(f"{folder}: no such folder; push a run directory, its adapter/ or an export folder")
    check_ready(repo_id, "--repo-id", upload=not dry_run)
    refuse_failed_export(root)
    files = files_to_push(root)
    if not files:
        raise UserError(f"{folder}: nothing to push (no files)")
    total = sum(f.stat().st_size for f in files)
    if dry_run:
        for f in files:
            log(f"{f.stat().st_size:>14,}  {f.relative_to(root).as_posix()}")
        log(
            f"dry run: would push {len(files)} files ({_size(total)}) to {repo_id}{'@' + revision if revision else ''} ({'private' if private else 'public'})"
        )
        return files

    from huggingface_hub import HfApi

    api = HfApi()  # the token is looked up by huggingface_hub on each request, never passed through here
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision:
        api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        folder_path=root,
        repo_id=repo.repo_id,
        revision=revision,
        allow_patterns=[f.relative_to(root).as_posix() for f in files],
        commit_message=f"Upload {root.name} with lora_sft",
    )
    log(f"pushed {len(files)} files ({_size(total)}) to {repo}: {commit.commit_url}")
    return files
