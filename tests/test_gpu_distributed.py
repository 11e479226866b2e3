"""Several processes on CUDA GPUs (skipped without CUDA, tests/conftest.py; `benchmarks/gpu_check.sh` runs them with
`pytest -m gpu`). Each launches `torchrun -m lora_sft train` as a user would and takes well under a minute on one
H200-class GPU (a tiny Llama, bf16, 10 steps).

- FSDP-QLoRA on 2 GPUs (skipped with fewer): the run trains (loss finite, non-zero and falling), and adapter/
  holds exactly the LoRA tensors, whole (not one rank's shard), which plain peft loads;
- train.distributed fsdp in one process under torchrun (the single-GPU part: FSDP machinery with one shard): the
  same, and its losses follow the plain run's (bf16: close, not equal);
- DDP on the GPUs there are (one or two processes): the same, against one process with the same effective batch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO

pytestmark = pytest.mark.gpu


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def write(tiny_llama, tmp_path, write_recipe, name: str, micro: int, **train) -> tuple:
    rows = "".join(
        json.dumps({"instruction": f"Count to {i}.", "output": " ".join(map(str, range(i)))}) + "\n"
        for i in range(1, 33)
    )
    (tmp_path / "train.jsonl").write_text(rows)
    recipe = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": str(tmp_path / name),
            "model": {"path": str(tiny_llama)},
            "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            # the plain shuffle: N processes at micro batch b take the rows one process at N x b takes, in order
            "data": {
                "format": "alpaca",
                "train": str(tmp_path / "train.jsonl"),
                "max_length": 64,
                "group_by_length": False,
            },
            "train": {
                "lr": 3e-2,
                "max_steps": 10,
                "micro_batch_size": micro,
                "warmup": 0,
                "scheduler": "constant",
                "logging_steps": 1,
                "save_steps": 10,
                "eval_before": False,
                **train,
            },
        },
        name=f"{name}.yaml",
    )
    return recipe, tmp_path / name


def launch(recipe, processes: int | None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N -m lora_sft train RECIPE`, or one process without a launcher."""
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes
        else [sys.executable]
    )
    proc = subprocess.run(
        [*launcher, "-m", "lora_sft", "train", str(recipe)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = [r["loss"] for r in records if "loss" in r and "eval_loss" not in r]
    assert len(out) == 10 and all(math.isfinite(x) and x > 0 for x in out), out
    assert sum(out[-3:]) / 3 < 0.8 * sum(out[:3]) / 3, out  # it learns
    return out


def follows(losses: list[float], reference: list[float]) -> None:
    """The same model on the same rows: the first step's loss equal but for bf16 rounding, the end close."""
    assert losses[0] == pytest.approx(reference[0], rel=1e-2), (losses, reference)
    assert sum(losses[-3:]) == pytest.approx(sum(reference[-3:]), rel=0.1), (losses, reference)


def check_adapter(run, tiny_llama, rank: int = 8) -> None:
    """adapter/ holds A and B of the 7 linear layers of both layers, whole, trained (B moved from zero), and plain
    peft loads them onto the base unchanged."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(weights) == 2 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in weights), sorted(weights)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    modules = dict(base.named_modules())
    for key, tensor in weights.items():
        module = modules[key.removeprefix("base_model.model.").split(".lora_")[0]]
        shape = (rank, module.in_features) if ".lora_A." in key else (module.out_features, rank)
        assert tuple(tensor.shape) == shape, (key, tuple(tensor.shape))  # whole, not a shard
    assert all(weights[k].abs().sum() > 0 for k in weights if ".lora_B." in k)
    loaded = PeftModel.from_pretrained(base, str(run / "adapter"))
    state = loaded.state_dict()
    assert all(torch.equal(state[k.replace(".weight", ".default.weight")], weights[k]) for k in weights)


@pytest.mark.skipif(gpus() < 2, reason="FSDP across processes needs 2 GPUs")
def test_fsdp_qlora_on_two_gpus_trains_and_saves_a_whole_adapter(tiny_llama, tmp_path, write_recipe):
    recipe, run = write(tiny_llama, tmp_path, write_recipe, "fsdp", micro=4, distributed="fsdp")
    proc = launch(recipe, 2)
    assert "error:" not in proc.stderr
    fsdp = losses(run)
    check_adapter(run, tiny_llama)
    # the same batches in one process (micro batch 8 = 2 x 4): close, bf16 and a different reduction order
    reference, plain = write(tiny_llama, tmp_path, write_recipe, "plain", micro=8)
    launch(reference, None)
    follows(fsdp, losses(plain))


def test_fsdp_in_one_process_under_torchrun_saves_a_loadable_adapter(tiny_llama, tmp_path, write_recipe):
    recipe, run = write(tiny_llama, tmp_path, write_recipe, "fsdp1", micro=4, distributed="fsdp")
    launch(recipe, 1)
    sharded = losses(run)
    check_adapter(run, tiny_llama)
    reference, plain = write(tiny_llama, tmp_path, write_recipe, "plain", micro=4)
    launch(reference, None)
    follows(sharded, losses(plain))


def test_ddp_on_the_gpus_there_are(tiny_llama, tmp_path, write_recipe):
    processes = min(gpus(), 2)
    recipe, run = write(tiny_llama, tmp_path, write_recipe, "ddp", micro=4, distributed="ddp")
    launch(recipe, processes)
    ddp = losses(run)
    check_adapter(run, tiny_llama)
    reference, plain = write(tiny_llama, tmp_path, write_recipe, "plain", micro=4 * processes)
    launch(reference, None)
    follows(ddp, losses(plain))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 10
