"""Runs that go wrong stop cleanly: a non-finite loss, CUDA out of memory, a write error while saving.

Each fault is real and injected from outside lora_sft into a real tiny run (real bitsandbytes,
peft, Trainer, files): a forward hook that turns the embeddings into NaN or raises CUDA's
out-of-memory error at one step, and a file-size limit (RLIMIT_FSIZE, the kernel refuses the write
with EFBIG as it would with ENOSPC on a full disk) set while a checkpoint is being written.
"""

from __future__ import annotations

import json
import resource
import signal

import pytest
import torch
from helpers import REPO, as_ready
from safetensors.torch import load_file

from lora_sft import data as data_stage
from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft import train as train_stage
from lora_sft.cli.main import main
from lora_sft.errors import RunError
from lora_sft.recipe.load import load_recipe
from lora_sft.run.checkpoint import checkpoints
from lora_sft.settings import resolve

pytestmark = pytest.mark.e2e


def make_recipe(tiny_llama, tmp_path, write_recipe, **train):
    return write_recipe(
        {
            "task": "causal_lm",
            "output_dir": str(tmp_path / "run"),
            "model": {"path": str(tiny_llama)},
            "lora": {"rank": 4, "alpha": 8},
            "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl"), "max_length": 48},
            "train": {
                "lr": 1e-2,
                "max_steps": 4,
                "micro_batch_size": 4,
                "warmup": 0,
                "logging_steps": 1,
                "save_steps": 1,
                "save_total_limit": 3,
                "gradient_checkpointing": False,
                **train,
            },  # no recomputed forwards: one per step
        }
    )


def train_with_fault(path, fault_at: int, fault):
    """Train the recipe; `fault(output, model)` runs in the embedding forward of training step `fault_at`."""
    recipe = load_recipe(path)
    prepared = preflight.prepare(recipe)
    tokenizer = model_stage.load_tokenizer(recipe, prepared.plan.source)
    bundle = data_stage.build(recipe, tokenizer, prepared.checked)
    model = model_stage.add_lora(model_stage.load_base(resolve(recipe), prepared.plan), recipe, prepared.plan)
    forwards = []

    def hook(module, args, output):
        if module.training:
            forwards.append(1)
            if len(forwards) == fault_at:
                return fault(output, model)
        return output

    model.get_input_embeddings().register_forward_hook(hook)
    return (
        recipe,
        model,
        lambda: train_stage.fit(
            resolve(recipe), model, as_ready(recipe, tokenizer, bundle, prepared.plan), log=lambda *_: None
        ),
    )


def test_nonfinite_loss_stops_before_the_update(tiny_llama, tmp_path, write_recipe):
    _recipe, model, fit = train_with_fault(
        make_recipe(tiny_llama, tmp_path, write_recipe), 3, lambda out, model: out * float("nan")
    )
    with pytest.raises(RunError) as stopped:
        fit()
    run = tmp_path / "run"
    message = str(stopped.value)
    assert stopped.value.code == 1 and "\n" not in message
    assert message.startswith(
        f"step 3: the loss is nan; stopped before the optimizer step, last good checkpoint: {run / 'checkpoints' / 'checkpoint-2'};"
    )
    assert "train.on_nonfinite: skip" in message and "lower train.lr" in message
    assert not (run / "summary.json").exists()
    # the adapter in memory still holds step 2's values: NaN never reached the weights
    saved = load_file(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    live = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved and all(torch.equal(saved[k], live[k]) for k in saved)


def test_nonfinite_gradient_skipped_on_request(tiny_llama, tmp_path, write_recipe):
    def nan_gradient(out, model):  # the loss of this step stays finite; one gradient does not
        weight = next(p for n, p in model.named_parameters() if "lora_B" in n)
        handle = weight.register_hook(lambda grad: (handle.remove(), grad * float("nan"))[1])
        return out

    path = make_recipe(tiny_llama, tmp_path, write_recipe, on_nonfinite="skip")
    _recipe, _model, fit = train_with_fault(path, 3, nan_gradient)
    result = fit()
    assert result.summary["skipped_steps"] == [3] and result.summary["steps"] == 4
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r)  # finite: the gradient check caught it
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_cuda_out_of_memory_names_the_options(tiny_llama, tmp_path, write_recipe):
    def oom(out, model):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    recipe, _model, fit = train_with_fault(make_recipe(tiny_llama, tmp_path, write_recipe), 3, oom)
    with pytest.raises(RunError) as stopped:
        fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert str(stopped.value) == (
        "out of GPU memory at step 3; try train.micro_batch_size=2 train.grad_accum=2 (same effective batch); "
        "train.gradient_checkpointing=true; data.max_length=24 (now 48); "
        f"last good checkpoint: {checkpoint}; continue with: python -m lora_sft train {recipe._source.file} --resume"
    )


