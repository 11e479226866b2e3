"""FSDP-QLoRA (train.distributed: fsdp, or an accelerate FSDP config): the settings lora_sft gives the Trainer and
bitsandbytes, checked without GPUs.

- the 4-bit weights are stored in the compute dtype (bnb_4bit_quant_storage), whichever way FSDP was asked for,
  and every frozen tensor is in that dtype while every trainable one is fp32: what FSDP2's mixed precision needs
  to gather the packed bits unchanged;
- the Trainer's FSDP arguments (FSDP2, each decoder layer its own shard group, full shard, rank-0 loading, whole
  adapter checkpoints), and recipes/accelerate/fsdp_qlora.yaml giving accelerate exactly the same plugin;
- the contradictions (DDP recipe under an FSDP config, a CPU, FSDP1, a mixed precision that is not the compute
  dtype); the bad-input corpus has the recipe-only ones (fsdp-*.yaml);
- the planner's FSDP arithmetic by hand for Llama-3-70B on 2 GPUs, and the accelerate configs quoting it;
- one process without a launcher: nothing to shard, the same losses as without fsdp (the storage dtype changes
  how the 4 bits are packed, not their values) and an adapter plain peft loads;
- two CPU processes (gloo) sharded by accelerate's own FSDP2 code with the plugin these settings give: the
  losses of one unsharded process, and adapter/ gathered whole.

accelerate runs FSDP on CUDA devices only (on CPU processes the Trainer silently runs DDP), so the Trainer's FSDP
across processes is tested on GPUs: tests/test_gpu_distributed.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import yaml
from helpers import REPO, planning_recipe

from lora_sft import distributed, preflight
from lora_sft import model as model_stage
from lora_sft import train as train_stage
from lora_sft.model import planner, shapes
from lora_sft.model.loss import plain_path_reason
from lora_sft.recipe.load import load_recipe
from lora_sft.recipe.schema import Recipe
from lora_sft.settings import Machine, compute_dtype, resolve, uses_fsdp

ACCELERATE = REPO / "recipes" / "accelerate"
LAUNCHER = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
FSDP_ENV = ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_MIXED_PRECISION", "FSDP_CPU_RAM_EFFICIENT_LOADING")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch):
    """Each test starts as one process without a launcher; the variables a test sets are undone after it."""
    for name in (*LAUNCHER, *FSDP_ENV):
        monkeypatch.delenv(name, raising=False)


def tiny_recipe(tiny_llama, tmp_path, write_recipe, **sections) -> Recipe:
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            f'{{"instruction": "Count to {i}.", "output": "{" ".join(map(str, range(i)))}"}}\n' for i in range(1, 17)
        )
    )
    train = {
        "lr": 3e-2,
        "max_steps": 6,
        "micro_batch_size": 4,
        "warmup": 0,
        "scheduler": "constant",
        "logging_steps": 1,
        "save_steps": 6,
        **sections.pop("train", {}),
    }
    return load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / sections.pop("run", "run")),
                "model": {"path": str(tiny_llama)},
                "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
                "data": {"format": "alpaca", "train": str(data), "max_length": 64},
                "train": train,
                **sections,
            }
        )
    )


def llama_recipe(**train) -> Recipe:
    return planning_recipe("meta-llama/Meta-Llama-3-70B", **train)


# Llama-3-70B: hidden 8192, intermediate 28672, 80 layers, 64 heads, 8 kv heads (head_dim 128), vocab 128256, untied
LLAMA_70B = shapes.ModelShape(
    hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, head_dim=128, vocab=128256, tied=False
)


def accelerate_env(config: str) -> dict[str, str]:
    """The variables `accelerate launch --config_file recipes/accelerate/CONFIG -m lora_sft train R` gives each
    process, from accelerate's own launcher code (nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ACCELERATE / config), "-m", "lora_sft", "train", "recipe.yaml"]
    )
    args, *_ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_", "FSDP_"))}


# ---------------------------------------------------------------- the 4-bit storage and the dtypes


