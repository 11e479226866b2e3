"""GGUF export of the architectures the recipe library ships besides llama / mistral / qwen2: a tiny trained Qwen3,
Gemma 2 and Phi-3 (with and without Phi-3.5's longrope) written as f16 by gguf_write and run in llama.cpp (llama-cpp-python), logits and greedy tokens
compared with transformers in fp32; the configs llama.cpp cannot run, refused in one line before anything is written.

The llama.cpp round trips carry the marker `gguf`, as in test_gguf.py; the refusals run everywhere.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import TINY_DIMS, build_tokenizer
from test_gguf import CORPUS, fit, prompts, tensor_types

from lora_sft.errors import UserError
from lora_sft.export import gguf as gguf_export
from lora_sft.export import gguf_write


def tiny_config(model_type: str, tokenizer, **overrides):
    """A 2-layer config of `model_type` sized for `tokenizer`; the shapes of TINY_DIMS unless `overrides` say else."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        **(TINY_DIMS | overrides),
        initializer_range=0.05,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


# what sets each apart from llama, set so that a conversion that ignored it would show in the logits
ARCH_CONFIGS = {
    # q_norm / k_norm, no qkv bias; head_dim 32 apart from hidden / heads (16) as Qwen3-4B's 128 is from 80; untied
    "qwen3": {"head_dim": 32, "tie_word_embeddings": False},
    # (1 + w) norms, pre/post attention and feed-forward norms, soft-capped attention and final logits (caps low
    # enough to bend the tiny model's logits), a sliding window shorter than the prompts on layer 0, tied output
    "gemma2": {
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 8.0,
        "sliding_window": 6,
        "tie_word_embeddings": True,
    },
    # fused qkv_proj (GQA: 4 query heads, 2 key/value heads) and gate_up_proj, untied lm_head, no rope scaling
    "phi3": {"original_max_position_embeddings": 512, "tie_word_embeddings": False},
}


def save_tiny(path: Path, model_type: str, **overrides) -> tuple[Path, object]:
    """A tiny `model_type` fitted a few steps on the example texts (so its next token is clear), saved as the merged
    folder an export writes: safetensors, config.json and a byte-level BPE tokenizer with a chatml template."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(CORPUS)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(model_type, tokenizer, **(ARCH_CONFIGS[model_type] | overrides))
    )
    fit(model, tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def longer_prompts(tokenizer) -> list[list[int]]:
    """The chat and text prompts of test_gguf.py and two instructions, all longer than gemma2's sliding window."""
    return prompts(tokenizer) + [tokenizer(json.loads(row)["instruction"])["input_ids"] for row in CORPUS[:2]]


def assert_f16_matches_transformers(entry: dict, n_prompts: int) -> None:
    """The f16 bar of the export's own check: logits within F16_RELATIVE of the largest, 16 greedy tokens identical
    or parted only where transformers' own two best tokens are within that tolerance (a near-tie f16 may flip)."""
    assert entry["checked"] and entry["passed"], entry["problems"]
    assert entry["prompts"] == n_prompts and entry["tokenizer_identical_prompts"] == n_prompts
    tolerance = gguf_export.F16_RELATIVE * entry["max_abs_logit"]
    assert entry["max_abs_logit_diff"] <= tolerance
    assert entry["greedy_identical_prompts"] + entry["greedy_ties"] == n_prompts, entry["greedy"]
    for g in entry["greedy"]:
        if "parted_at" in g:
            assert g["transformers"][: g["parted_at"]] == g["llama_cpp"][: g["parted_at"]]
            assert g["logit_gap"] <= tolerance


def fields(path: Path) -> dict:
    import gguf

    return {name: field.contents() for name, field in gguf.GGUFReader(str(path)).fields.items()}


# ---------------------------------------------------------------- llama.cpp round trips (marker gguf)


