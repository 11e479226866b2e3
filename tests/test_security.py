"""Security: the hub token never reaches the run directory or the logs, a token in a recipe is
refused, a model's own Python code runs only when the recipe opts in, pickle weights load only when
the recipe allows them."""

from __future__ import annotations

import secrets
import shutil
import string

import pytest
import torch
from helpers import REPO

from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft.cli.main import main
from lora_sft.recipe.load import load_recipe
from lora_sft.settings import resolve

HERE = REPO / "tests" / "bad_inputs"


def fake_token() -> str:
    return "hf_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(34))


def recipe_dict(model, out, **extra) -> dict:
    return {
        "task": "causal_lm",
        "output_dir": str(out),
        "model": {"path": str(model), **extra},
        "lora": {"rank": 2},
        "data": {
            "format": "alpaca",
            "train": str(REPO / "data/examples/alpaca.jsonl"),
            "eval_fraction": 0.1,
            "max_length": 64,
        },
        "train": {
            "max_steps": 2,
            "micro_batch_size": 8,
            "logging_steps": 1,
            "save_steps": 1,
            "gradient_checkpointing": False,
        },
    }


@pytest.mark.e2e
def test_token_never_reaches_disk_or_logs(tiny_llama, tmp_path, write_recipe, monkeypatch, capsys):
    token = fake_token()
    monkeypatch.setenv("HF_TOKEN", token)  # where the token belongs; the run may see it, never write it
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    run = tmp_path / "run"
    recipe = write_recipe(recipe_dict(tiny_llama, run))
    assert main(["train", str(recipe)]) == 0
    files = [p for p in run.rglob("*") if p.is_file()]
    # every file a run leaves: adapter, card, recipe snapshot, manifest, metrics, summary, checkpoints (training_args.bin too)
    assert {
        "README.md",
        "recipe.yaml",
        "manifest.json",
        "metrics.jsonl",
        "summary.json",
        "training_args.bin",
        "trainer_state.json",
    } <= {p.name for p in files}
    leaks = [str(p) for p in files if token.encode() in p.read_bytes() or token[3:].encode() in p.read_bytes()]
    assert not leaks
    out, err = capsys.readouterr()
    assert token not in out + err

    # a token handed over in a recipe value is refused, and not echoed
    other = tmp_path / "other"
    assert main(["train", str(write_recipe(recipe_dict(tiny_llama, other), "r2.yaml")), f"model.revision={token}"]) == 2
    err = capsys.readouterr().err
    assert "looks like a Hugging Face token" in err and "HF_TOKEN" in err and token not in err
    assert not other.exists()


@pytest.mark.unit
def test_model_code_runs_only_when_the_recipe_opts_in(tmp_path, write_recipe, monkeypatch, capsys):
    marker = tmp_path / "remote-code-ran"
    monkeypatch.setenv("LORA_SFT_REMOTE_CODE_MARKER", str(marker))
    folder = tmp_path / "remote_code_model"
    shutil.copytree(HERE / "remote_code_model", folder)
    path = write_recipe(recipe_dict(folder, tmp_path / "run"))
    assert main(["validate", str(path)]) == 2
    assert "set model.trust_remote_code: true" in capsys.readouterr().err
    assert not marker.exists()
    main(
        ["validate", str(path), "model.trust_remote_code=true"]
    )  # the shipped code is a config only: what follows fails
    assert marker.read_text() == "executed"  # so the refusal above is what kept it from running


@pytest.mark.e2e
def test_pickle_weights_only_when_allowed(tiny_llama, tmp_path, write_recipe, capsys):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama, folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    path = write_recipe(recipe_dict(folder, tmp_path / "run"))
    assert main(["validate", str(path)]) == 2
    assert "has pickle weights only (pytorch_model.bin)" in capsys.readouterr().err

    recipe = load_recipe(path, ["model.allow_pickle=true"])
    prepared = preflight.prepare(recipe)
    model = model_stage.load_base(resolve(recipe), prepared.plan)
    assert model.model.layers[0].self_attn.q_proj.weight.shape[0] > 0
