"""Interrupted runs lose nothing and resumed runs are exact (CPU, tiny Llama, real Trainer).

- A run killed with SIGKILL at a random step (a subprocess, several seeds) and resumed with
  `train --resume` logs the same per-step losses and writes the same adapter as an unbroken run,
  bitwise: on CPU every kernel here is deterministic, Trainer restores the optimizer, scheduler and
  RNG states (dropout is on, so the RNG matters), and skips the batches already trained.
- A run directory that holds a run is not overwritten without --resume or --overwrite; a changed
  recipe that matters is refused on --resume, naming what changed; a checkpoint of another recipe
  (its recipe hash, its adapter's modules and rank) is refused and the run stays byte for byte.
- SIGINT / SIGTERM finish the step, save a checkpoint, print how to resume and exit 130 / 143.
- Half-written checkpoints (a staging folder, a folder without its state file) are never resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, adapter, losses
from safetensors.torch import load_file

from lora_sft.cli.main import main
from lora_sft.run.checkpoint import checkpoints

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
        "train": {
            "lr": 1e-2,
            "max_steps": STEPS,
            "micro_batch_size": 4,
            "grad_accum": 2,
            "warmup": 1,
            "logging_steps": 1,
            "save_steps": 1,
            "save_total_limit": 2,
            "gradient_checkpointing": False,
            **train,
        },
    }


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
    return subprocess.Popen(
        [sys.executable, "-m", "lora_sft", "train", str(recipe), *args],
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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


@pytest.mark.e2e
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
    for _, run, _, proc in runs.values():
        proc.wait()
        assert proc.returncode == -signal.SIGKILL and not (run / "summary.json").exists()

    for seed, (_, run, recipe, _) in runs.items():
        assert main(["train", str(recipe)]) == 2  # not overwritten without --resume
        assert "already holds an unfinished run; continue it with --resume" in capsys.readouterr().err

        assert main(["train", str(recipe), "--resume"]) == 0
        assert losses(run) == losses(unbroken), seed  # per step, exactly
        assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1))
        ref, got = adapter(unbroken), adapter(run)
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), (
            seed,
            [k for k in ref if not torch.equal(ref[k], got[k])][:3],
        )
        summaries = [json.loads((r / "summary.json").read_text()) for r in (unbroken, run)]
        totals = [(s["tokens_seen"], s["tokens_trained"], s["steps"]) for s in summaries]
        assert totals[0] == totals[1]
        # the mean over the whole run, not over the steps trained after the resume
        assert summaries[1]["train_loss_mean"] == pytest.approx(summaries[0]["train_loss_mean"], rel=1e-9)
        kept = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert kept == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]  # the last K, no staging left over


# One seed each: the option's randomness (NEFTune's noise) or optimizer (LoRA+'s param groups) resumes exactly too.
OPTIONS = [
    pytest.param({"neftune_alpha": 5.0}, 2, id="neftune"),
    pytest.param({"lora_plus_ratio": 16.0}, 5, id="lora_plus"),
]


@pytest.mark.e2e
@pytest.mark.parametrize("option,seed", OPTIONS)
def test_killed_and_resumed_equals_unbroken_with_each_option(option, seed, tiny_llama, tmp_path, capsys):
    import yaml

    folders = {name: tmp_path / name for name in ("unbroken", "killed")}
    for folder in folders.values():
        folder.mkdir()
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_llama, folder / "run", **option)))
    kill_at = random.Random(seed).randint(2, STEPS - 1)
    run, recipe = folders["killed"] / "run", folders["killed"] / "recipe.yaml"
    proc = _start(recipe)
    _signal_at([(proc, run, kill_at, signal.SIGKILL)])
    proc.wait()
    reference = folders["unbroken"] / "run"
    assert main(["train", str(folders["unbroken"] / "recipe.yaml")]) == 0
    assert proc.returncode == -signal.SIGKILL and not (run / "summary.json").exists()
    assert main(["train", str(recipe), "--resume"]) == 0
    assert losses(run) == losses(reference) and [s for s, _ in losses(run)] == list(range(1, STEPS + 1))
    ref, got = adapter(reference), adapter(run)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # and the option acted: the same recipe without it trains another adapter
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(tiny_llama, plain / "run")))
    assert main(["train", str(plain / "recipe.yaml")]) == 0
    assert losses(plain / "run") != losses(reference)


@pytest.mark.e2e
def test_lora_plus_cannot_be_switched_on_resume(unbroken, capsys):
    """LoRA+ makes other optimizer param groups: a checkpoint's optimizer state fits only the setting it was
    written with, so the ratio is part of what a resumed run must share."""
    before = {p: p.read_bytes() for p in unbroken.rglob("*") if p.is_file()}
    assert main(["train", str(unbroken.parent / "recipe.yaml"), "--resume", "train.lora_plus_ratio=16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume refused, the recipe changed" in err[0] and "lora_plus_ratio None -> 16" in err[0]
    assert {p: p.read_bytes() for p in unbroken.rglob("*") if p.is_file()} == before


@pytest.mark.e2e
def test_finished_run_is_not_overwritten_and_changed_recipe_is_refused(unbroken, tiny_llama, tmp_path, capsys):
    import yaml

    path = unbroken.parent / "recipe.yaml"
    before = {p: p.read_bytes() for p in unbroken.rglob("*") if p.is_file()}
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # a finished run: --resume alone would have nothing to train, so the line does not offer it as the way on
    assert len(err) == 1 and f"already holds a finished run ({STEPS} steps); replace it with --overwrite" in err[0]
    assert "larger train.max_steps" in err[0] and "continue it with --resume" not in err[0]

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


@pytest.mark.e2e
def test_overwrite_replaces_a_run(unbroken, tiny_llama, tmp_path, write_recipe):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(unbroken, run)
    (run / "notes.txt").write_text("the user's, not the run's")
    (run / "eval.md").write_text("the old adapter's eval")
    recipe = write_recipe(recipe_dict(tiny_llama, run, max_steps=1))
    assert main(["train", str(recipe), "--overwrite"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 1
    assert (run / "notes.txt").read_text() == "the user's, not the run's"  # --overwrite removes only what a run wrote
    assert not (run / "eval.md").exists() and sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "checkpoint-1"
    ]


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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_resume_from_a_named_checkpoint_redoes_the_later_steps_exactly(unbroken, tmp_path, capsys):
    run, recipe = copy_of(unbroken, tmp_path)
    earlier = run / "checkpoints" / f"checkpoint-{STEPS - 1}"
    assert main(["train", str(recipe), "--resume", str(earlier)]) == 0
    assert f"resuming from {earlier}" in capsys.readouterr().out
    assert losses(run) == losses(unbroken)  # step STEPS trained again, the same; its log record not doubled
    ref, got = adapter(unbroken), adapter(run)
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]


@pytest.mark.e2e
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
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + sig, err  # 130, 143
        assert "Traceback" not in err
        saved = sorted((run / "checkpoints").glob("checkpoint-*"))
        assert len(saved) == 1, saved  # save_steps is 1000: this one was written because of the signal
        step = int(saved[0].name.split("-")[1])
        last = err.rstrip("\n").split("\n")[-1]  # a line of its own, not the progress bar's (`grep ^error:` finds it)
        assert (
            last
            == f"error: {sig.name}: stopped after step {step}, checkpoint {saved[0]}; continue with: python -m lora_sft train {recipe} --resume"
        )
        assert step < 500 and [s for s, _ in losses(run)][-1] == step


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _foreign_checkpoint(
    unbroken: Path, where: Path, rank: int | None = None, drop: str | None = None, recipe: dict | None = None
) -> Path:
    """A copy of the unbroken run's last checkpoint at `where`, its adapter rewritten to LoRA rank `rank` and/or
    without the modules whose name holds `drop`; the counts file without the recipe (as an older lora_sft wrote it)
    or, with `recipe`, carrying that recipe's identity."""
    import shutil

    from safetensors.torch import save_file

    from lora_sft.run.checkpoint import COUNTS, identity, recipe_hash

    shutil.copytree(unbroken / "checkpoints" / f"checkpoint-{STEPS}", where)
    tensors = load_file(where / "adapter_model.safetensors")
    if drop:
        tensors = {k: v for k, v in tensors.items() if drop not in k}
    if rank:
        tensors = {
            k: torch.zeros((rank, v.shape[1]) if ".lora_A." in k else (v.shape[0], rank)) for k, v in tensors.items()
        }
    save_file(tensors, str(where / "adapter_model.safetensors"))
    counts = json.loads((where / COUNTS).read_text())
    counts = {k: counts[k] for k in ("tokens_seen", "tokens_trained")}
    if recipe is not None:
        counts |= {"recipe": identity(recipe), "recipe_hash": recipe_hash(identity(recipe))}
    (where / COUNTS).write_text(json.dumps(counts))
    return where