@pytest.mark.unit
@pytest.mark.parametrize(
    ("compute", "storage"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_fsdp_stores_the_4bit_weights_in_the_compute_dtype(compute, storage):
    quant = llama_recipe().quant.model_copy(update={"compute_dtype": compute})
    assert (
        model_stage.quantization_config(
            quant, [], compute_dtype(quant, Machine.here()), fsdp=True
        ).bnb_4bit_quant_storage
        == storage
    )
    assert (
        model_stage.quantization_config(quant, [], compute_dtype(quant, Machine.here())).bnb_4bit_quant_storage
        == torch.uint8
    )  # bitsandbytes' default


@pytest.mark.unit
def test_an_accelerate_fsdp_config_counts_as_fsdp_for_auto_only(monkeypatch):
    auto, ddp, fsdp = (llama_recipe(distributed=d) for d in ("auto", "ddp", "fsdp"))
    assert [uses_fsdp(r) for r in (auto, ddp, fsdp)] == [False, False, True]
    for name, value in accelerate_env("fsdp_qlora.yaml").items():
        monkeypatch.setenv(name, value)
    assert [uses_fsdp(r) for r in (auto, ddp, fsdp)] == [True, False, True]


@pytest.mark.unit
def test_under_fsdp_frozen_tensors_are_in_the_compute_dtype_and_trainable_ones_fp32(
    tiny_llama, tmp_path, write_recipe, monkeypatch
):
    """FSDP2 gathers each layer in its mixed-precision dtype (the compute dtype): the packed 4-bit weights and every
    other frozen tensor must already be in it (a cast would change the packed bits), and the tensors that train
    must share one dtype (fp32, cast to bf16 for the matmuls)."""
    import bitsandbytes as bnb

    recipe = tiny_recipe(
        tiny_llama, tmp_path, write_recipe, quant={"compute_dtype": "bf16"}, train={"distributed": "fsdp"}
    )
    monkeypatch.setattr(preflight, "check_hardware", lambda recipe: None)  # bf16 training needs a GPU, by rule
    ready = preflight.prepare(recipe).ready()
    model = model_stage.add_lora(model_stage.load_base(resolve(recipe), ready.plan), recipe, ready.plan)
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 7 * 2
    assert all(m.weight.dtype == torch.bfloat16 and m.weight.quant_storage == torch.bfloat16 for m in quantized)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}


# ---------------------------------------------------------------- the Trainer's arguments and the accelerate config


@pytest.mark.unit
def test_fsdp_arguments_under_a_launcher(monkeypatch, tmp_path):
    from transformers import TrainingArguments

    recipe = llama_recipe(distributed="fsdp")
    assert distributed.fsdp_arguments(resolve(recipe).fsdp) == {}  # one process, no launcher: nothing to shard
    for name, value in LAUNCHER.items():
        monkeypatch.setenv(name, value)
    assert distributed.fsdp_arguments(resolve(llama_recipe(distributed="ddp")).fsdp) == {}
    assert distributed.fsdp_arguments(resolve(llama_recipe(distributed="auto")).fsdp) == {}
    arguments = distributed.fsdp_arguments(resolve(recipe).fsdp)
    assert arguments == {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "cpu_ram_efficient_loading": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }
    assert resolve(recipe).shards == 2
    # what the Trainer hands accelerate's FSDP plugin (built without the launcher's variables: no process group)
    for name in LAUNCHER:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")  # TrainingArguments sets it; undone after the test
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", **arguments)
    assert args.fsdp_plugin_args == {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": True,
        "state_dict_type": "FULL_STATE_DICT",
        "reshard_after_forward": True,
    }


@pytest.mark.unit
def test_under_an_accelerate_fsdp_config_the_config_configures_accelerate(monkeypatch):
    for name, value in {**LAUNCHER, **accelerate_env("fsdp_qlora.yaml")}.items():
        monkeypatch.setenv(name, value)
    assert (
        distributed.fsdp_arguments(resolve(llama_recipe(distributed="fsdp")).fsdp) == {}
    )  # accelerate reads its variables
    assert resolve(llama_recipe()).shards == 2


def plugin_settings(plugin) -> dict:
    return {
        "version": plugin.fsdp_version,
        "wrap": getattr(plugin.auto_wrap_policy, "__name__", plugin.auto_wrap_policy),
        "layers": plugin.transformer_cls_names_to_wrap,
        "reshard_after_forward": plugin.reshard_after_forward,
        "cpu_ram_efficient_loading": plugin.cpu_ram_efficient_loading,
        "state_dict_type": str(plugin.state_dict_type),
        "cpu_offload": plugin.cpu_offload,
        "activation_checkpointing": plugin.activation_checkpointing,
        "mixed_precision": plugin.mixed_precision_policy,
    }


@pytest.mark.unit
def test_the_accelerate_fsdp_config_gives_the_plugin_train_distributed_fsdp_gives(monkeypatch, tmp_path):
    """`accelerate launch --config_file recipes/accelerate/fsdp_qlora.yaml` and `torchrun` with
    train.distributed: fsdp end in the same FSDP plugin, and the config leaves the mixed precision to the recipe."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    env = accelerate_env("fsdp_qlora.yaml")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "no"
    for name in LAUNCHER:
        monkeypatch.setenv(name, LAUNCHER[name])
    arguments = distributed.fsdp_arguments(resolve(llama_recipe(distributed="fsdp")).fsdp)
    for name in LAUNCHER:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    from_recipe = FullyShardedDataParallelPlugin(
        **TrainingArguments(output_dir=str(tmp_path), report_to="none", **arguments).fsdp_plugin_args
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from_config = FullyShardedDataParallelPlugin()  # what accelerate builds from the launcher's variables
    assert plugin_settings(from_config) == plugin_settings(from_recipe)
    assert plugin_settings(from_recipe)["version"] == 2 and plugin_settings(from_recipe)["wrap"] == (
        "transformer_auto_wrap_policy"
    )


@pytest.mark.unit
def test_fsdp_wraps_each_decoder_layer_of_the_peft_model(tiny_llama, tmp_path, write_recipe):
    """No layer class is named: accelerate takes the model's _no_split_modules (LlamaDecoderLayer), through the
    PeftModel, and gives each decoder layer its own shard group; nothing else is wrapped by the policy."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    recipe = tiny_recipe(tiny_llama, tmp_path, write_recipe, train={"distributed": "fsdp"})
    ready = preflight.prepare(recipe).ready()
    model = model_stage.add_lora(model_stage.load_base(resolve(recipe), ready.plan), recipe, ready.plan)
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="TRANSFORMER_BASED_WRAP", reshard_after_forward=True
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [n for n, m in model.named_modules() if policy(m)]
    assert wrapped == [f"base_model.model.model.layers.{i}" for i in range(2)]
    assert plain_path_reason(model) is None  # not sharded (yet): the chunked loss


@pytest.mark.unit
def test_ddp_yaml_is_plain_data_parallel():
    env = accelerate_env("ddp.yaml")
    assert env["ACCELERATE_MIXED_PRECISION"] == "no" and "ACCELERATE_USE_FSDP" not in env


# ---------------------------------------------------------------- what cannot run under FSDP


@pytest.mark.unit
def test_contradictions_with_the_launcher_are_refused(monkeypatch):
    fsdp, ddp, auto = (llama_recipe(distributed=d) for d in ("fsdp", "ddp", "auto"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preflight.fsdp_problems(resolve(fsdp)) == []  # one process: fine anywhere
    for name, value in LAUNCHER.items():
        monkeypatch.setenv(name, value)
    assert preflight.fsdp_problems(resolve(fsdp)) == [] and preflight.fsdp_problems(resolve(ddp)) == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert preflight.fsdp_problems(resolve(fsdp)) == [
        "train.distributed: FSDP needs GPUs (train.distributed: fsdp): accelerate runs FSDP on CUDA devices only, and CPU processes would each train the whole model (DDP); use train.distributed: ddp here"
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, value in accelerate_env("fsdp_qlora.yaml").items():
        monkeypatch.setenv(name, value)
    assert preflight.fsdp_problems(resolve(auto)) == preflight.fsdp_problems(resolve(fsdp)) == []
    assert preflight.fsdp_problems(resolve(ddp)) == [
        "train.distributed: ddp, but accelerate launch was given an FSDP config (ACCELERATE_USE_FSDP=true); set train.distributed: fsdp (or auto), or launch with recipes/accelerate/ddp.yaml"
    ]
    monkeypatch.setenv("FSDP_VERSION", "1")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert preflight.fsdp_problems(resolve(auto)) == [
        "train.distributed: the accelerate config says fsdp_version 1; lora_sft runs FSDP2 (FSDP1 is deprecated in transformers 5): set fsdp_version: 2, as recipes/accelerate/fsdp_qlora.yaml does",
        "quant.compute_dtype: the accelerate config's mixed_precision fp16 differs from the compute dtype (bf16): FSDP would cast the 4-bit weights, stored in the compute dtype, to fp16; set mixed_precision: 'no' in the accelerate config (lora_sft sets it from quant.compute_dtype)",
    ]


@pytest.mark.unit
def test_int8_and_a_mutating_init_are_refused_under_an_accelerate_fsdp_config(monkeypatch):
    for name, value in accelerate_env("fsdp_qlora.yaml").items():
        monkeypatch.setenv(name, value)
    recipe = llama_recipe().model_copy(
        update={
            "quant": llama_recipe().quant.model_copy(update={"mode": "int8"}),
            "lora": llama_recipe().lora.model_copy(update={"init": "pissa"}),
        }
    )
    assert preflight.fsdp_problems(resolve(recipe)) == [
        "quant.mode: int8 cannot be sharded by FSDP (train.distributed auto under an accelerate FSDP config): its weights are int8 with per-row scales kept outside them; use quant.mode: nf4 (FSDP-QLoRA), or train.distributed: ddp",
        "lora.init: pissa rewrites the base weights, which FSDP shards (train.distributed auto under an accelerate FSDP config); use init: default, or train.distributed: ddp",
    ]


# ---------------------------------------------------------------- the planner's FSDP arithmetic, by hand

# Llama-3-70B, r16 on all 7 linears, nf4 + double quant, bf16, micro batch 1, 2048 tokens, checkpointing on.
# Linear weights per layer: q, o 8192*8192 = 67,108,864 each; k, v 8192*1024 = 8,388,608 each; gate, up, down
# 8192*28672 = 234,881,024 each: 855,638,016 per layer, x 80:
LINEAR_WEIGHTS = 68_451_041_280
# Blocks of 64 per layer: q, o 1,048,576 each; k, v 131,072 each; gate, up, down 3,670,016 each = 13,369,344; x 80:
BLOCKS = 1_069_547_520
# Second-level blocks of 256 blocks per layer: q, o 4,096; k, v 512; gate, up, down 14,336 = 52,224; x 80:
SECOND_BLOCKS = 4_177_920
# Unquantized: embedding + untied lm_head 2 x 128,256 x 8192 = 2,101,346,304, norms (2 x 80 + 1) x 8192 = 1,318,912
UNQUANTIZED = 2_102_665_216
# LoRA r16 per layer: q, o 16*16384 = 262,144 each; k, v 16*9216 = 147,456 each; gate, up, down 16*36864 = 589,824
# each: 2,588,672 per layer, x 80:
LORA = 207_093_760
# Activations per token and layer (bf16): norms 2 x (4*8192 + 2*8192) = 98,304; attention 2*128*(3*64 + 2*8)
# + 4*64 = 53,504; SwiGLU 4 x 28672 x 2 = 229,376; LoRA 7 x 16 x 2 = 224: 381,408; final norm 6 x 8192 = 49,152
PER_TOKEN_LAYER, FINAL_NORM, TOKENS = 381_408, 49_152, 2048
# One layer gathered whole: 855,638,016 / 2 bytes (4-bit) + 13,369,344 + 4 x 52,224 (constants) + 2 norms x 8192
# x 2 + its LoRA 2,588,672 x 2 (bf16) = 427,819,008 + 13,578,240 + 32,768 + 5,177,344
GATHERED_LAYER = 446_607_360


@pytest.mark.unit
def test_fsdp_divides_the_model_not_the_activations_llama_3_70b_on_2_gpus_by_hand():
    recipe = llama_recipe(distributed="fsdp", gradient_checkpointing=True)
    work = planner.workload(on_gpus(recipe, 2), None, LLAMA_70B)
    e = planner.estimate(resolve(recipe), work, micro_batch=1, checkpointing=True)
    expected = {
        "base weights": LINEAR_WEIGHTS // 2 // 2,  # 34,225,520,640 bytes of 4-bit weights, half per GPU
        "quantization constants": (BLOCKS + 4 * SECOND_BLOCKS) // 2,
        "dequantized layer": 234_881_024 * 2,  # gate/up/down in bf16 while it runs: not divided
        "unquantized weights": UNQUANTIZED * 2 // 2,
        "lora weights": LORA * 4 // 2,
        "lora gradients": LORA * 4 // 2,
        "optimizer states": LORA * 8 // 2,
        "activations": TOKENS * (80 * 8192 * 2 + PER_TOKEN_LAYER + FINAL_NORM),  # not divided
        # the model's own forward under FSDP: every position's logits (fp32 x 3 + bf16)
        "loss logits": TOKENS * 128256 * 14,
        "fsdp gathered": 2 * GATHERED_LAYER + 128256 * 8192 * 2,  # two layers + the output layer, bf16
    }
    planned = sum(expected.values())
    expected["runtime"] = 512 * 2**20 + int(0.10 * planned)
    assert {t.name: t.bytes for t in e.terms} == expected
    assert round(e.total / 2**30, 2) == 33.41  # per GPU: does not fit 24 GB
    single = planner.estimate(resolve(recipe), planner.workload(on_gpus(recipe, 0), None, LLAMA_70B), 1, True)
    assert round(single.total / 2**30, 2) == 48.99  # DDP: every GPU holds all of it
    assert "fsdp gathered" not in {t.name for t in single.terms}


def on_gpus(recipe, shards: int):
    """The settings of `recipe` on a 24 GiB GPU, the model divided among `shards` processes (0: not sharded)."""
    return replace(resolve(recipe, Machine.target("cuda:24GiB")), shards=shards)


def header_numbers(config: str) -> dict[str, float]:
    """`NAME: about X GiB per GPU` lines of an accelerate config's header comment."""
    text = (ACCELERATE / config).read_text()
    return {
        m["name"]: float(m["gib"])
        for m in re.finditer(r"#\s+(?P<name>[\w ]+?): about (?P<gib>[\d.]+) GiB per GPU", text)
    }


@pytest.mark.unit
@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp_qlora.yaml"])
def test_the_accelerate_configs_quote_the_planner(config):
    """Each config's header says what one GPU holds for Llama-3-70B, from the planner (so the comment cannot
    drift from the arithmetic)."""
    quoted = header_numbers(config)
    assert quoted, f"{config} quotes no estimate"
    recipe = llama_recipe(distributed="fsdp", gradient_checkpointing=True)
    for name, gib in quoted.items():
        shards = {"DDP": 0, "FSDP 2 GPUs": 2, "FSDP 4 GPUs": 4}[name]
        work = planner.workload(on_gpus(recipe, shards), None, LLAMA_70B)
        assert round(planner.estimate(resolve(recipe), work, 1, True).total / 2**30, 1) == gib, name
    assert yaml.safe_load((ACCELERATE / config).read_text())["num_processes"] == 2


# ---------------------------------------------------------------- one process: nothing to shard


@pytest.mark.e2e
def test_fsdp_in_one_process_trains_as_without_it_and_saves_a_plain_peft_adapter(tiny_llama, tmp_path, write_recipe):
    """Without a launcher train.distributed fsdp shards nothing; the 4-bit weights are stored as fp32 (the CPU's
    compute dtype) instead of uint8, which packs the same bits: the losses equal the plain run's exactly, and the
    adapter holds only LoRA tensors, unsharded, and loads with plain peft."""
    from peft import PeftModel
    from safetensors.torch import load_file

    runs = {}
    for name, mode in (("plain", "auto"), ("fsdp", "fsdp")):
        recipe = tiny_recipe(tiny_llama, tmp_path, write_recipe, run=name, train={"distributed": mode})
        result = train_stage.run(recipe, log=lambda *_: None)
        runs[name] = result
    losses = {k: [h["loss"] for h in r.trainer.state.log_history if "loss" in h] for k, r in runs.items()}
    assert losses["fsdp"] == losses["plain"] and len(losses["plain"]) == 6
    assert losses["plain"][-1] < losses["plain"][0] and all(math.isfinite(x) and x > 0 for x in losses["plain"])
    assert {m.weight.dtype for m in runs["fsdp"].model.modules() if type(m).__name__ == "Linear4bit"} == {torch.float32}

    adapter = runs["fsdp"].run_dir.adapter
    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all(".lora_A." in k or ".lora_B." in k for k in weights)
    assert len(weights) == 2 * 7 * 2  # A and B of 7 linears in 2 layers, none missing, none split
    trained = {n.replace(".default", ""): p for n, p in runs["fsdp"].model.named_parameters() if p.requires_grad}
    assert {k: tuple(v.shape) for k, v in weights.items()} == {k: tuple(v.shape) for k, v in trained.items()}
    assert all(torch.equal(weights[k], trained[k].detach().cpu()) for k in weights)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(adapter))
    assert all(torch.equal(loaded.state_dict()[f"{k[: -len('.weight')]}.default.weight"], weights[k]) for k in weights)


# ---------------------------------------------------------------- two CPU processes, sharded by accelerate's FSDP2


@pytest.mark.launch
def test_fsdp2_on_two_cpu_processes_trains_as_one_process_and_saves_the_adapter_whole(
    tiny_llama, tmp_path, write_recipe
):
    """The Trainer cannot run FSDP on CPUs (accelerate enables it on CUDA only), so tests/fsdp_cpu_worker.py wraps the
    model with accelerate's own FSDP2 code, from the plugin lora_sft's arguments give, on 2 gloo processes, each
    training on half of each batch. The 4-bit weights (stored fp32) are sharded like the rest; the losses equal one
    unsharded process's on the whole batches, the loss takes the model's own forward, and adapter/, gathered by
    `distributed.full_adapter_state`, holds every LoRA tensor whole, equal to the unsharded run's, and loads with
    plain peft."""
    import json
    import os
    import subprocess
    import sys

    import fsdp_cpu_worker
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": str(tmp_path / "unused"),
            "model": {"path": str(tiny_llama)},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
            "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl"), "max_length": 32},
            "train": {"distributed": "fsdp"},
        }
    )
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"),
            str(REPO / "tests" / "fsdp_cpu_worker.py"),
            *(str(recipe), str(tmp_path / "sharded"), "sharded"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads((tmp_path / "sharded" / "result.json").read_text())
    plain = fsdp_cpu_worker.main(str(recipe), str(tmp_path / "plain"), "plain")
    assert sharded["storage"] == plain["storage"] == ["torch.float32"]
    assert sharded["gathered"] and not plain["gathered"]
    assert sharded["plain_path_reason"] == "the model is sharded by FSDP (its forward gathers each layer's weights)"
    assert sharded["losses"] == pytest.approx(plain["losses"], abs=1e-5)
    assert plain["losses"][-1] < plain["losses"][0]

    whole = load_file(tmp_path / "sharded" / "run" / "adapter" / "adapter_model.safetensors")
    reference = load_file(tmp_path / "plain" / "run" / "adapter" / "adapter_model.safetensors")
    assert len(whole) == 2 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in whole)
    assert {k: tuple(v.shape) for k, v in whole.items()} == {k: tuple(v.shape) for k, v in reference.items()}
    assert all(torch.allclose(whole[k], reference[k], atol=1e-5) for k in whole)
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32),
        str(tmp_path / "sharded" / "run" / "adapter"),
    )
    state = loaded.state_dict()
    assert all(torch.equal(state[k.replace(".weight", ".default.weight")], whole[k]) for k in whole)