@pytest.mark.gguf
def test_tiny_qwen3_f16_gguf_gives_transformers_logits_in_llama_cpp(tmp_path):
    merged, tokenizer = save_tiny(tmp_path / "qwen3", "qwen3")
    ids = longer_prompts(tokenizer)
    entry = gguf_export.export_gguf(merged, tmp_path / "gguf", "qwen3", "f16", ids, log=lambda *_: None)
    assert_f16_matches_transformers(entry, len(ids))
    path = tmp_path / "gguf" / "qwen3-f16.gguf"
    meta, types = fields(path), tensor_types(path)
    assert meta["general.architecture"] == "qwen3"
    assert meta["qwen3.attention.key_length"] == meta["qwen3.attention.value_length"] == 32
    assert types["blk.0.attn_q_norm.weight"] == types["blk.1.attn_k_norm.weight"] == "F32"
    assert "output.weight" in types and not any(name.endswith(".bias") for name in types)


@pytest.mark.gguf
def test_tiny_gemma2_f16_gguf_gives_transformers_logits_in_llama_cpp(tmp_path):
    merged, tokenizer = save_tiny(tmp_path / "gemma2", "gemma2")
    ids = longer_prompts(tokenizer)
    assert min(len(p) for p in ids) > ARCH_CONFIGS["gemma2"]["sliding_window"]  # the window is exercised
    entry = gguf_export.export_gguf(merged, tmp_path / "gguf", "gemma2", "f16", ids, log=lambda *_: None)
    assert_f16_matches_transformers(entry, len(ids))
    path = tmp_path / "gguf" / "gemma2-f16.gguf"
    meta, types = fields(path), tensor_types(path)
    assert meta["general.architecture"] == "gemma2"
    assert meta["gemma2.attn_logit_softcapping"] == 5.0 and meta["gemma2.final_logit_softcapping"] == 8.0
    assert meta["gemma2.attention.sliding_window"] == 6
    for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):  # gguf's names for gemma2's four
        assert types[f"blk.1.{norm}.weight"] == "F32", norm
    assert "output.weight" not in types  # llama.cpp's gemma2 reads the output from token_embd


@pytest.mark.gguf
def test_gemma2_norms_written_without_the_plus_one_fail_the_check(tmp_path, monkeypatch):
    """The comparison is a real one: a converter that kept HF's norm weights (llama.cpp scales by w, Gemma by 1 + w)
    gives other logits, and the check says so."""
    import dataclasses

    merged, tokenizer = save_tiny(tmp_path / "gemma2", "gemma2")
    wrong = dataclasses.replace(gguf_write.ARCHITECTURES["gemma2"], norm_shift=0.0)
    monkeypatch.setitem(gguf_write.ARCHITECTURES, "gemma2", wrong)
    entry = gguf_export.export_gguf(merged, tmp_path / "gguf", "gemma2", "f16", prompts(tokenizer), log=lambda *_: None)
    assert entry["checked"] and not entry["passed"]
    assert entry["max_abs_logit_diff"] > gguf_export.F16_RELATIVE * entry["max_abs_logit"]


@pytest.mark.gguf
def test_tiny_phi3_f16_gguf_with_fused_qkv_and_gate_up_gives_transformers_logits_in_llama_cpp(tmp_path):
    merged, tokenizer = save_tiny(tmp_path / "phi3", "phi3")
    ids = longer_prompts(tokenizer)
    # not named "phi3": llama.cpp sets special-token attributes for a general.name with "phi3" in it, looking up
    # Phi-3's own </s> <unk> <s> <|endoftext|>, which this tokenizer lacks (a real Phi-3 tokenizer has them)
    entry = gguf_export.export_gguf(merged, tmp_path / "gguf", "tiny", "f16", ids, log=lambda *_: None)
    assert_f16_matches_transformers(entry, len(ids))
    import gguf

    path = tmp_path / "gguf" / "tiny-f16.gguf"
    assert fields(path)["general.architecture"] == "phi3"
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in gguf.GGUFReader(str(path)).tensors}
    hidden, ff, head_dim = TINY_DIMS["hidden_size"], TINY_DIMS["intermediate_size"], 16
    qkv_rows = (TINY_DIMS["num_attention_heads"] + 2 * TINY_DIMS["num_key_value_heads"]) * head_dim
    assert shapes["blk.0.attn_qkv.weight"] == (hidden, qkv_rows)  # GGUF lists the row length first
    assert shapes["blk.0.ffn_up.weight"] == (hidden, 2 * ff)  # gate and up together: llama.cpp splits them
    assert "blk.0.ffn_gate.weight" not in shapes and "blk.0.attn_q.weight" not in shapes