@pytest.mark.e2e
def test_checkpoints_carry_the_recipe_hash(unbroken):
    from lora_sft.run.checkpoint import COUNTS, identity, recipe_hash

    saved = yaml_load(unbroken / "recipe.yaml")
    for checkpoint in checkpoints(unbroken / "checkpoints"):
        counts = json.loads((checkpoint / COUNTS).read_text())
        assert counts["recipe"] == json.loads(json.dumps(identity(saved))) and counts["recipe_hash"] == recipe_hash(
            identity(saved)
        )
        assert counts["recipe"]["lora"]["rank"] == 4 and counts["recipe"]["effective_batch"] == 8


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.e2e
def test_a_checkpoint_of_another_recipe_is_refused_and_the_run_stays_byte_for_byte(unbroken, tmp_path, capsys):
    run, recipe = copy_of(unbroken, tmp_path)
    saved = yaml_load(run / "recipe.yaml")
    other = {**saved, "lora": {**saved["lora"], "rank": 8}, "train": {**saved["train"], "grad_accum": 4}}
    cases = {
        # written by a run with another recipe: its counts file says so, the line names the differences
        "hash": (
            _foreign_checkpoint(unbroken, tmp_path / "a" / "checkpoint-6", recipe=other),
            "the checkpoint was written by a run with another recipe: lora.rank 8 -> 4; effective batch (micro_batch_size * grad_accum) 16 -> 8",
        ),
        # an older checkpoint without the hash, in another run directory: that run's recipe.yaml tells
        "other run dir": (
            _foreign_checkpoint(unbroken, tmp_path / "b" / "run" / "checkpoints" / "checkpoint-6"),
            "the checkpoint was written by a run with another recipe: lora.rank 8 -> 4",
        ),
        # no hash, no run around it: the adapter's shapes in the safetensors header
        "rank": (
            _foreign_checkpoint(unbroken, tmp_path / "c" / "checkpoint-6", rank=8),
            "the checkpoint's LoRA rank is 8 (model.layers.0.self_attn.q_proj), this recipe's lora.rank is 4",
        ),
        "modules": (
            _foreign_checkpoint(unbroken, tmp_path / "d" / "checkpoint-6", drop="v_proj"),
            "the checkpoint adapts 12 modules, this recipe 14: not model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj",
        ),
    }
    b = tmp_path / "b" / "run"
    b.joinpath(".lora_sft-run").write_text("{}")
    b.joinpath("recipe.yaml").write_text(__import__("yaml").safe_dump({**saved, "lora": {**saved["lora"], "rank": 8}}))
    with (run / "eval.md").open("w") as f:
        f.write("an eval of the finished run")
    before = snapshot(run)
    for name, (checkpoint, why) in cases.items():
        assert main(["train", str(recipe), "--resume", str(checkpoint)]) == 2, name
        err = capsys.readouterr().err.strip().split("\n")
        assert err == [
            f"error: --resume refused: {checkpoint} does not belong to this recipe: {why}; resume from a checkpoint of this run ({run / 'checkpoints'})"
        ], name
        assert snapshot(run) == before, name  # recipe.yaml, metrics.jsonl, summary.json, eval.md: all as they were


