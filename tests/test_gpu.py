"""On a CUDA GPU (skipped without one, tests/conftest.py); `benchmarks/gpu_check.sh` runs them. Each takes well under
a minute on one H200-class GPU.

- bf16 compute (quant.compute_dtype auto picks it on a GPU that runs bf16): a tiny Llama trains, the loss is finite
  and falls, every LoRA tensor changes, every base tensor (4-bit weights and their quantization constants
  included) is bitwise unchanged, and the embedding and output layer stay bf16;
- train.optimizer paged_adamw_8bit: bitsandbytes' paged 8-bit AdamW is the optimizer, keeps 8-bit states, and
  the run trains;
- a real CUDA out-of-memory error in a training step: `train` exits 1 with the guard's one-line message (the
  settings that lower memory, how to start again) and no traceback.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, as_ready, build_tokenizer, write_jsonl

from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft import train as train_stage
from lora_sft.recipe.load import load_recipe
from lora_sft.settings import Machine, compute_dtype, resolve

pytestmark = pytest.mark.gpu


def recipe_file(tiny_llama, tmp_path, write_recipe, rank: int = 4, **train):
    return load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(tiny_llama)},
                "lora": {"rank": rank, "alpha": 2 * rank, "dropout": 0.0},
                "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl"), "max_length": 64},
                "train": {
                    "lr": 3e-2,
                    "max_steps": 20,
                    "micro_batch_size": 8,
                    "warmup": 0,
                    "scheduler": "constant",
                    "logging_steps": 1,
                    "save_steps": 20,
                    **train,
                },
            }
        )
    )


def train_and_compare(recipe):
    """Train as `train` does; returns (Trainer result, losses per step, names of the state tensors that changed)."""
    ready = preflight.prepare(recipe).ready()
    torch.manual_seed(recipe.seed)
    model = model_stage.add_lora(model_stage.load_base(resolve(recipe), ready.plan), recipe, ready.plan)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result = train_stage.fit(
        resolve(recipe), model, as_ready(recipe, ready.tokenizer, ready.bundle, ready.plan), log=lambda *_: None
    )
    after = model.state_dict()
    assert set(after) == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora = {k for k in before if "lora_" in k}
    assert lora and lora <= changed, sorted(lora - changed)[:5]
    assert changed <= lora, sorted(changed - lora)[:5]  # the 4-bit base, its constants, embeddings, norms: bitwise
    losses = [h["loss"] for h in result.trainer.state.log_history if "loss" in h]
    assert len(losses) == recipe.train.max_steps and all(math.isfinite(x) for x in losses), losses
    return result, losses


def test_bf16_compute_trains_and_keeps_the_base_bitwise(tiny_llama, tmp_path, write_recipe):
    import bitsandbytes as bnb

    recipe = recipe_file(tiny_llama, tmp_path, write_recipe)
    assert recipe.quant.compute_dtype == "auto"
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bf16 (compute capability < 8.0)")
    assert compute_dtype(recipe.quant, Machine.here()) == torch.bfloat16
    torch.cuda.reset_peak_memory_stats()  # summary.json's peak is this run's, whatever ran before in this process
    result, losses = train_and_compare(recipe)
    assert result.trainer.args.bf16 and not result.trainer.args.fp16
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    base = result.model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert base.get_input_embeddings().weight.device.type == "cuda"
    quantized = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14 and all(m.compute_dtype == torch.bfloat16 for m in quantized)
    assert all(p.dtype == torch.float32 for n, p in result.model.named_parameters() if "lora_" in n)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["peak_memory_kind"] == "cuda_allocated" and 0 < summary["peak_memory_mb"] < 2048


def test_paged_adamw_8bit_trains_with_8bit_states(tiny_llama, tmp_path, write_recipe):
    import bitsandbytes as bnb

    # rank 64: LoRA matrices of 64 x 64 and more, the size from which bitsandbytes keeps 8-bit states (4096 values)
    recipe = recipe_file(tiny_llama, tmp_path, write_recipe, rank=64, optimizer="paged_adamw_8bit", lr=1e-2)
    result, losses = train_and_compare(recipe)
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses
    optimizer = result.trainer.optimizer
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    # Trainer builds bitsandbytes' AdamW with is_paged and optim_bits 8 for this name
    assert isinstance(optimizer, bnb.optim.AdamW) and optimizer.is_paged and optimizer.args.optim_bits == 8
    big = [s for p, s in optimizer.state.items() if "state1" in s and p.numel() >= 4096]
    assert big and all(s["state1"].dtype == s["state2"].dtype == torch.uint8 for s in big)


def _wide_llama(folder, tokenizer):
    """One layer whose MLP is 65536 wide: a batch of 512 x 4096 positions needs 275 GB for one MLP activation, more
    than any single GPU has, while the weights are 50M parameters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=65536,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_real_out_of_memory_ends_in_one_line_with_the_fix(tmp_path, write_recipe):
    words = ["river", "stone", "cloud", "paper", "green", "quiet", "seven", "apple"]
    tokenizer = build_tokenizer([" ".join(words)] * 8)
    model = _wide_llama(tmp_path / "wide", tokenizer)
    # one long text (chunks of max_length) and many short ones: length grouping puts the longest sample in the
    # first batch, so step 1's batch is 512 rows padded to 4096 positions
    rows = [{"text": " ".join(words[i % 8] for i in range(12000))}] + [{"text": "river stone"}] * 600
    recipe = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": str(tmp_path / "run"),
            "model": {"path": str(model)},
            "data": {"format": "text", "train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "max_length": 4096},
            "train": {"micro_batch_size": 512, "max_steps": 2, "gradient_checkpointing": True},
        }
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "train", str(recipe)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, (proc.returncode, proc.stderr[-3000:])
    line = errors[0]
    assert line.startswith(
        "error: out of GPU memory at step 1; try train.micro_batch_size=256 train.grad_accum=2 (same effective batch); "
    ), line
    assert "data.max_length=2048 (now 4096)" in line and "last good checkpoint: none yet" in line, line
    assert line.endswith(
        f"no checkpoint was saved yet, so start again with: python -m lora_sft train {recipe} --overwrite"
    )
    assert not (tmp_path / "run" / "summary.json").exists()
