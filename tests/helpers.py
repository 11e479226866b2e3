"""Helpers the tests import (`from helpers import ...`): the repository root, a tokenizer builder, a
JSONL writer and the constants shared with the fixtures in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# every recipe the project ships (recipes/accelerate/ holds accelerate launch configs, not recipes)
RECIPES = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tokenizer(
    corpus: list[str],
    vocab_size: int = 400,
    specials=SPECIALS,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    bos=None,
    template=CHATML,
    split_regex: str | None = None,
):
    """A byte-level BPE tokenizer with special tokens and a chat template.

    With vocab_size 0 it learns no merges: every ASCII character is one token, so a test can write
    the expected label mask of a text by hand, character by character. `split_regex` splits text with that
    regex before the byte-level step (as Qwen2's and Llama 3's tokenizers do) instead of GPT-2's.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_regex:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split_regex), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    size = vocab_size or len(alphabet) + len(specials)
    tok.train_from_iterator(
        corpus, trainers.BpeTrainer(vocab_size=size, special_tokens=specials, initial_alphabet=alphabet)
    )
    named = {"eos_token": eos, "pad_token": pad} | ({"bos_token": bos} if bos else {})
    others = [t for t in specials if t not in named.values()]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, additional_special_tokens=others, chat_template=template, **named
    )


# the tiny decoders' shape: 2 layers of width 64, 4 heads of 16 (2 key/value heads), MLP 128
TINY_DIMS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}


def save_tiny_llama(path: Path, tokenizer, tied: bool = False) -> Path:
    """A 2-layer random Llama sized for `tokenizer`, saved with it as safetensors (seeded: the same weights each time)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **TINY_DIMS,
        tie_word_embeddings=tied,
        initializer_range=0.3,  # wide enough that LoRA on the layers can move the frozen lm_head's logits
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
TOKEN = "hf_fakeTOKEN4lorasftTests0123456789"


def hub_env(hub_url: str, home: Path) -> dict[str, str]:
    """The environment of a `python -m lora_sft` subprocess that pushes to the fake hub: this one's, without the
    offline variables the caller may have set (huggingface_hub reads HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE
    alike and would refuse the push), with the fake hub's address, a fake token and an HF_HOME of its own."""
    kept = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES}
    return kept | {"HF_ENDPOINT": hub_url, "HF_TOKEN": TOKEN, "HF_HOME": str(home), "PYTHONPATH": str(REPO)}


def losses(run: Path) -> list[tuple[int, float]]:
    """A run's per-step training losses from its metrics.jsonl (while it is running too)."""
    records = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # the line a running process is writing
            records.append(json.loads(line))
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def adapter(run: Path) -> dict[str, torch.Tensor]:
    """A run's saved adapter tensors."""
    return load_file(run / "adapter" / "adapter_model.safetensors")


def planning_recipe(model: str, **train):
    """A recipe for the memory arithmetic of a hub model (never loaded): nf4 + double quant, bf16, LoRA r16 on every
    linear layer, sequence 2048, micro batch 1, AdamW; `train` patches its train section."""
    from lora_sft.recipe.schema import Recipe

    return Recipe.model_validate(
        {
            "task": "causal_lm",
            "output_dir": "unused",
            "model": {"path": model},
            "quant": {"mode": "nf4", "double_quant": True, "compute_dtype": "bf16"},
            "lora": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "data": {"format": "alpaca", "train": "unused.jsonl", "max_length": 2048},
            "train": {"micro_batch_size": 1, "grad_accum": 1, "optimizer": "adamw_torch", **train},
        }
    )


def as_ready(recipe, tokenizer, bundle, plan):
    """What `train.fit` starts from (the preflight's `Ready`) for a test that built its own tokenizer and data:
    the settings of `recipe` as written (no memory plan)."""
    from lora_sft.preflight import Ready
    from lora_sft.settings import resolve

    return Ready(None, plan, tokenizer, bundle, None, resolve(recipe))  # type: ignore[arg-type]