@pytest.mark.e2e
def test_a_resumed_run_drops_what_described_the_old_adapter(unbroken, tmp_path, capsys):
    run, recipe = copy_of(unbroken, tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "evaluation": {"rows": 3}}))
    (run / "eval.md").write_text("the old adapter's eval")
    (run / "export" / "adapter").mkdir(parents=True)
    (run / "notes.txt").write_text("mine")
    assert main(["train", str(recipe), "--resume", str(run / "checkpoints" / f"checkpoint-{STEPS - 1}")]) == 0
    assert not (run / "eval.md").exists() and not (run / "export").exists()
    assert "evaluation" not in json.loads((run / "summary.json").read_text())
    assert (run / "notes.txt").read_text() == "mine" and (run / ".lora_sft-run").is_file()


@pytest.mark.unit
def test_on_save_marks_renames_and_rotates_and_only_marked_checkpoints_count(tmp_path):
    """AtomicCheckpoints, driven as Trainer drives it: Trainer writes `.staging/checkpoint-N`, then `on_save` writes
    the marker (the counts file) last, renames the folder into place, keeps the last K complete ones."""
    from types import SimpleNamespace

    from transformers import TrainerControl

    from lora_sft.run.checkpoint import COUNTS, STATE, AtomicCheckpoints, staging

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    totals = {"tokens_seen": 0, "tokens_trained": 0}
    saves = AtomicCheckpoints(folder, keep=2, counts=lambda: dict(totals), identity={"lora": {"rank": 4}})
    for step in (1, 2, 3):
        state, control = SimpleNamespace(global_step=step), TrainerControl(should_save=True)
        saves.on_step_end(None, state, control)
        written = staging(folder) / f"checkpoint-{step}"  # what Trainer writes (its output_dir is the staging folder)
        written.mkdir(parents=True)
        (written / STATE).write_text(json.dumps({"global_step": step}))
        totals = {"tokens_seen": 10 * step, "tokens_trained": 4 * step}
        saves.on_save(None, state, control)
    assert (
        [p.name for p in checkpoints(folder)]
        == ["checkpoint-2", "checkpoint-3"]
        == sorted(p.name for p in folder.iterdir())
    )
    counts = json.loads((folder / "checkpoint-3" / COUNTS).read_text())
    assert (counts["tokens_seen"], counts["tokens_trained"], counts["recipe"]) == (
        30,
        12,
        {"lora": {"rank": 4}},
    ) and counts["recipe_hash"]
    # a checkpoint folder without the marker (its save cut short) is never a checkpoint to resume from
    torn = folder / "checkpoint-4"
    torn.mkdir()
    (torn / STATE).write_text(json.dumps({"global_step": 4}))
    assert [p.name for p in checkpoints(folder)] == ["checkpoint-2", "checkpoint-3"]
    # saving a step again (resumed from an earlier checkpoint): the old folder stops counting before Trainer rewrites it
    saves.on_step_end(None, SimpleNamespace(global_step=3), TrainerControl(should_save=True))
    assert [p.name for p in checkpoints(folder)] == ["checkpoint-2"]


