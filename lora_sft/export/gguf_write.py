"""The GGUF converter: a merged model folder (safetensors, config.json, tokenizer files) written as one GGUF file
that llama.cpp, Ollama and LM Studio load.

It writes with the `gguf` package (its writer, tensor-name map, SpecialVocab, quantizers): the architecture's
metadata from config.json, the tokenizer (vocabulary, merges, special tokens, chat template) from tokenizer.json,
and the tensors one at a time, so memory holds one tensor, not the model. `ARCHITECTURES` says which
transformers models it converts (llama, mistral, qwen2, qwen3, gemma2, phi3) and how, as llama.cpp's own
convert_hf_to_gguf.py writes them; gguf_export.py checks the file in llama.cpp and writes the Modelfile.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_sft.errors import RunError, UserError

INSTALL = "pip install 'lora-sft[gguf]'"

# the pre-tokenizer regexes llama.cpp knows, by its name for them (tokenizer.ggml.pre)
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    _LLAMA3_REGEX: "llama-bpe",
    _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"): "qwen2",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
}


# ---------------------------------------------------------------- architectures


def _gemma2_metadata(writer, config: dict) -> None:
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])
    writer.add_sliding_window(config["sliding_window"])


def _gemma2_problems(config: dict) -> list[str]:
    """What llama.cpp's gemma2 hard-codes: softcapping on, sliding window on even layers, the query scale, tied output."""
    problems = [
        f"--gguf: gemma2 without {key} is not supported; llama.cpp's gemma2 always soft-caps"
        for key in ("attn_logit_softcapping", "final_logit_softcapping")
        if config.get(key) is None
    ]
    heads, hidden, layers = config["num_attention_heads"], config["hidden_size"], config["num_hidden_layers"]
    # llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden / heads) for a 46-layer (27B) model
    expected = hidden // heads if layers == 46 else (config.get("head_dim") or hidden // heads)
    if config.get("query_pre_attn_scalar", expected) != expected:
        problems.append(
            f"--gguf: gemma2 query_pre_attn_scalar {config['query_pre_attn_scalar']} is not supported; llama.cpp scales queries by 1/sqrt({expected})"
        )
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if config.get("layer_types", alternating) != alternating:
        problems.append(
            "--gguf: gemma2 layer_types other than sliding/full alternating from layer 0 are not supported (llama.cpp's pattern)"
        )
    if not config.get("tie_word_embeddings", True):
        problems.append("--gguf: gemma2 with an untied lm_head is not supported; llama.cpp's gemma2 reuses token_embd")
    return problems


def _phi3_metadata(writer, config: dict) -> None:
    writer.add_sliding_window(config.get("sliding_window") or 0)


def _phi3_caveats(config: dict) -> list[str]:
    caveats = []
    window = config.get("sliding_window")
    if window and window < config["max_position_embeddings"]:
        caveats.append(
            f"gguf warning: llama.cpp runs phi3 without its sliding window ({window}); past {window} tokens it attends to the whole context"
        )
    rope = _rope(config)
    if rope["rope_type"] == "longrope":
        original = rope["original_max_position_embeddings"]
        caveats.append(
            f"gguf warning: llama.cpp picks phi3's long rope factors by its context size, not by the sequence as transformers does: "
            f"with a context over {original} tokens (llama.cpp -c, Ollama num_ctx) even short prompts run on the long factors"
        )
    return caveats


@dataclass(frozen=True)
class Architecture:
    """How a transformers model_type becomes a llama.cpp architecture (llama.cpp's convert_hf_to_gguf.py conventions)."""

    name: str  # llama.cpp's name (general.architecture); tensor names come from gguf's TensorNameMap for it
    # HF's llama q/k rows rotate halves; llama.cpp's llama rope rotates adjacent pairs (qwen/gemma/phi use halves: NEOX)
    permute_qk: bool = False
    norm_shift: float = 0.0  # added to every RMSNorm weight: Gemma's norms scale by (1 + w), llama.cpp's by w
    metadata: Callable[[Any, dict], None] | None = None  # the keys only this architecture writes
    problems: Callable[[dict], list[str]] | None = None  # configs llama.cpp's architecture cannot run (refused)
    caveats: Callable[[dict], list[str]] | None = None  # what llama.cpp runs differently (logged)


