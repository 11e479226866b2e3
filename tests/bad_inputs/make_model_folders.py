"""Builds the small broken model folders the bad-input corpus points at (model_*/). Run it from the
repository root to rebuild them: `python tests/bad_inputs/make_model_folders.py`. Each is a 1-layer
random Llama (hidden size 8) with a byte-level tokenizer of 259 tokens, broken in one way."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
from helpers import build_tokenizer  # noqa: E402


def llama(path: Path, vocab: int, tokenizer, **config) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def set_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | changes, indent=2, sort_keys=True) + "\n")


def main() -> None:
    tokenizer = build_tokenizer([], vocab_size=0)  # 256 bytes + 3 special tokens
    n = len(tokenizer)

    # config.json with zero attention heads: building the model divides by it
    zero = HERE / "model_zero_heads"
    shutil.rmtree(zero, ignore_errors=True)
    zero.mkdir()
    (zero / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": n,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 0,
            },
            indent=2,
        )
        + "\n"
    )

    # weights cut off halfway (an interrupted download)
    path = llama(HERE / "model_truncated", n, tokenizer)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])

    # a header that is not JSON
    path = llama(HERE / "model_bad_header", n, tokenizer)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:20] = b"not json at!"
    (path / "model.safetensors").write_bytes(bytes(data))

    # weights of a 300-token vocabulary under a config that says 259
    path = llama(HERE / "model_vocab_mismatch", n + 41, tokenizer)
    set_config(path, vocab_size=n)

    # one tensor missing from the file
    path = llama(HERE / "model_missing_tensor", n, tokenizer)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.0.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    # a tokenizer without an EOS token
    no_eos = build_tokenizer([], vocab_size=0, eos=None)
    llama(HERE / "model_no_eos", n, no_eos)

    # a model whose embedding is smaller than the tokenizer's vocabulary
    llama(HERE / "model_small_vocab", 200, build_tokenizer([], vocab_size=0))


if __name__ == "__main__":
    main()