@pytest.mark.unit
def test_on_save_records_the_best_checkpoint_where_it_lands_and_never_rotates_it_away(tmp_path):
    """load_best_model_at_end: Trainer records the best checkpoint at the path it wrote (the staging folder);
    on_save points the state (and the saved trainer_state.json) at checkpoints/checkpoint-N, and keeps that
    folder beside the last K whatever its age."""
    from transformers import TrainerControl, TrainerState

    from lora_sft.run.checkpoint import STATE, AtomicCheckpoints, staging

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    saves = AtomicCheckpoints(folder, keep=1, counts=lambda: {"tokens_seen": 0, "tokens_trained": 0})
    state = TrainerState()
    for step in (1, 2, 3, 4):
        state.global_step, control = step, TrainerControl(should_save=True)
        saves.on_step_end(None, state, control)
        written = staging(folder) / f"checkpoint-{step}"
        written.mkdir(parents=True)
        if step == 2:  # the best evaluation: Trainer names the folder it has just written
            state.best_model_checkpoint = str(written)
        state.save_to_json(str(written / STATE))
        saves.on_save(None, state, control)
    best = str(folder / "checkpoint-2")
    assert state.best_model_checkpoint == best
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):
        assert json.loads((folder / f"checkpoint-{step}" / STATE).read_text())["best_model_checkpoint"] == best