def test_write_error_while_saving_keeps_the_previous_checkpoint(tiny_llama, tmp_path, write_recipe, capsys):
    path = make_recipe(tiny_llama, tmp_path, write_recipe)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(
        signal.SIGXFSZ, signal.SIG_IGN
    )  # a write past the limit fails with EFBIG instead of killing us

    def disk_full(out, model):  # step 2's forward: checkpoint-1 is on disk, checkpoint-2 is about to be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, limit[1]))  # the adapter alone is 32 KiB
        return out

    _recipe, _model, fit = train_with_fault(path, 2, disk_full)
    try:
        with pytest.raises(RunError) as failed:
            fit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
    checkpoints = tmp_path / "run" / "checkpoints"
    message = str(failed.value)
    assert "\n" not in message and failed.value.code == 1
    assert message.startswith(
        f"cannot write the step 2 checkpoint in {checkpoints / '.staging' / 'checkpoint-2'}"
    )  # or a file in it
    assert f"the previous checkpoint {checkpoints / 'checkpoint-1'} is intact" in message
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1"]  # nothing half-written left behind
    # the previous checkpoint is loadable: the run resumes from it and completes
    assert main(["train", str(path), "--resume"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert "resuming from" in capsys.readouterr().out


def test_nonfinite_loss_before_any_checkpoint_says_to_start_again(tiny_llama, tmp_path, write_recipe):
    path = make_recipe(tiny_llama, tmp_path, write_recipe, save_steps=100)
    _recipe, _model, fit = train_with_fault(path, 2, lambda out, model: out * float("nan"))
    with pytest.raises(RunError) as stopped:
        fit()
    message = str(stopped.value)
    assert message.startswith(
        "step 2: the loss is nan; stopped before the optimizer step, last good checkpoint: none yet;"
    )
    assert message.endswith(
        f"or set train.on_nonfinite: skip; no checkpoint was saved yet, so start again with: python -m lora_sft train {path} --overwrite"
    )
    assert "--resume" not in message


def test_an_error_during_training_starts_a_line_of_its_own(tiny_llama, tmp_path, write_recipe):
    """The training progress bar is ended before the error is printed, so `grep ^error:` finds it (a subprocess
    whose file-size limit makes the first checkpoint fail; no checkpoint exists, so it says --overwrite, not --resume).
    `validate` fills the data cache first, without the limit: the data stage writes Arrow files (in the cache, or in
    the temporary folder with data.cache false), which the limit would cut short before training starts."""
    import os
    import subprocess
    import sys

    path = make_recipe(tiny_llama, tmp_path, write_recipe, save_steps=2)

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))  # the adapter alone is 32 KiB

    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LORA_SFT_CACHE": str(tmp_path / "cache")}
    filled = subprocess.run([sys.executable, "-m", "lora_sft", "validate", str(path)], capture_output=True, env=env)
    assert filled.returncode == 0, filled.stderr[-2000:]
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "train", str(path)],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=small_files,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.split("\n")
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write the step 2 checkpoint"), proc.stderr[-2000:]
    assert errors[0].endswith(
        "no earlier checkpoint exists; free disk space (or fix the folder's permissions) and start again with --overwrite"
    )
    assert lines[lines.index(errors[0]) + 1 :] == [""], "nothing (a progress bar) is drawn after the error"


