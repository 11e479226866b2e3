"""Under a launcher (torchrun, accelerate launch) only the main process writes and prints, and every process
stops together on bad input: one `error:` line in all, every process exits 2, nothing is written.

The e2e tests start 2 CPU processes with torchrun (gloo); the unit tests set the launcher's variables (RANK,
WORLD_SIZE) in this process, without a process group, and check what a process that is not the main one does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, write_jsonl

from lora_sft import distributed
from lora_sft.cli.main import _report, main
from lora_sft.errors import RunError, UserError
from lora_sft.run.checkpoint import COUNTS, STATE, AtomicCheckpoints, staging
from lora_sft.run.records import Manifest, Summary
from lora_sft.run.rundir import RunDir

WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "light", "table"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _recipe(tiny_llama: Path, work: Path, rows: list[dict] | None = None) -> dict:
    rows = rows if rows is not None else [{"instruction": f"Say {w}.", "output": w} for w in WORDS]
    return {
        "task": "causal_lm",
        "output_dir": str(work / "run"),
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {"format": "alpaca", "train": str(write_jsonl(work / "train.jsonl", rows)), "max_length": 64},
        "train": {
            "lr": 1e-2,
            "max_steps": 2,
            "micro_batch_size": 2,
            "warmup": 0,
            "logging_steps": 1,
            "save_steps": 2,
        },
    }


def _write(work: Path, recipe: dict) -> Path:
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _tree(*folders: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under `folders`: what "nothing written" compares."""
    out: dict[str, bytes | None] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            out[str(path)] = path.read_bytes() if path.is_file() else None
    return out