# ---------------------------------------------------------------- exact, or refused with the missing piece named


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.e2e
def test_a_checkpoint_that_is_not_whole_is_refused_before_anything_changes(unbroken, tmp_path, capsys):
    """Each file an exact resume restores must be there and loadable; the line names the checkpoint, the file and
    what it holds, and the ways on; the run directory stays byte for byte (nothing reopened, no log dropped)."""
    run, recipe = copy_of(unbroken, tmp_path)
    first, last = (run / "checkpoints" / f"checkpoint-{n}" for n in (STEPS - 1, STEPS))
    inexact = (
        "continue without it with --resume --allow-inexact (recorded in manifest.json), or start over with --overwrite"
    )
    cases = [  # (checkpoint, damage, --resume PATH, what the line says)
        (
            first,
            lambda c: (c / "optimizer.pt").unlink(),
            first,
            f"optimizer.pt (the optimizer state) is missing; {inexact}",
        ),
        (
            first,
            lambda c: (c / "rng_state.pth").unlink(),
            first,
            f"rng_state.pth (the random state) is missing; {inexact}",
        ),
        (first, lambda c: (c / "scheduler.pt").unlink(), first, "scheduler.pt (the learning-rate schedule) is missing"),
        (first, lambda c: _truncate(c / "optimizer.pt"), first, "optimizer.pt (the optimizer state) cannot be read ("),
        (
            first,
            lambda c: _truncate(c / "adapter_model.safetensors"),
            first,
            "cannot be resumed: adapter_model.safetensors (the adapter weights) cannot be read",
        ),
        # the step is unknown: not even --allow-inexact resumes it
        (
            first,
            lambda c: (c / "trainer_state.json").write_text("{not json"),
            first,
            "cannot be resumed: trainer_state.json (the step to continue from) cannot be read (JSONDecodeError",
        ),
        # the latest checkpoint damaged: the line names the earlier one that is whole
        (last, lambda c: _truncate(c / "rng_state.pth"), True, "rng_state.pth (the random state) cannot be read ("),
    ]
    for checkpoint, damage, resume, says in cases:
        kept = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
        damage(checkpoint)
        before = snapshot(run)
        args = ["--resume"] if resume is True else ["--resume", str(resume)]
        assert main(["train", str(recipe), *args]) == 2, says
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: --resume refused: {checkpoint} cannot be resumed"), err
        assert says in err[0], (says, err[0])
        if resume is True:
            assert f"resume from {first} (whole)" in err[0]
        if "trainer_state.json" in says:  # nothing to allow: the step to continue from is unknown
            assert "--allow-inexact" not in err[0]
            assert main(["train", str(recipe), *args, "--allow-inexact"]) == 2
            assert "cannot be resumed: trainer_state.json" in capsys.readouterr().err
        assert snapshot(run) == before, says
        for name, data in kept.items():  # put the checkpoint back for the next case
            (checkpoint / name).write_bytes(data)


@pytest.mark.e2e
def test_allow_inexact_resumes_with_what_is_there_and_the_manifest_says_what_was_missing(unbroken, tmp_path, capsys):
    run, recipe = copy_of(unbroken, tmp_path)
    earlier = run / "checkpoints" / f"checkpoint-{STEPS - 1}"
    (earlier / "optimizer.pt").unlink()
    _truncate(earlier / "rng_state.pth")
    damaged = (earlier / "rng_state.pth").read_bytes()
    assert main(["train", str(recipe), "--resume", str(earlier), "--allow-inexact"]) == 0
    out = capsys.readouterr().out
    assert "note: not an exact resume (--allow-inexact, recorded in manifest.json): optimizer.pt" in out
    [resumed] = json.loads((run / "manifest.json").read_text())["resumed"]
    assert resumed["from_step"] == STEPS - 1 and resumed["checkpoint"] == str(earlier)
    assert resumed["inexact"][0] == "optimizer.pt (the optimizer state) is missing"
    assert resumed["inexact"][1].startswith("rng_state.pth (the random state) cannot be read (")
    assert len(resumed["inexact"]) == 2
    # it trained on from the adapter of step 5 with a fresh optimizer: the same steps, another last adapter
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 1)) and losses(run)[: STEPS - 1] == losses(unbroken)[
        : STEPS - 1
    ]
    ref, got = adapter(unbroken), adapter(run)
    assert any(not torch.equal(ref[k], got[k]) for k in ref)
    assert (earlier / "rng_state.pth").read_bytes() == damaged  # the checkpoint itself is never changed
    # --allow-inexact alone means nothing
    assert main(["train", str(recipe), "--allow-inexact"]) == 2
    assert "--allow-inexact: it only applies to --resume" in capsys.readouterr().err