def fit_with_eval_fault(path, fault):
    """Train the recipe; `fault(output, calls)` runs in each embedding forward of an evaluation (`calls` counts them)."""
    recipe = load_recipe(path)
    prepared = train_stage.prepare(recipe)
    model = model_stage.add_lora(model_stage.load_base(resolve(recipe), prepared.plan), recipe, prepared.plan)
    calls = []

    def hook(module, args, output):
        if not module.training:
            calls.append(1)
            return fault(output, calls)
        return output

    model.get_input_embeddings().register_forward_hook(hook)
    return (
        recipe,
        calls,
        lambda: train_stage.fit(
            resolve(recipe),
            model,
            as_ready(recipe, prepared.tokenizer, prepared.bundle, prepared.plan),
            log=lambda *_: None,
        ),
    )


def eval_recipe(tiny_llama, tmp_path, write_recipe, **train):
    """Two steps, then the evaluation after training (none before it) on half of the rows."""
    import yaml

    path = make_recipe(tiny_llama, tmp_path, write_recipe, max_steps=2, eval_before=False, **train)
    raw = yaml.safe_load(path.read_text())
    raw["data"]["eval_fraction"] = 0.5
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_sigint_during_the_final_evaluation_stops_at_once_and_the_checkpoint_resumes(
    tiny_llama, tmp_path, write_recipe
):
    import os

    path = eval_recipe(tiny_llama, tmp_path, write_recipe, micro_batch_size=1, grad_accum=1)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job, not Python's default

    def interrupt(out, calls):
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    _recipe, calls, fit = fit_with_eval_fault(path, interrupt)
    with pytest.raises(RunError) as stopped:
        fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert stopped.value.code == 130 and len(calls) == 1  # stopped in the first eval batch, not after the evaluation
    assert (
        str(stopped.value)
        == f"SIGINT: stopped during the evaluation after training, checkpoint {checkpoint}; continue with: python -m lora_sft train {path} --resume"
    )
    assert not (tmp_path / "run" / "summary.json").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler that was in place is put back
    # the last step's checkpoint is complete (its marker written): --resume picks it and the run finishes
    # (Trainer, resumed at its last step, trains one more step before it stops: a known limit, see the README)
    assert checkpoints(checkpoint.parent)[-1] == checkpoint
    assert main(["train", str(path), "--resume"]) == 0
    assert (tmp_path / "run" / "summary.json").is_file() and (
        tmp_path / "run" / "adapter" / "adapter_model.safetensors"
    ).is_file()


@pytest.mark.parametrize("found", [signal.SIG_IGN, signal.SIG_DFL, signal.default_int_handler], ids=str)
def test_the_guard_puts_back_the_handlers_it_found(tmp_path, found):
    """A background job starts with SIGINT ignored: the guard hands back that, not Python's default."""
    from lora_sft.run.guard import Guard

    before = {s: signal.signal(s, found) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Guard(None, tmp_path).signals("the evaluation after training"):  # type: ignore[arg-type]
            assert signal.getsignal(signal.SIGINT) is not found
        assert signal.getsignal(signal.SIGINT) is found and signal.getsignal(signal.SIGTERM) is found
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_cuda_out_of_memory_in_the_final_evaluation_names_the_options(tiny_llama, tmp_path, write_recipe):
    def oom(out, calls):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    path = eval_recipe(tiny_llama, tmp_path, write_recipe)
    _recipe, _calls, fit = fit_with_eval_fault(path, oom)
    with pytest.raises(RunError) as stopped:
        fit()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    assert str(stopped.value) == (
        "out of GPU memory during the evaluation after training (after step 2); try train.micro_batch_size=2 train.grad_accum=2 (same effective batch); "
        f"data.max_length=24 (now 48); last good checkpoint: {checkpoint}; continue with: python -m lora_sft train {path} --resume"
    )
