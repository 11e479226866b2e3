"""Several processes under a launcher (CPU, gloo, 2 processes, tiny Llama, real Trainer and DDP).

- 2 processes at micro batch b (`accelerate launch`) train what one process trains at micro batch 2b: the same
  samples per step (the sampler's order does not depend on the number of processes, length groups included),
  per-step losses within 1e-4, the adapter within 1e-5, the token totals equal (summed over the ranks); one run
  directory, one writer.
- A 2-process run (torchrun) killed with SIGKILL (the launcher and every rank) and resumed with the same launcher
  logs the same per-step losses and writes the same adapter as an unbroken 2-process run, bitwise: each rank
  restores its own RNG state (dropout is on, and differs per rank); a resume with another number of processes
  is refused.
- Every rank builds the same initial adapter; each rank's dropout draws from a stream of its own; the chunked
  loss through DDP's forward gives the plain path's loss and synchronized gradients.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, adapter, losses

from lora_sft.cli.main import main
from lora_sft.run.checkpoint import COUNTS, checkpoints, step_of
from lora_sft.settings import resolve

ROWS = (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def accelerate_launch() -> list[str]:
    """`accelerate launch` on 2 processes: --multi_gpu is accelerate's torchrun path, and works without a GPU (lora_sft
    then tells the Trainer to use the CPU and gloo); its --cpu flag would start one process (multi-CPU goes
    through MPI)."""
    with socket.socket() as free:  # a port nothing listens on, for the processes to meet at
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    return command + [
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        port,
    ]


TIMEOUT = 240  # seconds a launched run may take on a busy machine before the test gives up


def write_recipe(folder: Path, tiny_llama: Path, rows: int, dropout: float = 0.0, eval_rows: int = 0, **train) -> Path:
    folder.mkdir(parents=True)
    data = folder / "train.jsonl"
    data.write_text("\n".join(ROWS[:rows]) + "\n")
    evals = {}
    if eval_rows:  # rows after the training rows
        (folder / "eval.jsonl").write_text("\n".join(ROWS[rows : rows + eval_rows]) + "\n")
        evals = {"eval": str(folder / "eval.jsonl")}
    recipe = {
        "task": "causal_lm",
        "output_dir": str(folder / "run"),
        "seed": 7,
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 4, "alpha": 8, "dropout": dropout},
        "data": {"format": "alpaca", "train": str(data), "max_length": 64, **evals},  # group_by_length: on (default)
        "train": {
            "lr": 1e-2,
            "warmup": 1,
            "logging_steps": 1,
            "save_total_limit": 2,
            "gradient_checkpointing": False,
            **train,
        },
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def env() -> dict[str, str]:
    # the launched processes import lora_sft from this checkout; one thread each on the 2 cores
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
    }


def launch(command: list[str], log: Path, first_path: Path | None = None) -> subprocess.Popen:
    """A launcher, its output in `log` (a pipe nobody reads while the test waits could fill and stop it);
    `first_path`: a folder put before the checkout on the processes' PYTHONPATH."""
    environment = env()
    if first_path is not None:
        environment["PYTHONPATH"] = os.pathsep.join([str(first_path), environment["PYTHONPATH"]])
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO, env=environment, stdout=out, stderr=subprocess.STDOUT)


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process it started (torchrun starts each rank in a session of its own, so
    killing the launcher or its process group would leave the ranks running)."""
    import psutil

    try:
        family = [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    psutil.wait_procs(family, timeout=30)
    proc.wait()


def finish(proc: subprocess.Popen, log: Path) -> tuple[int, str]:
    try:
        proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_all(proc)
        pytest.fail(f"the launched run took over {TIMEOUT} s: {log.read_text()[-3000:]}")
    return proc.returncode, log.read_text()


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.launch
def test_two_processes_train_what_one_process_trains_at_twice_the_micro_batch(tiny_llama, tmp_path):
    """16 rows, 8 per optimizer step (2 processes x micro batch 2 x grad_accum 2, or 1 x 4 x 2): 4 steps cross an
    epoch boundary (a new length-grouped order). Dropout 0: each rank's dropout stream is its own. Launched with
    `accelerate launch` (the resume test below uses torchrun)."""
    steps = 4
    # 8 eval rows: each process scores 2 batches of 2, the one process 2 of 4 (none repeated to even out the shares)
    two = write_recipe(tmp_path / "two", tiny_llama, 16, eval_rows=8, micro_batch_size=2, grad_accum=2, max_steps=steps)
    one = write_recipe(tmp_path / "one", tiny_llama, 16, eval_rows=8, micro_batch_size=4, grad_accum=2, max_steps=steps)
    proc = launch([*accelerate_launch(), "-m", "lora_sft", "train", str(two)], tmp_path / "two.log")
    assert main(["train", str(one)]) == 0  # the reference, meanwhile, in this process
    code, err = finish(proc, tmp_path / "two.log")
    assert code == 0, err[-3000:]

    run, reference = tmp_path / "two" / "run", tmp_path / "one" / "run"
    got, want = losses(run), losses(reference)
    assert [s for s, _ in got] == [s for s, _ in want] == list(range(1, steps + 1))  # one record per step: one writer
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, want, strict=True)), (got, want)
    assert want[-1][1] < want[0][1]  # and it learns
    ref, new = adapter(reference), adapter(run)
    assert ref.keys() == new.keys()
    assert max(float((ref[k] - new[k]).abs().max()) for k in ref) < 1e-5
    # the token totals are the run's, summed over the ranks (each rank counts only its own micro batches)
    totals = [(s["tokens_seen"], s["tokens_trained"], s["steps"]) for s in (summary(run), summary(reference))]
    assert totals[0] == totals[1]
    # one run directory, written once
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["eval.jsonl", "recipe.yaml", "run", "train.jsonl"]
    # the eval loss after training is over the whole eval split, not the main process's share of it
    assert abs(summary(run)["eval_loss"] - summary(reference)["eval_loss"]) < 1e-4, (summary(run), summary(reference))
    # and before training (train.eval_before, on by default): under a launcher Trainer runs it inside train(), after
    # wrapping the model for DDP (evaluated first, the model trained without gradient sync: step 3 differed)
    assert abs(summary(run)["eval_before"]["loss"] - summary(reference)["eval_before"]["loss"]) < 1e-4
    assert [p.relative_to(run) for p in run.rglob("metrics.jsonl")] == [Path("metrics.jsonl")]
    assert (summary(run)["world_size"], summary(reference)["world_size"]) == (2, 1)
    assert (summary(run)["global_batch"], summary(reference)["global_batch"]) == (8, 8)
    marker = json.loads((checkpoints(run / "checkpoints")[-1] / COUNTS).read_text())  # the last step's checkpoint
    assert (marker["recipe"]["processes"], marker["tokens_seen"]) == (2, summary(run)["tokens_seen"])


# rank 1's device has less free memory than rank 0's: its plan picks micro batch 1 where rank 0's picks 8
SMALLER_DEVICE = """
import dataclasses, os
if os.environ.get("RANK") == "1":
    from lora_sft.model import fitting, planner

    planned = fitting.plan_memory

    def plan_memory(settings, work, *args, **kwargs):
        plan = planned(settings, work, *args, **kwargs)
        effective = plan.micro_batch_size * plan.grad_accum
        estimate = planner.estimate(settings, work, 1, plan.gradient_checkpointing)
        return dataclasses.replace(plan, micro_batch_size=1, grad_accum=effective, estimate=estimate)

    fitting.plan_memory = plan_memory