def longrope(original: int) -> dict:
    """Phi-3.5-mini's rope scaling at the tiny scale: short and long factors apart from 1 and from each other, so a
    converter that dropped them, swapped them or lost the attention factor would show in the logits."""
    half = TINY_DIMS["hidden_size"] // TINY_DIMS["num_attention_heads"] // 2
    return {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.25 * i for i in range(half)],
        "long_factor": [1.0 + 3.0 * i for i in range(half)],
        "original_max_position_embeddings": original,
    }


# Phi-3.5-mini's shape of context (4096 of 131072 there) at the tiny scale
LONGROPE_PHI3 = {
    "max_position_embeddings": 2048,
    "original_max_position_embeddings": 256,
    "rope_parameters": longrope(256),
}


@pytest.mark.gguf
def test_tiny_phi3_with_longrope_gives_transformers_logits_in_llama_cpp(tmp_path):
    """Phi-3.5-mini's longrope (4096 of 131072 there; 256 of 2048 here, so the attention factor is sqrt(1 + ln 8 /
    ln 256)): the factor tensors and the attention factor written as llama.cpp's converter does. The check's context
    stays within the original 256, where both transformers and llama.cpp run the short factors."""
    import gguf

    merged, tokenizer = save_tiny(tmp_path / "phi3", "phi3", **LONGROPE_PHI3)
    ids = longer_prompts(tokenizer)
    warnings = []
    entry = gguf_export.export_gguf(merged, tmp_path / "gguf", "tiny", "f16", ids, log=warnings.append)
    assert_f16_matches_transformers(entry, len(ids))
    path = tmp_path / "gguf" / "tiny-f16.gguf"
    meta = fields(path)
    assert meta["phi3.rope.scaling.original_context_length"] == 256
    assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + math.log(8) / math.log(256)) ** 0.5)
    tensors = {t.name: t.data.tolist() for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("rope_")}
    assert tensors == {
        "rope_factors_long.weight": longrope(256)["long_factor"],
        "rope_factors_short.weight": longrope(256)["short_factor"],
    }
    assert any("long rope factors" in w and "over 256 tokens" in w for w in warnings)


@pytest.mark.gguf
def test_phi3_longrope_with_the_factors_swapped_fails_the_check(tmp_path, monkeypatch):
    """The comparison sees the factors: the long ones written as the short gives other logits, and the check says so."""
    merged, tokenizer = save_tiny(tmp_path / "phi3", "phi3", **LONGROPE_PHI3)
    real = gguf_write._rope_tensors

    def swapped(rope):
        out = real(rope)
        return dict(zip(out, reversed(list(out.values())), strict=True))

    monkeypatch.setattr(gguf_write, "_rope_tensors", swapped)
    entry = gguf_export.export_gguf(merged, tmp_path / "gguf", "tiny", "f16", prompts(tokenizer), log=lambda *_: None)
    assert entry["checked"] and not entry["passed"]


# ---------------------------------------------------------------- refusals (no llama.cpp)


def config_dict(model_type: str, **overrides) -> dict:
    return tiny_config(model_type, build_tokenizer(CORPUS[:20]), **(ARCH_CONFIGS[model_type] | overrides)).to_dict()


