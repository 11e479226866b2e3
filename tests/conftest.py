"""Fixtures: tiny random models built in a temp folder (nothing is downloaded) and recipe helpers."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the hub: a missing local file must fail fast, not wait on a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # as cli.main sets it; datasets reads it once, when a test module first imports it
# Tokenized data is cached per test session, never in the user's cache.
os.environ.setdefault("LORA_SFT_CACHE", tempfile.mkdtemp(prefix="lora_sft-cache-"))

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(corpus: list[str], vocab_size: int = 400, specials=SPECIALS, eos="<|im_end|>", pad="<|endoftext|>", bos=None, template=CHATML):
    """A byte-level BPE tokenizer with special tokens and a chat template.

    With vocab_size 0 it learns no merges: every ASCII character is one token, so a test can write
    the expected label mask of a text by hand, character by character.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    size = vocab_size or len(alphabet) + len(specials)
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=size, special_tokens=specials, initial_alphabet=alphabet))
    named = {"eos_token": eos, "pad_token": pad} | ({"bos_token": bos} if bos else {})
    others = [t for t in specials if t not in named.values()]
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=others, chat_template=template, **named)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a chatml tokenizer, saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [line for f in ("alpaca.jsonl", "chat.jsonl") for line in (REPO / "data/examples" / f).read_text().splitlines()]
    corpus += ["Below is an instruction that describes a task. Write a response that appropriately completes the request."] * 4
    tokenizer = build_tokenizer(corpus)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
        initializer_range=0.3,  # wide enough that LoRA on the layers can move the frozen lm_head's logits
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe dict as YAML in tmp_path and return its path."""
    import yaml

    def write(recipe: dict, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        return path

    return write


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
TOKEN = "hf_fakeTOKEN4lorasftTests0123456789"


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
        "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl"), "eval_fraction": 0.125, "max_length": 64},
        "train": {"lr": 3e-2, "max_steps": 12, "micro_batch_size": 8, "warmup": 0, "scheduler": "constant", "logging_steps": 4, "save_steps": 12},
        "eval": {"after_train": True, "generate": 2, "max_new_tokens": 6, "prompts": ["Count the words.\n\npillow silver"]},
        "hub": {"repo_id": "me/tiny-adapter", "revision": "v1"},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    hub = FakeHub().__enter__()
    # the push must reach the fake hub whatever offline variables the caller set (huggingface_hub reads all three)
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES} | {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": str(root / "hf-home")}
    proc = subprocess.run([sys.executable, "-m", "lora_sft", "train", str(root / "recipe.yaml")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield root / "run", hub, proc
    hub.__exit__(None, None, None)