@pytest.mark.e2e
def test_a_finished_run_is_not_resumed_and_its_records_stay_byte_for_byte(unbroken, tmp_path, capsys):
    """--resume on a finished run (summary.json written, the checkpoint its last step) has nothing to train: one
    line, exit 2, and no record of the run gets worse (summary.json was rewritten with tokens_per_second 0.0).
    validate says what train says."""
    run, recipe = copy_of(unbroken, tmp_path)
    before = snapshot(run)
    lines = {}
    for argv in (
        ["train", str(recipe), "--resume"],
        ["validate", str(recipe), "--resume"],
        ["train", str(recipe)],
        ["validate", str(recipe)],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        lines[tuple(argv[:1] + argv[2:])] = err[0]
        assert snapshot(run) == before, argv
    assert lines[("train", "--resume")] == lines[("validate", "--resume")]
    assert (
        f"--resume: the run in {run} is finished (checkpoint-{STEPS} is its last step, {STEPS}"
        in lines[("train", "--resume")]
    )
    assert f"--resume train.max_steps={2 * STEPS}" in lines[("train", "--resume")]
    assert lines[("train",)] == lines[("validate",)] and "already holds a finished run" in lines[("train",)]
    # the way it offers trains on: a larger max_steps continues from the last step
    assert main(["train", str(recipe), "--resume", f"train.max_steps={STEPS + 1}"]) == 0
    assert [s for s, _ in losses(run)] == list(range(1, STEPS + 2))


@pytest.mark.e2e
def test_a_run_killed_after_its_last_checkpoint_finishes_without_training_past_max_steps(unbroken, tmp_path, capsys):
    """Killed after the last step's checkpoint, before the summary: --resume finishes the run (adapter, summary)
    and trains nothing more. Trainer, resumed at its last step in the middle of an epoch, trains one step past
    max_steps (5 of 3 steps per epoch here)."""
    from lora_sft.run.checkpoint import COUNTS

    run, recipe = copy_of(unbroken, tmp_path)
    last = run / "checkpoints" / f"checkpoint-{STEPS - 1}"
    (run / "summary.json").unlink()  # as if max_steps were 5, and the run killed after its last save
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoints" / f"checkpoint-{STEPS}")
    assert main(["train", str(recipe), "--resume", f"train.max_steps={STEPS - 1}"]) == 0
    assert losses(run) == losses(unbroken)[: STEPS - 1] and [s for s, _ in losses(run)] == list(range(1, STEPS))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [last.name]
    saved, got = load_file(last / "adapter_model.safetensors"), adapter(run)
    assert saved.keys() == got.keys() and all(torch.equal(saved[k], got[k]) for k in saved)
    summary, counts = json.loads((run / "summary.json").read_text()), json.loads((last / COUNTS).read_text())
    assert summary["steps"] == STEPS - 1
    assert (summary["tokens_seen"], summary["tokens_trained"]) == (counts["tokens_seen"], counts["tokens_trained"])
    assert summary["train_loss"] == losses(unbroken)[STEPS - 2][1]
    mean = sum(loss for _, loss in losses(unbroken)[: STEPS - 1]) / (STEPS - 1)
    assert summary["train_loss_mean"] == pytest.approx(mean, rel=1e-9)


@pytest.mark.unit
def test_gaps_names_each_file_an_exact_resume_restores(tmp_path):
    """`checkpoint.gaps` on real files: the stream position only for data.streaming, one RNG file per process, and
    a file that is there but not what it should be (not JSON, truncated, no step) counts as a gap."""
    import numpy as np
    from safetensors.torch import save_file

    from lora_sft.run.checkpoint import gaps

    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "max_steps": 6}))
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(2, 4)}, str(folder / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({"state": {}, "param_groups": []}, folder / name)
    torch.save({"numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}, folder / "rng_state.pth")
    (folder / "lora_sft_counts.json").write_text(json.dumps({"tokens_seen": 10, "tokens_trained": 4}))
    assert gaps(folder) == []
    texts = [g.text() for g in gaps(folder, processes=2, streaming=True)]
    assert texts == [
        "rng_state_0.pth (the random state) is missing",
        "rng_state_1.pth (the random state) is missing",
        "lora_sft_stream.json (the stream position) is missing",
    ]
    (folder / "lora_sft_stream.json").write_text("[1, 2")
    (folder / "trainer_state.json").write_text(json.dumps({"epoch": 1.0}))  # JSON, but no step
    found = gaps(folder, streaming=True)
    assert [(g.name, g.essential, g.missing) for g in found] == [
        ("trainer_state.json", True, False),
        ("lora_sft_stream.json", False, False),
    ]
    assert found[1].text().startswith("lora_sft_stream.json (the stream position) cannot be read (JSONDecodeError")
    # an fp16 run's loss scale (Trainer's GradScaler state) is restored too
    assert [g.text() for g in gaps(folder, fp16=True)][-1] == "scaler.pt (the fp16 loss scale) is missing"