"""


@pytest.mark.launch
def test_processes_whose_devices_differ_train_with_the_smallest_memory_pick(tiny_llama, tmp_path):
    """train.memory_budget auto: each process plans against its own device's free memory. When rank 1's plan picks
    micro batch 1 (x grad_accum 8) and rank 0's micro batch 8 (x 1), both train with micro batch 1 and the run is
    the one-process run at micro batch 2 x 8 (had each kept its own pick, the ranks would split the data
    differently)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SMALLER_DEVICE)
    two = write_recipe(
        tmp_path / "two", tiny_llama, 16, micro_batch_size=4, grad_accum=2, max_steps=2, memory_budget="auto"
    )
    one = write_recipe(tmp_path / "one", tiny_llama, 16, micro_batch_size=2, grad_accum=8, max_steps=2)
    log = tmp_path / "two.log"
    proc = launch([*TORCHRUN, "-m", "lora_sft", "train", str(two)], log, first_path=site)
    assert main(["train", str(one)]) == 0
    code, out = finish(proc, log)
    assert code == 0, out[-3000:]
    assert out.count("the processes' devices differ in free memory: every process trains with the smallest pick") == 1
    assert "memory estimate per process (2 processes, each holding the whole model)" in out
    assert (
        "at micro batch 1," in out
        and "processes: 2, global batch 16 (micro batch 1 x 8 accumulated x 2 processes)" in out
    )
    got, want = losses(tmp_path / "two" / "run"), losses(tmp_path / "one" / "run")
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2]
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(got, want, strict=True)), (got, want)
    assert summary(tmp_path / "two" / "run")["global_batch"] == 16