# config.json model_type -> how it is written
ARCHITECTURES = {
    "llama": Architecture("llama", permute_qk=True),
    "mistral": Architecture("llama", permute_qk=True),
    "qwen2": Architecture("qwen2"),
    "qwen3": Architecture("qwen3"),  # q_norm / k_norm map to attn_q_norm / attn_k_norm
    "gemma2": Architecture("gemma2", norm_shift=1.0, metadata=_gemma2_metadata, problems=_gemma2_problems),
    # qkv_proj and gate_up_proj stay fused: llama.cpp's phi3 reads attn_qkv and splits ffn_up itself
    "phi3": Architecture("phi3", metadata=_phi3_metadata, caveats=_phi3_caveats),
}


def check_supported(model_type: str, task: str) -> None:
    """Refuse (one line, before anything is written) a model this converter cannot write."""
    if task != "causal_lm":
        raise UserError(f"--gguf: a {task} run has a classification head; llama.cpp runs causal LMs only")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"--gguf: architecture {model_type!r} is not supported; GGUF export supports {', '.join(sorted(ARCHITECTURES))}"
        )


def check_config(config: dict, task: str) -> None:
    """A model llama.cpp runs as transformers does: a supported architecture, rope and attention, every problem at once."""
    model_type = config.get("model_type", "?")
    check_supported(model_type, task)
    problems = []
    try:
        rope = _rope(config)
    except UserError as e:
        problems += e.problems
        rope = {}
    arch = ARCHITECTURES[model_type]
    if arch.problems:
        problems += arch.problems(config)
    # transformers 5 keeps it in rope_parameters, older configs beside them
    if (partial := rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))) != 1.0:
        problems.append(f"--gguf: partial_rotary_factor {partial} is not supported; GGUF export rotates whole heads")
    if config.get("use_sliding_window"):
        problems.append(
            f"--gguf: {model_type} with use_sliding_window is not supported; llama.cpp's {arch.name} attends to the whole context"
        )
    if problems:
        raise UserError(problems)


def check_ready(config: dict, task: str) -> None:
    """`export --gguf`, checked before anything is written: a model llama.cpp runs, the gguf package installed."""
    check_config(config, task)
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"--gguf: the gguf package is not installed; {INSTALL}") from None


