"""`push` and the recipe's hub section against a fake hub API on 127.0.0.1 (HF_ENDPOINT): files intact, token only in the Authorization header."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import TOKEN, hub_env

from lora_sft.cli.main import main

pytestmark = pytest.mark.e2e


def test_hub_section_pushes_the_adapter_after_training(tiny_run, tmp_path):
    run_dir, hub, proc = tiny_run
    pushed = hub.files[("me/tiny-adapter", "v1")]
    local = {
        p.relative_to(run_dir / "adapter").as_posix(): p.read_bytes()
        for p in (run_dir / "adapter").rglob("*")
        if p.is_file()
    }
    assert pushed == local and "adapter_model.safetensors" in pushed and "README.md" in pushed
    assert hub.repos["me/tiny-adapter"]["visibility"] == "private"  # hub.private defaults to true

    authorized = [r for r in hub.requests if any(k.lower() == "authorization" for k in r["headers"])]
    assert {r["path"].split("?")[0] for r in authorized} >= {
        "/api/repos/create",
        "/api/models/me/tiny-adapter/branch/v1",
        "/api/models/me/tiny-adapter/preupload/v1",
        "/api/models/me/tiny-adapter/commit/v1",
    }
    for r in hub.requests:
        for key, value in r["headers"].items():
            if key.lower() == "authorization":
                assert value == f"Bearer {TOKEN}"
            else:
                assert TOKEN not in value, key
        assert TOKEN not in r["path"] and TOKEN.encode() not in r["body"]
    assert TOKEN not in proc.stdout + proc.stderr
    leaked = [p for p in run_dir.parent.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not leaked, leaked  # neither the run directory, its exports, nor anything beside it


def test_dry_run_lists_files_and_sizes_and_sends_nothing(tiny_run, capsys, monkeypatch):
    run_dir, hub, _ = tiny_run
    monkeypatch.delenv("HF_TOKEN", raising=False)
    before = len(hub.requests)
    assert main(["push", str(run_dir), "--repo-id", "me/whole-run", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    listed = {name: size for size, name in (line.strip().split("  ", 1) for line in lines[:-1])}
    assert "adapter/adapter_model.safetensors" in listed and "summary.json" in listed and "recipe.yaml" in listed
    assert not any(name.startswith("checkpoints/") for name in listed)
    for name, size in listed.items():
        assert int(size.replace(",", "")) == (run_dir / name).stat().st_size, name
    assert lines[-1].startswith(f"dry run: would push {len(listed)} files") and "me/whole-run" in lines[-1]
    assert len(hub.requests) == before


def test_push_refuses_a_bad_repo_id(tiny_run, capsys):
    run_dir, _, _ = tiny_run
    assert main(["push", str(run_dir / "adapter"), "--repo-id", "a/b/c", "--dry-run"]) == 2
    assert "--repo-id: 'a/b/c' is not a repository id" in capsys.readouterr().err


def test_push_creates_private_repositories_unless_public_is_asked(tiny_run, tmp_path):
    run_dir, hub, _ = tiny_run
    env = hub_env(hub.url, tmp_path / "hf-home")
    before = {p: p.read_bytes() if p.is_file() else None for p in sorted(run_dir.rglob("*"))}
    for flags, repo, visibility in (
        ([], "me/private-by-default", "private"),
        (["--public"], "me/opted-public", "public"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "lora_sft", "push", str(run_dir / "adapter"), "--repo-id", repo, *flags],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert hub.repos[repo]["visibility"] == visibility, hub.repos[repo]
    # push stages nothing in the folder it uploads (nor in the run): pushed twice, every file as it was
    assert {p: p.read_bytes() if p.is_file() else None for p in sorted(run_dir.rglob("*"))} == before