@pytest.mark.unit
def test_each_rank_loads_on_its_own_device_and_the_trainer_is_told_the_cpu_and_gloo(monkeypatch):
    from helpers import planning_recipe

    from lora_sft import distributed

    recipe = planning_recipe("meta-llama/Llama-3.1-8B")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve(recipe).device_map == {"": "cpu"}
    assert distributed.trainer_arguments() == {"ddp_find_unused_parameters": False}  # alone: nothing changes
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve(recipe).device_map == {"": "cpu"}
    # without these every CPU process would train alone on the whole data
    assert distributed.trainer_arguments() == {
        "ddp_find_unused_parameters": False,
        "use_cpu": True,
        "ddp_backend": "gloo",
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve(recipe).device_map == {"": 1}  # its own GPU, never "auto" (spread over every GPU)
    assert distributed.trainer_arguments() == {"ddp_find_unused_parameters": False}  # NCCL, the default


def _kill_at_checkpoint(proc: subprocess.Popen, folder: Path, step: int, log: Path) -> None:
    """SIGKILL the launcher and every rank once a complete checkpoint of `step` or later exists."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its step {step} checkpoint: {log.read_text()[-3000:]}")
        found = checkpoints(folder)
        if found and int(found[-1].name.rsplit("-", 1)[1]) >= step:
            kill_all(proc)
            return
        time.sleep(0.01)
    kill_all(proc)
    pytest.fail(f"no step {step} checkpoint in {TIMEOUT} s")


@pytest.mark.launch
def test_killed_two_process_run_resumes_as_unbroken(tiny_llama, tmp_path, capsys):
    """24 rows, 8 per step: 3 steps per epoch, 5 steps. Dropout on, so each rank's restored RNG state matters;
    gradient checkpointing on (non-reentrant, under DDP)."""
    steps = 5
    options = {"micro_batch_size": 2, "grad_accum": 2, "max_steps": steps, "save_steps": 1}
    options |= {"gradient_checkpointing": True}
    unbroken = write_recipe(tmp_path / "unbroken", tiny_llama, 24, dropout=0.1, **options)
    killed = write_recipe(tmp_path / "killed", tiny_llama, 24, dropout=0.1, **options)
    logs = {name: tmp_path / f"{name}.log" for name in ("unbroken", "killed", "resumed")}
    reference = launch([*TORCHRUN, "-m", "lora_sft", "train", str(unbroken)], logs["unbroken"])
    proc = launch([*TORCHRUN, "-m", "lora_sft", "train", str(killed)], logs["killed"])
    run = tmp_path / "killed" / "run"
    _kill_at_checkpoint(proc, run / "checkpoints", 2, logs["killed"])
    assert not (run / "summary.json").exists()
    last = checkpoints(run / "checkpoints")[-1]
    assert 2 <= step_of(last) < steps  # cut short: the resumed run has steps left to train
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in last.iterdir()}  # each rank's own

    # one process cannot continue what two started (the global batch and the RNG states are two processes')
    before = sorted(str(p) for p in run.rglob("*"))
    assert main(["train", str(killed), "--resume"]) == 2
    assert "was trained by 2 process(es), this run has 1" in capsys.readouterr().err
    assert sorted(str(p) for p in run.rglob("*")) == before

    resumed = launch([*TORCHRUN, "-m", "lora_sft", "train", str(killed), "--resume"], logs["resumed"])
    for launched, log in ((reference, logs["unbroken"]), (resumed, logs["resumed"])):
        code, err = finish(launched, log)
        assert code == 0, err[-3000:]
    done = tmp_path / "unbroken" / "run"
    assert losses(run) == losses(done) and [s for s, _ in losses(run)] == list(range(1, steps + 1))
    ref, got = adapter(done), adapter(run)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    totals = [(s["tokens_seen"], s["tokens_trained"], s["steps"]) for s in (summary(done), summary(run))]
    assert totals[0] == totals[1]


SETUP = """
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import PartialState
from torch.nn.parallel import DistributedDataParallel

from lora_sft import data as data_stage
from lora_sft.model import loss as loss_stage
from lora_sft.run.trainer import RankSeeds
from lora_sft.preflight import prepare
from lora_sft.recipe.load import load_recipe
from lora_sft.train import setup_model
from lora_sft.settings import resolve

state = PartialState(cpu=True, backend="gloo")
recipe = load_recipe(sys.argv[1], [])
with state.main_process_first():  # the first tokenizes and caches, the other reads the cache
    ready = prepare(recipe).ready()
model = setup_model(resolve(recipe), ready, log=lambda *_: None)
lora = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}