def file_name(name: str, gguf_type: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.") or "model"
    return f"{slug}-{gguf_type}.gguf"


# ---------------------------------------------------------------- metadata


def _rope(config: dict) -> dict:
    """rope_theta and rope scaling, from transformers 5's rope_parameters or the older rope_theta/rope_scaling."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] == "su":  # Phi-3's first name for longrope
        params["rope_type"] = "longrope"
    if params["rope_type"] == "longrope" and config.get("model_type") == "phi3":
        return params | _longrope(config, params)
    if params["rope_type"] not in ("default", "linear", "yarn", "llama3"):
        raise UserError(
            f"--gguf: rope scaling {params['rope_type']!r} has no llama.cpp equivalent here (default, linear, yarn, llama3; longrope on phi3)"
        )
    return params


def _longrope(config: dict, rope: dict) -> dict:
    """Phi-3's longrope as llama.cpp's phi3 runs it: short and long frequency factors (tensors rope_factors_short /
    rope_factors_long), the original context, and the attention factor transformers scales cos and sin by."""
    original = rope.get("original_max_position_embeddings") or config.get("original_max_position_embeddings")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not original or not long or not short or len(long) != head_dim // 2 or len(short) != head_dim // 2:
        raise UserError(
            f"--gguf: phi3 longrope needs original_max_position_embeddings and long_factor / short_factor of {head_dim // 2} values each"
        )
    factor = rope.get("factor") or config["max_position_embeddings"] / original  # as transformers' longrope
    attention = rope.get("attention_factor")
    if attention is None:
        attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1.0 else 1.0
    return {"original_max_position_embeddings": original, "attention_factor": attention}


def _llama3_freq_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's rope_freqs tensor for llama3 rope scaling: what each frequency is divided by."""
    factor, low, high = rope["factor"], rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _rope_tensors(rope: dict) -> dict:
    """The computed rope tensors llama.cpp reads: rope_freqs (llama3), rope_factors_long / _short (phi3 longrope)."""
    import gguf

    if rope["rope_type"] == "llama3":
        return {gguf.MODEL_TENSOR.ROPE_FREQS: _llama3_freq_factors(rope, rope["head_dim"])}
    if rope["rope_type"] == "longrope":
        return {
            gguf.MODEL_TENSOR.ROPE_FACTORS_LONG: np.array(rope["long_factor"], dtype=np.float32),
            gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT: np.array(rope["short_factor"], dtype=np.float32),
        }
    return {}


def _add_architecture(writer, config: dict, arch: Architecture, n_vocab: int, file_type) -> dict:
    import gguf

    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(file_type)
    rope = _rope(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] in ("linear", "yarn"):
        kind = gguf.RopeScalingType.LINEAR if rope["rope_type"] == "linear" else gguf.RopeScalingType.YARN
        writer.add_rope_scaling_type(kind)
        writer.add_rope_scaling_factor(rope["factor"])
        if rope.get("original_max_position_embeddings"):
            writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if rope["rope_type"] == "longrope":  # no scaling type: llama.cpp's phi3 reads the factor tensors
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_attn_factors(rope["attention_factor"])
    if arch.metadata:
        arch.metadata(writer, config)
    return rope | {"head_dim": head_dim}


# ---------------------------------------------------------------- the tokenizer


@dataclass
class Vocabulary:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece-style, byte fallback)
    pre: str | None  # tokenizer.ggml.pre for gpt2
    tokens: list[str]
    scores: list[float]
    types: list[int]


def vocabulary(folder: Path, n_vocab: int) -> Vocabulary:
    """The tokens of tokenizer.json in id order, padded to the embedding rows, typed as llama.cpp reads them."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"--gguf: {folder} has no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(path.read_text())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(
            f"--gguf: a {model.get('type')} tokenizer is not supported; GGUF export writes BPE (gpt2, llama3, qwen2) and SentencePiece-BPE (llama, mistral) vocabularies"
        )
    spm = bool(model.get("byte_fallback"))
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    by_id.update({i: a["content"] for i, a in added.items()})
    if max(by_id) >= n_vocab:
        raise RunError(f"--gguf: the tokenizer has ids up to {max(by_id)} but the model only {n_vocab} embedding rows")
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:  # embedding rows the tokenizer never produces (vocab padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            if text == model.get("unk_token"):
                types.append(gguf.TokenType.UNKNOWN)
            elif i in added:
                types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
            elif spm and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                types.append(gguf.TokenType.BYTE)
            else:
                types.append(gguf.TokenType.NORMAL)
        # SentencePiece merges by score; a converted tokenizer keeps its pieces in score order, so -id ranks them
        scores.append(-float(i) if spm else 0.0)
    pre = None if spm else _pre_tokenizer(spec.get("pre_tokenizer"))
    return Vocabulary("llama" if spm else "gpt2", pre, tokens, scores, [int(t) for t in types])


def _pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's name for the tokenizer's splitting regex; 'default' (logged by the caller) when unknown."""
    steps = (pre or {}).get("pretokenizers") or ([pre] if pre else [])
    types = [step.get("type") for step in steps]
    if types == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # every digit apart, then GPT-2's regex (SmolLM, SmolLM2)
    for step in steps:
        if step.get("type") == "Split" and (regex := step.get("pattern", {}).get("Regex")) in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[regex]
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            return "gpt-2"
    return "default"


