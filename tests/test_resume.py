"""Interrupted runs lose nothing and resumed runs are exact (CPU, tiny Llama, real Trainer).

- A run killed with SIGKILL at a random step (a subprocess, several seeds) and resumed with
  `train --resume` logs the same per-step losses and writes the same adapter as an unbroken run,
  bitwise: on CPU every kernel here is deterministic, Trainer restores the optimizer, scheduler and
  RNG states (dropout is on, so the RNG matters), and skips the batches already trained.
- A run directory that holds a run is not overwritten without --resume or --overwrite; a changed
  recipe that matters is refused on --resume, naming what changed.
- SIGINT / SIGTERM finish the step, save a checkpoint, print how to resume and exit 130 / 143.
- Half-written checkpoints (a staging folder, a folder without its state file) are never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from lora_sft.checkpoint import checkpoints
from lora_sft.cli import main

pytestmark = pytest.mark.e2e
STEPS = 6
SEEDS = (2, 5, 9)  # kill after steps 2, 4 and 5: before, right after and past the epoch boundary at 3
# 24 rows / 8 per step = 3 steps per epoch, so every run crosses an epoch boundary (a reshuffle)
ROWS = (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()[:24]


def recipe_dict(tiny_llama, out: Path, **train) -> dict:
    data = out.parent / "train.jsonl"
    data.write_text("\n".join(ROWS) + "\n")
    return {
        "task": "causal_lm",
        "output_dir": str(out),
        "seed": 7,
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},  # dropout: the resumed RNG must match too
        "data": {"format": "alpaca", "train": str(data), "max_length": 64},
        "train": {"lr": 1e-2, "max_steps": STEPS, "micro_batch_size": 4, "grad_accum": 2, "warmup": 1,
                  "logging_steps": 1, "save_steps": 1, "save_total_limit": 2, "gradient_checkpointing": False, **train},
    }


def losses(run: Path) -> list[tuple[int, float]]:
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # the line a running process is writing
            pass
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def unbroken(tiny_llama, tmp_path_factory):
    """The reference: the same recipe trained without interruption."""
    import yaml

    folder = tmp_path_factory.mktemp("unbroken")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tiny_llama, folder / "run")))
    assert main(["train", str(path)]) == 0
    return folder / "run"


def _env() -> dict:
    # the subprocess imports lora_sft from this checkout, whatever is installed
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _start(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lora_sft", "train", str(recipe), *args], cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _signal_at(runs: list[tuple[subprocess.Popen, Path, int, int]]) -> None:
    """Send each process (proc, run, step, signal) its signal as soon as its run has logged that step."""
    waiting, deadline = list(runs), time.monotonic() + 180
    while waiting and time.monotonic() < deadline:
        for item in list(waiting):
            proc, run, step, sig = item
            if proc.poll() is not None:
                pytest.fail(f"the run ended before step {step}: {proc.stderr.read()}")
            if run.joinpath("metrics.jsonl").is_file() and any(s >= step for s, _ in losses(run)):
                proc.send_signal(sig)
                waiting.remove(item)
        time.sleep(0.01)
    for proc, *_ in waiting:
        proc.kill()
    assert not waiting, "not every run reached its step in 180 s"


def test_killed_and_resumed_equals_unbroken(unbroken, tiny_llama, tmp_path, capsys):
    """Three runs, each killed at its own random step (started together to share the import time)."""
    import yaml

    runs = {}
    for seed in SEEDS:
        kill_at = random.Random(seed).randint(2, STEPS - 1)  # step 1's checkpoint exists by then
        (tmp_path / str(seed)).mkdir()
        run = tmp_path / str(seed) / "run"
        recipe = tmp_path / str(seed) / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(recipe_dict(tiny_llama, run)))
        runs[seed] = (kill_at, run, recipe, _start(recipe))
    # the kill lands anywhere around step kill_at's save, maybe mid-write
    _signal_at([(proc, run, kill_at, signal.SIGKILL) for kill_at, run, recipe, proc in runs.values()])
    for kill_at, run, recipe, proc in runs.values():
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and not (run / "summary.json").exists()

    for seed, (kill_at, run, recipe, _) in runs.items():
        assert main(["train", str(recipe)]) == 2  # not overwritten without --resume
        assert "already holds an unfinished run; continue it with --resume" in capsys.readouterr().err

        assert main(["train", str(recipe), "--resume"]) == 0
        assert losses(run) == losses(unbroken), seed  # per step, exactly
        assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))
        ref, got = adapter(unbroken), adapter(run)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), (seed, [k for k in ref if not torch.equal(ref[k], got[k])][:3])
        summaries = [json.loads((r / "summary.json").read_text()) for r in (unbroken, run)]
        assert [(s["tokens_seen"], s["tokens_trained"], s["steps"]) for s in summaries][0] == [(s["tokens_seen"], s["tokens_trained"], s["steps"]) for s in summaries][1]
        kept = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert kept == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]  # the last K, no staging left over


def test_finished_run_is_not_overwritten_and_changed_recipe_is_refused(unbroken, tiny_llama, tmp_path, capsys):
    import yaml

    path = unbroken.parent / "recipe.yaml"
    before = {p: p.read_bytes() for p in unbroken.rglob("*") if p.is_file()}
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a finished run; continue it with --resume, replace it with --overwrite" in err[0]

    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(recipe_dict(tiny_llama, unbroken, micro_batch_size=2, lr=5e-3)))
    assert main(["train", str(changed), "--resume", "lora.rank=8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume refused, the recipe changed" in err[0]
    assert "lora.rank 4 -> 8" in err[0] and "effective batch (micro_batch_size * grad_accum) 8 -> 4" in err[0]
    assert "lr" not in err[0].split("changed since")[1]  # the learning rate may change on resume
    assert main(["train", str(path), "--resume", str(unbroken / "checkpoints" / "nope")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in unbroken.rglob("*") if p.is_file()} == before


def test_overwrite_replaces_a_run(unbroken, tiny_llama, tmp_path, write_recipe):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(unbroken, run)
    (run / "stale.txt").write_text("from the old run")
    recipe = write_recipe(recipe_dict(tiny_llama, run, max_steps=1))
    assert main(["train", str(recipe), "--overwrite"]) == 0
    assert not (run / "stale.txt").exists() and json.loads((run / "summary.json").read_text())["steps"] == 1


def copy_of(unbroken: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the unbroken run directory and its recipe pointing at it (the same data file, so resumable)."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(unbroken, run)
    saved = yaml.safe_load((unbroken.parent / "recipe.yaml").read_text())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**saved, "output_dir": str(run)}))
    return run, recipe


def test_half_written_checkpoints_are_never_picked_up(unbroken, tmp_path, capsys):
    run, recipe = copy_of(unbroken, tmp_path)
    folder = run / "checkpoints"
    staged = folder / ".staging" / f"checkpoint-{STEPS + 1}"  # a save cut short by a kill
    staged.mkdir(parents=True)
    (staged / "adapter_model.safetensors").write_bytes(b"half")
    torn = folder / f"checkpoint-{STEPS + 2}"  # what a non-atomic writer leaves: a folder without its state file
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"half")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # the line a killed process was writing
    assert [p.name for p in checkpoints(folder)] == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]

    assert main(["train", str(recipe), "--resume", f"train.max_steps={STEPS + 1}"]) == 0
    assert f"resuming from {folder / f'checkpoint-{STEPS}'}" in capsys.readouterr().out
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 2)) and losses(run)[:STEPS] == losses(unbroken)
    assert not (folder / ".staging").exists()


def test_resume_from_a_named_checkpoint_redoes_the_later_steps_exactly(unbroken, tmp_path, capsys):
    run, recipe = copy_of(unbroken, tmp_path)
    earlier = run / "checkpoints" / f"checkpoint-{STEPS - 1}"
    assert main(["train", str(recipe), "--resume", str(earlier)]) == 0
    assert f"resuming from {earlier}" in capsys.readouterr().out
    assert losses(run) == losses(unbroken)  # step STEPS trained again, the same; its log record not doubled
    ref, got = adapter(unbroken), adapter(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]


def test_signals_save_and_exit_130_or_143(tiny_llama, tmp_path):
    procs = {}
    for sig in (signal.SIGINT, signal.SIGTERM):  # started together to share the import time
        (tmp_path / sig.name).mkdir()
        run = tmp_path / sig.name / "run"
        recipe = tmp_path / sig.name / "recipe.yaml"
        recipe.write_text(__import__("yaml").safe_dump(recipe_dict(tiny_llama, run, max_steps=500, save_steps=1000)))
        procs[sig] = (run, recipe, _start(recipe))
    _signal_at([(proc, run, 2, sig) for sig, (run, recipe, proc) in procs.items()])
    for sig, (run, recipe, proc) in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err  # 130, 143
        assert "Traceback" not in err
        saved = sorted((run / "checkpoints").glob("checkpoint-*"))
        assert len(saved) == 1, saved  # save_steps is 1000: this one was written because of the signal
        step = int(saved[0].name.split("-")[1])
        last = err.strip().splitlines()[-1]
        assert last == f"error: {sig.name}: stopped after step {step}, checkpoint {saved[0]}; continue with: python -m lora_sft train {recipe} --resume"
        assert step < 500 and [s for s, _ in losses(run)][-1] == step