# the chunked loss through DDP's forward: the loss and the synchronized gradients of the plain path
ddp = DistributedDataParallel(model, find_unused_parameters=False)
rows = list(ready.bundle.train.select(range(2 * state.process_index, 2 * state.process_index + 2)))
batch = dict(data_stage.collator(recipe, ready.tokenizer)(rows))
batch.pop("num_real_tokens", None)
results = {"reason": loss_stage.plain_path_reason(ddp)}
for path in ("plain", "chunked"):
    loss = ddp(**batch).loss if path == "plain" else loss_stage.causal_lm_loss(ddp, batch)
    loss.backward()
    results[path] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    model.zero_grad(set_to_none=True)

args = SimpleNamespace(world_size=state.num_processes, process_index=state.process_index, seed=recipe.seed)
RankSeeds().on_train_begin(args, None, None)
results |= {"lora": lora, "dropout_draw": torch.rand(8)}
torch.save(results, Path(sys.argv[2]) / f"rank{state.process_index}.pt")
"""


@pytest.mark.launch
def test_every_rank_builds_the_same_adapter_draws_its_own_dropout_and_the_chunked_loss_syncs(tiny_llama, tmp_path):
    """The initial adapter is equal on every rank before DDP would broadcast rank 0's (the same seed before it is
    built); once training starts each rank's RNG is its own (dropout masks). Through DDP's forward the chunked
    loss gives the plain path's loss on each rank and the same gradients, averaged over the ranks."""
    recipe = write_recipe(tmp_path / "setup", tiny_llama, 8, max_steps=1)
    script = tmp_path / "setup.py"
    script.write_text(SETUP)
    log = tmp_path / "setup.log"
    code, err = finish(launch([*TORCHRUN, str(script), str(recipe), str(tmp_path)], log), log)
    assert code == 0, err[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    first, second = (r["lora"] for r in ranks)
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(bool(v.abs().sum()) for k, v in first.items() if "lora_A" in k)  # a real, random init
    assert not torch.equal(ranks[0]["dropout_draw"], ranks[1]["dropout_draw"])
    for rank in ranks:
        assert rank["reason"] is None
        (plain, plain_grads), (chunked, chunked_grads) = rank["plain"], rank["chunked"]
        assert chunked.item() == pytest.approx(plain.item(), rel=1e-5)
        assert plain_grads.keys() == chunked_grads.keys() and plain_grads
        for name in plain_grads:
            torch.testing.assert_close(chunked_grads[name], plain_grads[name], rtol=1e-4, atol=1e-6)
    assert ranks[0]["plain"][0].item() != ranks[1]["plain"][0].item()  # two batches: the ranks computed apart
    for name in ranks[0]["chunked"][1]:  # and DDP averaged their gradients: equal on both
        assert torch.equal(ranks[0]["chunked"][1][name], ranks[1]["chunked"][1][name])


@pytest.mark.gpu
def test_ranks_on_their_own_gpus_train_what_one_process_trains(tiny_llama, tmp_path):
    """On CUDA (`benchmarks/gpu_check.sh`): one rank per GPU (2 where there are 2; one GPU: torchrun's single rank
    still runs DDP, over NCCL, and the chunked loss through its forward), each loading the 4-bit base on its own
    GPU, trains what one process trains at micro batch ranks x 2. fp32 compute keeps the comparison tight."""
    ranks = min(2, torch.cuda.device_count())
    fp32 = {"quant": {"compute_dtype": "fp32"}}
    recipes = []
    for name, micro in (("ranks", 2), ("one", 2 * ranks)):
        path = write_recipe(tmp_path / name, tiny_llama, 16, micro_batch_size=micro, grad_accum=2, max_steps=3)
        path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | fp32))
        recipes.append(path)
    log = tmp_path / "ranks.log"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    code, err = finish(launch([*torchrun, "-m", "lora_sft", "train", str(recipes[0])], log), log)
    assert code == 0, err[-3000:]
    assert main(["train", str(recipes[1])]) == 0
    got, want = losses(tmp_path / "ranks" / "run"), losses(tmp_path / "one" / "run")
    assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3]
    assert all(abs(a - b) < 1e-3 for (_, a), (_, b) in zip(got, want, strict=True)), (got, want)
    marker = json.loads((checkpoints(tmp_path / "ranks" / "run" / "checkpoints")[-1] / COUNTS).read_text())
    assert marker["recipe"].get("processes", 1) == ranks
