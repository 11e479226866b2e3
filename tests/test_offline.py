"""The offline variables (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE, HF_DATASETS_OFFLINE): the suite's fake-hub push works
whatever the caller set, and a recipe that pushes is refused before training, naming the variable that is set."""

from __future__ import annotations

import subprocess
import sys

import pytest
from fake_hub import FakeHub
from helpers import OFFLINE_VARIABLES, REPO, hub_env

from lora_sft.cli.main import main

pytestmark = pytest.mark.unit


def test_the_fake_hub_push_works_with_the_offline_variables_set(tmp_path, monkeypatch):
    for name in OFFLINE_VARIABLES:  # as on an offline machine: every one of them set in the parent
        monkeypatch.setenv(name, "1")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    files = {"adapter_config.json": b'{"r": 4}\n', "sub/weights.bin": bytes(range(256)) * 3}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    with FakeHub() as hub:
        proc = subprocess.run(
            [sys.executable, "-m", "lora_sft", "push", "--repo-id", "me/x", str(folder)],
            cwd=REPO,
            env=hub_env(hub.url, tmp_path / "hf-home"),
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert hub.files[("me/x", "main")] == files
    assert proc.stdout.startswith("pushed 2 files") and "me/x" in proc.stdout


def test_train_with_a_hub_repo_is_refused_before_training_when_transformers_offline_is_set(
    tiny_llama, tmp_path, write_recipe, capsys, monkeypatch
):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # huggingface_hub then reads TRANSFORMERS_OFFLINE
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_TOKEN", "hf_notUsed")
    out = tmp_path / "run"
    recipe = {
        "task": "causal_lm",
        "output_dir": str(out),
        "model": {"path": str(tiny_llama)},
        "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl")},
        "hub": {"repo_id": "me/x"},
    }
    path = write_recipe(recipe)
    assert main(["train", str(path)]) == 2
    line = next(n + 1 for n, text in enumerate(path.read_text().splitlines()) if text.strip().startswith("repo_id:"))
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}:{line}: hub.repo_id: TRANSFORMERS_OFFLINE=1 turns the hub off, so nothing can be pushed; unset it (or use push --dry-run)"
    ]
    assert not out.exists()  # refused by the preflight: nothing trained, nothing written