def _launch(args: list[str], work: Path, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` in `work`, 2 CPU processes (gloo), the cache in work/../cache."""
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "LORA_SFT_CACHE": str(work.parent / "cache"),
        "CUDA_VISIBLE_DEVICES": "",
        **env,
    }
    return subprocess.run(
        [*TORCHRUN, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


def _exit_codes(proc: subprocess.CompletedProcess) -> tuple[int | None, set[int]]:
    """What torchrun reports of its processes (it exits 1 itself whenever one failed): the exit code of the first
    that failed, and every code it saw. Once one process has exited torchrun ends the others (SIGTERM, -15), so a
    process still on its way out may be reported so."""
    root = re.search(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", proc.stderr, re.S)
    codes = {int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)}
    return (int(root.group(1)) if root else None), codes


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "cache").mkdir()
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "notes.txt").write_text("a file of the user's\n")
    return folder


# ---------------------------------------------------------------- e2e: 2 processes under torchrun


def _bad_row_and_model(recipe: dict, work: Path) -> None:
    rows = [{"instruction": "Say a.", "output": "a"}, {"instruction": "b"}]
    recipe["data"]["train"] = str(write_jsonl(work / "bad.jsonl", rows))
    recipe["model"]["path"] = str(work / "no-such-model")


BAD = {  # a mistake in the recipe itself (every process reads it), and two in what the preflight checks
    "unknown-key": (lambda r, w: r["lora"].update(rnak=4), ["lora.rnak: unknown key"]),
    "bad-row-and-model-path": (_bad_row_and_model, ["bad.jsonl:2: missing field 'output'", "no-such-model"]),
}


@pytest.mark.launch
@pytest.mark.parametrize("case", list(BAD))
def test_bad_recipe_under_torchrun_prints_its_errors_once_and_writes_nothing(case, tiny_llama, work):
    recipe = _recipe(tiny_llama, work)
    change, expected = BAD[case]
    change(recipe, work)
    path = _write(work, recipe)
    before = _tree(work.parent, tiny_llama)
    proc = _launch(["-m", "lora_sft", "train", str(path)], work)
    assert _tree(work.parent, tiny_llama) == before  # no run directory, no cache, the model folder untouched
    errors = _errors(proc)  # one line per problem, from one process
    assert len(errors) == len(expected), proc.stdout + proc.stderr
    assert all(text in line and "rank 1" not in line for text, line in zip(expected, errors)), errors
    root, codes = _exit_codes(proc)
    assert proc.returncode != 0 and root == 2 and codes <= {2, -15}, proc.stderr[-3000:]


DRIVER = """
import os, sys
from lora_sft import distributed
from lora_sft.cli import main as cli
from lora_sft.data import cache

FAILING = int(os.environ["FAIL_RANK"])
save, load = cache.save, cache.load

def failing_save(*args, **kwargs):  # the main process cannot write the tokenized-data cache (a full disk)
    if distributed.world().rank == FAILING:
        raise OSError(28, "No space left on device")
    return save(*args, **kwargs)

def failing_load(key):  # another process cannot read it
    if distributed.world().rank == FAILING and FAILING != 0:
        raise OSError(5, "Input/output error")
    return load(key)

cache.save, cache.load = failing_save, failing_load
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.launch
@pytest.mark.parametrize(
    ("rank", "expected"),
    [(1, "error: rank 1: OSError: [Errno 5]")],  # rank 0: "error: OSError: [Errno 28] No space"
)
def test_a_failure_on_one_process_stops_every_process_and_is_printed_once(rank, expected, tiny_llama, work):
    """A failure only one process meets (another process reading the data cache the main one wrote; the main
    process failing to write it works the same way) must not leave the others waiting for it: every process
    stops, exit 1, and the main process prints it once, naming the process. (The main process failing while the
    others wait is also what the bad-row case above does, with bad input.)"""
    path = _write(work, _recipe(tiny_llama, work))
    driver = work.parent / "driver.py"
    driver.write_text(DRIVER)
    proc = _launch([str(driver), "train", str(path)], work, timeout=90, FAIL_RANK=str(rank))
    errors = _errors(proc)
    assert len(errors) == 1 and errors[0].startswith(expected), proc.stdout + proc.stderr
    root, codes = _exit_codes(proc)
    assert root == 1 and codes <= {1, -15}, proc.stderr[-3000:]
    assert not (work / "run").exists()


@pytest.mark.launch
def test_two_processes_write_one_run_directory(tiny_llama, work):
    """Needs DDP training under torchrun (issue 10's ddp work): one run directory, one metrics.jsonl with each step
    logged once, a summary that states the world size and the global batch, the console output printed once."""
    path = _write(work, _recipe(tiny_llama, work))
    proc = _launch(["-m", "lora_sft", "train", str(path)], work, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert not _errors(proc)
    run = RunDir(work / "run")
    records = [json.loads(line) for line in run.metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2], records  # each step logged once, by one process
    assert sum("train_runtime" in r for r in records) == 1
    summary = json.loads(run.summary.read_text())
    assert (summary["world_size"], summary["global_batch"], summary["steps"]) == (2, 2 * 2, 2)
    assert [p.name for p in run.checkpoints.iterdir()] == ["checkpoint-2"]
    assert sorted(p.name for p in (run.checkpoints / "checkpoint-2").glob("rng_state*")) == [
        "rng_state_0.pth",
        "rng_state_1.pth",
    ]  # each process's RNG state is in the checkpoint the main process completed
    assert proc.stdout.count("trainable params:") == 1 and "processes: 2, global batch 4" in proc.stdout
    # the progress lines, by the main process only (the output is not a terminal: lines, no bars)
    assert [line.split("  ")[0] for line in proc.stdout.splitlines() if line.startswith("step ")] == [
        "step 1/2",
        "step 2/2",
    ]
    assert proc.stdout.count("\nsummary\n") == 1 and "%|" not in proc.stderr, proc.stderr[-3000:]
    # checked and tokenized once (one cache entry each), no process's work folder left behind
    entries = [p.name for p in (work.parent / "cache" / "tokenized").iterdir()]
    assert len(entries) == 2 and not [n for n in entries if n.startswith("lora_sft-work-")], entries


# ---------------------------------------------------------------- unit: a process that is not the main one


def _launcher(monkeypatch, rank: int = 0, size: int = 2) -> None:
    """This process as torchrun would start it, as process `rank` of `size` (without a process group)."""
    variables = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": size, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29500}
    for key, value in variables.items():
        monkeypatch.setenv(key, str(value))


@pytest.fixture
def other_rank(monkeypatch):
    """This process as rank 1 of 2 (the launcher's variables), without a process group."""
    _launcher(monkeypatch, rank=1)


@pytest.mark.unit
def test_run_directory_writes_nothing_on_other_processes(tmp_path, other_rank):
    run = RunDir(tmp_path / "run")
    run.create({"task": "causal_lm"}, Manifest.new(0, "fingerprint", {}, "model"))
    run.log({"step": 1, "loss": 1.0})
    run.write_summary(Summary(1.0, 1.0, None, None, None, 1, 1.0, 10, 5, 1.0, [], 8, 100, 1.0, "cpu", 1.0, 1.0))
    assert not (tmp_path / "run").exists()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    run.remove_run()
    run.drop_derived()
    assert (tmp_path / "run" / "summary.json").read_text() == "{}"


def _staged(folder: Path, step: int) -> Path:
    written = staging(folder) / f"checkpoint-{step}"
    written.mkdir(parents=True)
    (written / STATE).write_text(json.dumps({"global_step": step}))
    (written / "rng_state_1.pth").write_bytes(b"rng")
    return written


@pytest.mark.unit
@pytest.mark.parametrize("rank", [0, 1])
def test_only_the_main_process_completes_a_checkpoint(rank, tmp_path, monkeypatch):
    from transformers import TrainerControl, TrainerState

    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    folder = tmp_path / "checkpoints"
    saves = AtomicCheckpoints(folder, 2, lambda: {"tokens_seen": 3, "tokens_trained": 2})
    state, control = TrainerState(global_step=2), TrainerControl(should_save=True)
    saves.on_step_end(None, state, control)
    written = _staged(folder, 2)  # what Trainer writes between the two hooks
    saves.on_save(None, state, control)
    if rank == 1:  # nothing cleared, marked or moved
        assert written.is_dir() and not (written / COUNTS).exists() and not (folder / "checkpoint-2").exists()
    else:
        assert json.loads((folder / "checkpoint-2" / COUNTS).read_text()) == {"tokens_seen": 3, "tokens_trained": 2}
        assert not staging(folder).exists()


@pytest.mark.unit
def test_errors_are_printed_by_the_main_process(monkeypatch, capsys):
    _launcher(monkeypatch, rank=1)
    # bad input: every process finds it; the main process prints it
    assert _report(UserError(["a.yaml:1: lora.rnak: unknown key"]), ["a.yaml:1: lora.rnak: unknown key"], 2) == 2
    shared = distributed.every_rank(RunError("step 3: the loss is nan"))
    assert _report(shared, [str(shared)], 1) == 1
    assert _report(distributed.Elsewhere(0, 1), ["process 0 failed"], 1) == 1
    assert capsys.readouterr().err == ""
    # a failure of this process alone: nobody else knows of it, so it says so, with its rank
    assert _report(RunError("out of GPU memory at step 3"), ["out of GPU memory at step 3"], 1) == 1
    assert capsys.readouterr().err == "error: rank 1: out of GPU memory at step 3\n"
    _launcher(monkeypatch, rank=0)
    _report(shared, [str(shared)], 1)
    assert capsys.readouterr().err == "error: step 3: the loss is nan\n"


@pytest.mark.unit
def test_validate_under_a_launcher_prints_once(tiny_llama, tmp_path, monkeypatch, capsys):
    bad = _recipe(tiny_llama, tmp_path)
    bad["lora"]["rnak"] = 4
    for rank, printed in ((1, ""), (0, "lora.rnak: unknown key")):
        _launcher(monkeypatch, rank)
        assert main(["validate", str(_write(tmp_path, bad))]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == (1 if printed else 0) and printed in err
    _launcher(monkeypatch, rank=1)
    assert main(["validate", str(_write(tmp_path, _recipe(tiny_llama, tmp_path)))]) == 0
    assert capsys.readouterr().out == ""


@pytest.mark.unit
def test_validate_states_the_global_batch_for_n_processes(tiny_llama, tmp_path, monkeypatch, capsys):
    recipe = _recipe(tiny_llama, tmp_path)
    del recipe["train"]["max_steps"]
    recipe["train"] |= {"epochs": 3, "grad_accum": 2, "micro_batch_size": 1}
    path = str(_write(tmp_path, recipe))

    def lines(*args: str) -> list[str]:
        assert main(["validate", path, *args]) == 0
        out = capsys.readouterr().out
        return [line.strip() for line in out.splitlines() if line.strip().startswith(("training:", "memory estimate"))]

    # 8 rows: 8 micro batches of 1 per epoch, 4 steps of 2; on 2 processes each reads 4 of them: 2 steps
    alone = lines()
    assert alone[0].startswith("training: 12 steps (3 epochs), batch 2 (1 x 2 accumulated), ")
    assert alone[1].startswith("memory estimate on the CPU: ")
    two = lines("--nproc", "2")
    assert two[0].startswith(
        "training: 6 steps (3 epochs), global batch 4 (micro batch 1 x 2 accumulated x 2 processes), "
    )
    assert two[1].startswith("memory estimate per process (2 processes, each holding the whole model): ")
    # DDP: each process holds what one process did (the CPU's figure includes this process's own memory, which moves)
    assert two[1].split(" at ", 1)[1] == alone[1].split(" at ", 1)[1]
    _launcher(monkeypatch)  # run under a launcher: its world size, the same lines
    launched = lines()
    assert launched[0] == two[0] and launched[1].split(":")[0] == two[1].split(":")[0]


@pytest.mark.unit
def test_agree_alone_raises_only_its_own_error():
    distributed.agree()
    with pytest.raises(UserError, match="bad"):
        distributed.agree(UserError("bad"))
    assert distributed.main_first(lambda x: x + 1, 1) == 2 and distributed.on_main(lambda: 3) == 3


@pytest.mark.unit
def test_summary_states_the_world_size():
    summary = Summary(1.0, 1.0, None, None, None, 1, 1.0, 10, 5, 1.0, [], 8, 100, 1.0, "cpu", 1.0, 1.0)
    assert summary.to_json()["world_size"] == 1 and "global_batch" not in summary.to_json()
    summary.global_batch = 16
    assert Summary.from_json(summary.to_json()).global_batch == 16


@pytest.mark.e2e
def test_a_run_alone_states_world_size_one(tiny_run):
    run_dir, _, proc = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["global_batch"]) == (1, 8)  # micro batch 8 x grad_accum 1 x 1 process
    assert "processes:" not in proc.stdout  # the launcher line only under a launcher


# ---------------------------------------------------------------- launcher variables that do not describe a launch

HALF_LAUNCHED = {  # the variables as set, and the error line (the variable, and how to fix it)
    "rank-without-world-size": ({"RANK": "1"}, "RANK=1 is set without WORLD_SIZE: this process would be process 1"),
    "world-size-a-word": ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two': the launcher's WORLD_SIZE must be a whole number"),
    "rank-a-word": (
        {"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
        "RANK='x': the launcher's RANK must be a whole number",
    ),
    "rank-outside-the-world": (
        {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
        "RANK=2 but WORLD_SIZE=2: ranks run from 0 to 1",
    ),
    "no-master-addr": (
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"},
        "WORLD_SIZE=2 but MASTER_ADDR is not set: a launch needs RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT",
    ),
    "local-rank-alone": (  # found by the fuzzer: the process group started from env:// and wanted RANK (exit 1)
        {"LOCAL_RANK": "0"},
        "LOCAL_RANK=0 but RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set",
    ),
    "port-a-word": (
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "http"},
        "MASTER_PORT='http': the port the processes meet at must be a number from 1 to 65535",
    ),
    "local-rank-above-rank": ({"LOCAL_RANK": "1"}, "LOCAL_RANK=1 but RANK=0"),
}


@pytest.mark.unit
@pytest.mark.parametrize("command", ["train", "validate"])
@pytest.mark.parametrize("case", list(HALF_LAUNCHED))
def test_launcher_variables_read_half_way_are_refused_before_anything_is_written(
    case, command, tiny_llama, work, monkeypatch, capsys
):
    """RANK=1 without a launcher trained and exited 0 leaving a stray checkpoint (rank 1 writes nothing else);
    WORLD_SIZE=two was a traceback; a missing MASTER_ADDR an exit 1 when the process group started. Each is one
    line naming the variable, exit 2, from this process (it cannot know whether it is the one that speaks)."""
    variables, expected = HALF_LAUNCHED[case]
    for name in distributed.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LORA_SFT_CACHE", str(work.parent / "cache"))
    path = _write(work, _recipe(tiny_llama, work))
    before = _tree(work.parent)
    assert main([command, str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(f"error: {expected}"), err
    assert "torchrun --nproc_per_node" in err and "Traceback" not in out + err
    assert _tree(work.parent) == before


@pytest.mark.unit
def test_a_launch_and_no_launch_are_both_accepted(monkeypatch):
    for name in distributed.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.launcher_problems() == [] and distributed.world() == distributed.ALONE
    monkeypatch.setenv("RANK", "0")  # a shell's RANK=0: process 0 of one, as without it
    assert distributed.launcher_problems() == [] and not distributed.world().launched
    # torchrun --nproc_per_node 1 sets all five (Trainer starts a process group of one from them)
    for name, value in {
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(name, value)
    assert distributed.launcher_problems() == [] and distributed.world() == distributed.World(0, 0, 1, launched=True)
    _launcher(monkeypatch, rank=1, size=4)
    assert distributed.launcher_problems() == [] and distributed.world() == distributed.World(1, 1, 4, launched=True)


@pytest.mark.unit
def test_validate_nproc_refuses_what_train_under_a_launcher_refuses(tiny_llama, work, monkeypatch, capsys):
    """validate --nproc 2 planned the global batch but checked the recipe as for one process: streaming (one
    process only) and FSDP on CPUs passed validate and were refused by train under torchrun."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    streaming = _recipe(tiny_llama, work)
    streaming["data"]["streaming"] = True
    fsdp = _recipe(tiny_llama, work)
    fsdp["train"]["distributed"] = "fsdp"
    for recipe, expected in (
        (streaming, "data.streaming: streaming trains in one process"),
        (fsdp, "train.distributed: FSDP needs GPUs (train.distributed: fsdp)"),
    ):
        path = str(_write(work, recipe))
        assert main(["validate", path]) == 0  # one process: fine
        capsys.readouterr()
        assert main(["validate", path, "--nproc", "2"]) == 2
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and expected in err, err
        _launcher(monkeypatch)  # what train under torchrun --nproc_per_node 2 says, validate says
        assert main(["validate", path]) == 2
        assert expected in capsys.readouterr().err
        for name in distributed.VARIABLES:
            monkeypatch.delenv(name)