@pytest.mark.unit
def test_an_unsupported_architecture_is_refused_in_one_line_naming_the_supported_ones(tmp_path):
    with pytest.raises(UserError) as e:
        gguf_write.check_supported("gpt_neox", "causal_lm")
    assert e.value.problems == [
        "--gguf: architecture 'gpt_neox' is not supported; GGUF export supports gemma2, llama, mistral, phi3, qwen2, qwen3"
    ]
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    with pytest.raises(UserError, match="'gemma3_text' is not supported"):
        gguf_write.write(tmp_path / "merged", tmp_path / "gguf", "x", "f16")
    assert not (tmp_path / "gguf").exists()


@pytest.mark.unit
def test_qwen3_with_a_sliding_window_is_refused():
    with pytest.raises(UserError) as e:
        gguf_write.check_ready(config_dict("qwen3", use_sliding_window=True), "causal_lm")
    assert e.value.problems == [
        "--gguf: qwen3 with use_sliding_window is not supported; llama.cpp's qwen3 attends to the whole context"
    ]


@pytest.mark.unit
def test_gemma2_configs_llama_cpp_runs_otherwise_are_refused_together():
    config = config_dict("gemma2", final_logit_softcapping=None, query_pre_attn_scalar=64, tie_word_embeddings=False)
    with pytest.raises(UserError) as e:
        gguf_write.check_ready(config, "causal_lm")
    assert e.value.problems == [
        "--gguf: gemma2 without final_logit_softcapping is not supported; llama.cpp's gemma2 always soft-caps",
        "--gguf: gemma2 query_pre_attn_scalar 64 is not supported; llama.cpp scales queries by 1/sqrt(32)",
        "--gguf: gemma2 with an untied lm_head is not supported; llama.cpp's gemma2 reuses token_embd",
    ]
    gguf_write.check_ready(config_dict("gemma2"), "causal_lm")  # the tested config passes


@pytest.mark.unit
def test_phi3_longrope_without_its_factors_and_partial_rotary_are_refused_in_one_line_naming_them(tmp_path):
    config = config_dict("phi3", original_max_position_embeddings=64, rope_parameters=longrope(64))
    gguf_write.check_ready(config, "causal_lm")  # Phi-3.5-mini's shape of config passes
    config["rope_parameters"]["long_factor"] = [1.0] * 3  # a hand-edited config.json (transformers checks its own)
    with pytest.raises(UserError) as e:
        gguf_write.check_ready(config, "causal_lm")
    assert e.value.problems == [
        "--gguf: phi3 longrope needs original_max_position_embeddings and long_factor / short_factor of 8 values each"
    ]
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="longrope"):
        gguf_write.write(tmp_path / "merged", tmp_path / "gguf", "x", "f16")
    assert not (tmp_path / "gguf").exists()
    gguf_write.check_ready(
        config_dict("phi3", original_max_position_embeddings=64, rope_parameters=longrope(64)), "causal_lm"
    )
    # longrope is phi3's: on another architecture it stays refused
    llama = tiny_config("llama", build_tokenizer(CORPUS[:20]), rope_parameters=longrope(64)).to_dict()
    with pytest.raises(UserError, match="rope scaling 'longrope' has no"):
        gguf_write.check_ready(llama, "causal_lm")
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(UserError) as e:
        gguf_write.check_ready(config_dict("phi3", rope_parameters=rope), "causal_lm")
    assert e.value.problems == ["--gguf: partial_rotary_factor 0.5 is not supported; GGUF export rotates whole heads"]


@pytest.mark.unit
def test_a_phi3_sliding_window_llama_cpp_ignores_is_named_in_a_warning():
    """llama.cpp runs phi3 without its sliding window (Phi-3-mini-4k's 2047 of 4096): written, and the export says so."""
    caveats = gguf_write.ARCHITECTURES["phi3"].caveats
    assert caveats(config_dict("phi3", sliding_window=2047, max_position_embeddings=4096)) == [
        "gguf warning: llama.cpp runs phi3 without its sliding window (2047); past 2047 tokens it attends to the whole context"
    ]
    assert caveats(config_dict("phi3", sliding_window=262144)) == []  # Phi-3.5-mini's: longer than its context
