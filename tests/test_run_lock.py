"""One writer per run directory (run/lock.py): while a train, export or eval writes into a run directory, a second
one is refused in one line (exit 2) naming the process that holds it, before it changes anything; a lock left by a
killed process is never in the way; a finished command leaves no lock file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import REPO

from lora_sft.cli.main import main
from lora_sft.run.lock import LOCK, check_free, holder
from lora_sft.run.rundir import RunDir

ROWS = (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()[:16]
HOLD = """
import sys, time
from lora_sft.run.lock import held
with held(sys.argv[1], "train"):
    print("held", flush=True)
    time.sleep(120)
"""


def write_run_recipe(tiny_llama, tmp_path: Path) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(ROWS) + "\n")
    recipe = {
        "task": "causal_lm",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 4, "alpha": 8},
        "data": {"format": "alpaca", "train": str(data), "max_length": 48},
        "train": {"max_steps": 2, "micro_batch_size": 4, "save_steps": 1, "gradient_checkpointing": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def hold(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock, as a live `train` does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.e2e
def test_a_second_writer_is_refused_naming_the_holder_and_changes_nothing(tiny_llama, tmp_path, capsys):
    recipe = write_run_recipe(tiny_llama, tmp_path)
    assert main(["train", str(recipe)]) == 0
    run = tmp_path / "run"
    assert not (run / LOCK).exists()  # a finished command leaves no lock behind
    capsys.readouterr()
    proc = hold(run)
    try:
        before = snapshot(run)
        for argv in (["train", str(recipe), "--overwrite"], ["train", str(recipe), "--resume"], ["export", str(run)]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"is in use by `train` (pid {proc.pid} on " in err[0], (argv, err)
            assert err[0].endswith("wait for it to end or stop it, or use another run directory")
            assert snapshot(run) == before, argv  # nothing replaced, nothing written
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.unit
def test_a_lock_left_by_a_killed_process_is_not_in_the_way(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    proc = hold(folder)
    assert holder(folder)["pid"] == proc.pid
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up: the lock file stays, the kernel drops the flock
    proc.wait()
    assert (folder / LOCK).exists()
    deadline = time.time() + 10
    while holder(folder) is not None and time.time() < deadline:
        time.sleep(0.05)
    assert holder(folder) is None
    check_free(folder, "output_dir")  # no refusal
    assert RunDir(folder).is_empty()  # the stale lock file alone does not make the folder someone else's
