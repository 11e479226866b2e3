"""The run's settings, resolved once (lora_sft.settings): the machine a run is planned for (this one, or one named
with `validate --target`), the rules that depend on it living in one place, and `validate --target` planning a GPU
recipe on a machine without a GPU."""

from __future__ import annotations

import ast
import dataclasses

import pytest
import torch
from helpers import REPO, planning_recipe

from lora_sft.cli.main import main
from lora_sft.errors import UserError
from lora_sft.settings import GPU_USABLE, MAC_USABLE, Machine, compute_dtype, resolve

pytestmark = pytest.mark.unit
GIB = 2**30


def test_a_named_machine_is_its_kind_its_dtype_and_what_it_leaves_a_run():
    gpu = Machine.target("cuda:24GiB")
    assert (gpu.kind, gpu.native_bf16(), gpu.total, gpu.memory) == ("cuda", True, 24 * GIB, int(24 * GIB * GPU_USABLE))
    mac = Machine.target("mps:16GiB")  # lora_sft trains on a Mac's CPU cores, in fp32
    assert (mac.kind, mac.native_bf16(), mac.total, mac.memory) == ("cpu", False, 16 * GIB, int(16 * GIB * MAC_USABLE))
    assert Machine.target("cpu").total is None  # this machine's CPU memory, read when planning
    assert Machine.target("cpu:32GiB").memory == 32 * GIB
    for bad in ("tpu", "cuda", "cuda:lots", "mps", "cuda:24 parsecs"):
        with pytest.raises(UserError):
            Machine.target(bad)


def test_the_compute_dtype_follows_the_machine():
    recipe = planning_recipe("meta-llama/Llama-3.1-8B")
    auto = recipe.quant.model_copy(update={"compute_dtype": "auto"})
    assert compute_dtype(auto, Machine.target("cuda:8GiB")) == torch.bfloat16
    assert compute_dtype(auto, Machine.target("mps:16GiB")) == torch.float32
    assert compute_dtype(auto, Machine.target("cpu")) == torch.float32
    fp16 = recipe.quant.model_copy(update={"compute_dtype": "fp16"})
    assert compute_dtype(fp16, Machine.target("cpu")) == torch.float16  # as written: the preflight refuses it on a CPU


def test_settings_are_frozen_and_the_memory_plan_gives_new_ones_keeping_the_users_recipe():
    recipe = planning_recipe("meta-llama/Llama-3.1-8B", gradient_checkpointing="auto", micro_batch_size=4, grad_accum=4)
    settings = resolve(recipe, Machine.target("cuda:24GiB"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.dtype = torch.float16  # type: ignore[misc]
    planned = settings.with_memory(2, 8, True)
    assert (planned.train.micro_batch_size, planned.train.grad_accum, planned.train.gradient_checkpointing) == (
        2,
        8,
        True,
    )
    assert settings.train.micro_batch_size == 4 and planned.as_written().train == recipe.train
    assert planned.saved_dict()["train"]["gradient_checkpointing"] == "auto"  # recipe.yaml keeps what the user wrote


def test_each_machine_rule_is_defined_once():
    """The rules that depend on the machine or the launcher are functions of lora_sft.settings alone."""
    rules = {"compute_dtype", "uses_fsdp", "groups_by_length", "fsdp_shards", "device_map"}
    defined: dict[str, list[str]] = {}
    for path in (REPO / "lora_sft").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in rules:
                defined.setdefault(node.name, []).append(str(path.relative_to(REPO)))
    assert defined == {
        "compute_dtype": ["lora_sft/settings.py"],
        "uses_fsdp": ["lora_sft/settings.py"],
        "groups_by_length": ["lora_sft/settings.py"],
        "device_map": ["lora_sft/settings.py"],
    }


def test_validate_plans_a_gpu_recipe_on_a_machine_without_one(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = "recipes/library/llama-3.1-8b-24gb.yaml"
    assert main(["validate", recipe]) == 0
    here = capsys.readouterr().out
    assert "memory estimate on the CPU" in here and "x 4 bytes" in here  # fp32 on this machine's CPU
    assert main(["validate", recipe, "--target", "cuda:24GiB"]) == 0
    gpu = capsys.readouterr().out
    assert "memory estimate on the GPU: 17.38 GiB at micro batch 8" in gpu
    assert "unquantized weights: 1.96 GiB (1,050,939,392 params" in gpu and "x 2 bytes)" in gpu  # bf16
    assert "runtime: " in gpu and "CUDA context 512.0 MiB + caching-allocator slack 10%" in gpu  # its allocator
    assert "verdict: fits in GPU of --target cuda:24GiB: 21.60 GiB available of 24.00 GiB" in gpu
    assert main(["validate", recipe, "--target", "cuda:8GiB"]) == 0
    assert (
        "verdict: does NOT fit (the run may run out of memory) in GPU of --target cuda:8GiB" in capsys.readouterr().out
    )


def test_an_unknown_target_is_one_line_and_exit_2(capsys):
    assert main(["validate", "recipes/quickstart.yaml", "--target", "tpu:8GiB"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "error: python -m lora_sft validate: argument --target: 'tpu:8GiB' is not a machine lora_sft can plan for; use one of cuda:24GiB, cuda:8GiB, mps:16GiB, cpu or cpu:32GiB (see python -m lora_sft validate --help)"
    ]