def adds(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer adds a BOS / EOS to a text: asked directly (its configs spell it many ways)."""
    ids = tokenizer("a")["input_ids"]
    return {
        "bos": tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id],
        "eos": tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id],
    }


def _add_tokenizer(writer, folder: Path, vocab: Vocabulary) -> None:
    import gguf
    from transformers import AutoTokenizer

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(folder, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    special.add_special_token.update(adds(tokenizer))
    if special.chat_template is None and tokenizer.chat_template:
        special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


# ---------------------------------------------------------------- tensors


@dataclass
class _Tensor:
    gguf_name: str
    file: Path | None  # the safetensors shard; None for a computed tensor
    hf_name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # q/k: heads to permute for llama.cpp's rope; 0 none
    shift: float = 0.0  # added to the weights (Gemma's 1 + w norms)
    data: np.ndarray | None = None  # a computed tensor (rope_freqs)


def _qtype(shape: tuple[int, ...], gguf_type: str):
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) == 1:
        return Q.F32  # norms and biases: llama.cpp keeps them in f32
    if gguf_type == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0]:
        return Q.F16  # rows that do not fill whole q8_0 blocks
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]


def _plan_tensors(folder: Path, config: dict, arch: Architecture, gguf_type: str) -> list[_Tensor]:
    import gguf
    from safetensors import safe_open

    gguf_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch.name)
    names = gguf.get_tensor_name_map(gguf_arch, config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    planned = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise RunError(f"--gguf: {file.name}: tensor {name} has no GGUF name for {config['model_type']}")
                shape = tuple(f.get_slice(name).get_shape())
                heads_to_permute = 0
                if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
                    heads_to_permute = heads
                elif arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
                    heads_to_permute = kv_heads
                shift = arch.norm_shift if name.endswith("norm.weight") else 0.0
                planned.append(_Tensor(gguf_name, file, name, shape, _qtype(shape, gguf_type), heads_to_permute, shift))
    return planned


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows to the adjacent-pair order llama.cpp's llama rope expects."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_data(t: _Tensor) -> np.ndarray:
    import gguf
    from safetensors import safe_open

    if t.data is not None:
        data = t.data
    else:
        with safe_open(str(t.file), framework="pt") as f:
            data = f.get_tensor(t.hf_name).float().numpy()
    if t.permute_heads:
        data = _permute(data, t.permute_heads)
    if t.shift:
        data = data + t.shift
    Q = gguf.GGMLQuantizationType
    if t.qtype == Q.F32:
        return data.astype(np.float32)
    if t.qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), t.qtype)


def write(merged: Path, out_dir: Path, name: str, gguf_type: str, log=print) -> Path:
    """Convert the merged folder to out_dir/<name>-<type>.gguf, one tensor in memory at a time; returns the file."""
    import gguf

    config = json.loads((merged / "config.json").read_text())
    check_config(config, "causal_lm")
    arch = ARCHITECTURES[config["model_type"]]
    file_type = {
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gguf_type]
    tensors = _plan_tensors(merged, config, arch, gguf_type)
    n_vocab = next(t.shape[0] for t in tensors if t.gguf_name == "token_embd.weight")
    vocab = vocabulary(merged, n_vocab)
    if vocab.pre == "default":
        log(
            "gguf warning: the tokenizer's pre-tokenizer is not one llama.cpp names; it will split text its default way"
        )
    for caveat in arch.caveats(config) if arch.caveats else []:
        log(caveat)

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / file_name(name, gguf_type)
    writer = gguf.GGUFWriter(path, arch.name)
    writer.add_name(name)
    rope = _add_architecture(writer, config, arch, n_vocab, file_type)
    tensors[:0] = [
        _Tensor(
            gguf.TENSOR_NAMES[kind] + ".weight", None, "", factors.shape, gguf.GGMLQuantizationType.F32, data=factors
        )
        for kind, factors in _rope_tensors(rope).items()
    ]
    _add_tokenizer(writer, merged, vocab)
    for t in tensors:
        byte_shape = (
            t.shape
            if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            else gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
        )
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
            t.qtype, np.uint8
        )
        nbytes = int(np.prod(byte_shape)) * np.dtype(dtype).itemsize
        writer.add_tensor_info(t.gguf_name, byte_shape, np.dtype(dtype), nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(_tensor_data(t))
    writer.close()
    return path
