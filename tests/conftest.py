"""Fixtures: tiny random models built in a temp folder (nothing is downloaded), recipe helpers and a finished
tiny run. Plain helpers and constants live in helpers.py (tests import them from there, never from conftest)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from helpers import REPO, build_tokenizer, hub_env, save_tiny_llama

# Tests never touch the hub: a missing local file must fail fast, not wait on a network. Set, not defaulted, so
# the caller's value (HF_HUB_OFFLINE=yes, or 0) changes no message a test expects; pushes to the fake hub run in
# subprocesses without the offline variables (helpers.hub_env).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "HF_DATASETS_DISABLE_PROGRESS_BARS", "1"
)  # as cli.main sets it; datasets reads it once, when a test module first imports it
# Tokenized data is cached per test session, never in the user's cache.
os.environ.setdefault("LORA_SFT_CACHE", tempfile.mkdtemp(prefix="lora_sft-cache-"))

# what a test does: see [tool.pytest.ini_options] markers in pyproject.toml
KINDS = ("unit", "e2e", "launch", "gpu", "gguf", "real_model")


def pytest_collection_modifyitems(config, items):
    """Every test says what it does with exactly one of the markers unit / e2e / launch / gpu / gguf / real_model; gpu tests skip without CUDA."""
    wrong = [
        f"{item.nodeid} ({', '.join(kinds) or 'none'})"
        for item in items
        if len(kinds := [k for k in KINDS if item.get_closest_marker(k)]) != 1
    ]
    if wrong:
        raise pytest.UsageError(f"each test needs exactly one of the markers {', '.join(KINDS)}: {'; '.join(wrong)}")
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a chatml tokenizer, saved as safetensors."""
    corpus = [
        line for f in ("alpaca.jsonl", "chat.jsonl") for line in (REPO / "data/examples" / f).read_text().splitlines()
    ]
    corpus += [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    ] * 4
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), build_tokenizer(corpus))


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict as YAML in tmp_path and return its path."""
    import yaml

    def write(recipe: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


@pytest.fixture(scope="session")
def tiny_run(tiny_llama, tmp_path_factory):
    """A finished tiny-Llama run, trained through the CLI as a user would, with the recipe's eval and hub
    sections on: eval runs after training and the adapter is pushed to a fake hub on 127.0.0.1.

    Returns (run directory, the fake hub, the train command's output). Shared by the export, eval,
    generate and hub tests, so the tiny model is trained once.
    """
    import subprocess
    import sys

    import yaml
    from fake_hub import FakeHub

    root = tmp_path_factory.mktemp("tiny-run")
    recipe = {
        "task": "causal_lm",
        "output_dir": str(root / "run"),
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "data": {
            "format": "alpaca",
            "train": str(REPO / "data/examples/alpaca.jsonl"),
            "eval_fraction": 0.125,
            "max_length": 64,
        },
        "train": {
            "lr": 3e-2,
            "max_steps": 12,
            "micro_batch_size": 8,
            "warmup": 0,
            "scheduler": "constant",
            "logging_steps": 4,
            "save_steps": 12,
        },
        "eval": {
            "after_train": True,
            "generate": 2,
            "max_new_tokens": 6,
            "prompts": ["Count the words.\n\npillow silver"],
        },
        "hub": {"repo_id": "me/tiny-adapter", "revision": "v1"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    hub = FakeHub().__enter__()
    # the push must reach the fake hub whatever offline variables the caller set (huggingface_hub reads all three)
    env = hub_env(hub.url, root / "hf-home")
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "train", str(root / "recipe.yaml")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield root / "run", hub, proc
    hub.__exit__(None, None, None)
