"""`validate` on every recipe in recipes/ (so none rots), and its model checks without weights."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

from lora_sft.cli import main

pytestmark = pytest.mark.unit
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_are_found():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_validate_every_recipe(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = main(["validate", str(recipe)])
    out, err = capsys.readouterr()
    if code == 2 and not torch.cuda.is_available():
        # a GPU recipe (paged optimizer, bf16) on a CPU machine: refused for this machine only
        lines = err.strip().splitlines()
        assert lines and all("needs a CUDA GPU, and there is none on this machine" in line for line in lines), err
        return
    assert code == 0, err
    assert f"{recipe}: ok" in out and "training:" in out
    if "trainable params" not in out:  # a hub model, and the tests never touch the hub
        assert "the model checks need the hub" in out


def test_validate_resolves_targets_without_weights(tiny_llama, write_recipe, capsys):
    path = write_recipe({
        "task": "causal_lm", "output_dir": "unused", "model": {"path": str(tiny_llama)},
        "lora": {"target_modules": ["q_proj", "v_proj"], "layers": [1], "rank": 2},
        "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl")},
    })
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "on 2 modules (q_proj, v_proj)" in out
    assert f"trainable params: {2 * (64 + 64) + 2 * (64 + 32):,}" in out


def test_target_that_matches_nothing_lists_the_modules(tiny_llama, write_recipe, capsys):
    path = write_recipe({
        "task": "causal_lm", "output_dir": "unused", "model": {"path": str(tiny_llama)},
        "lora": {"target_modules": ["q_prj"]},
        "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl")},
    })
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert f"{path}:" in err[0] and "lora.target_modules: 'q_prj' matches no linear module (did you mean 'q_proj'?" in err[0]
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err[0]


def test_missing_data_file_and_model_folder(tmp_path, write_recipe, capsys):
    path = write_recipe({
        "task": "causal_lm", "output_dir": "unused", "model": {"path": str(tmp_path / "nope")},
        "data": {"format": "alpaca", "train": str(tmp_path / "missing.jsonl")},
    })
    assert main(["validate", str(path)]) == 2
    assert "data.train: file not found" in capsys.readouterr().err
    (tmp_path / "ok.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path = write_recipe({
        "task": "causal_lm", "output_dir": "unused", "model": {"path": str(tmp_path / "nope")},
        "data": {"format": "alpaca", "train": str(tmp_path / "ok.jsonl")},
    })
    assert main(["validate", str(path)]) == 2
    assert "model.path: model folder not found" in capsys.readouterr().err
