"""The memory planner: the peak memory of a training run on its device, estimated before any weight is loaded.

It reads the model's config (through the model plan, or lora_sft's table of known models when the config cannot
be read) and the recipe, never weights, and sums one term per thing that lives in memory at the peak of a
training step: the quantized base and its constants, the weights kept unquantized, the LoRA weights with their
gradients and optimizer states, the activations kept for the backward pass (with or without gradient
checkpointing), the loss's logits, and the runtime's own overhead. `plan_memory` then resolves the settings the
run trains with: the micro batch and grad_accum under `train.memory_budget`, and `train.gradient_checkpointing:
auto`; a run that cannot fit its budget is refused with the settings that would make it fit.

Every formula has a one-line comment saying where it comes from. Sizes are bytes; GiB = 2**30 bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch

from lora_sft.errors import UserError
from lora_sft.model.loss import chunk_positions  # the loss's output layer runs this many positions at a time
from lora_sft.recipe.schema import Recipe, memory_bytes

if TYPE_CHECKING:
    from lora_sft.model.load import ModelPlan

GIB = 2**30
TABLE_NOTE = "shape from lora_sft's table of known models"

# bitsandbytes' 4-bit quantization: one absmax per block of 64 weights (bnb_4bit blocksize, QLoRA paper sec. 2).
QUANT_BLOCK = 64
# Double quantization: the absmax values are themselves quantized to 8 bits in blocks of 256 (QLoRA paper sec. 3).
DOUBLE_QUANT_BLOCK = 256
# bitsandbytes' 8-bit optimizers: blockwise-quantized states, one fp32 absmax per block of 2048 values
# (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization"); tensors under 4096 values stay 32-bit.
OPTIM_8BIT_BLOCK, OPTIM_8BIT_MIN_SIZE = 2048, 4096
# CUDA: the context (driver, kernels, cuBLAS handles) that torch creates before the first tensor: about 0.5 GiB on
# current drivers with lazy module loading (nvidia-smi on a fresh `torch.zeros(1, device="cuda")`); it is not part of
# torch.cuda.max_memory_allocated.
CUDA_CONTEXT = 512 * 2**20
# CUDA: the caching allocator reserves more than it hands out (block rounding, fragmentation); 10% of what the run
# allocates is the usual gap between torch.cuda.max_memory_reserved and max_memory_allocated in LoRA training.
CUDA_ALLOCATOR_SLACK = 0.10
# CPU: glibc keeps freed blocks and tensors are allocated in pages; calibrated on benchmarks/planner_vs_measured.py's
# CPU tables (the peak RSS over the planned bytes, beyond the baseline and CPU_STEP_RUNTIME). Small: the heap the
# load leaves behind (the quantized layers' fp32 copies, freed) is reused by the step's activations.
CPU_ALLOCATOR_SLACK = 0.03
# CPU: what the first training step adds to the process whatever the model: the kernels' code pages torch touches
# for the backward and the optimizer (libtorch_cpu is mapped, not read, until then), the autograd engine and the
# OpenMP/oneDNN thread pools and their scratch (peak RSS of the first step over the planned tensors, measured on
# MiniLM, SmolLM2 and a random Llama: 40-200 MiB; benchmarks/planner_vs_measured.py)
CPU_STEP_RUNTIME = 96 * 2**20
# CPU: the forward's freed temporaries (the MLP's and attention's intermediates) stay resident: tensors under glibc's
# mmap threshold (raised to 32 MiB once the load frees its large fp32 tensors) come from the heap, and the ones kept
# for the backward, allocated between them, keep it from shrinking. Measured on SmolLM2 at micro batch 4 x 256: the
# tensors saved for the backward 1,205 MiB (saved_tensors_hooks), the RSS after the forward 2,259 MiB more than before
CPU_HEAP_FRAGMENTATION = 0.75
# CPU, with activation recompute: the same, layer by layer. Each checkpointed layer frees its temporaries, but the
# layer output kept for the backward is allocated after them, so the heap grows by part of a layer's temporaries per
# layer (SmolLM2-135M, chat quickstart rows, micro batch 8: the RSS rose 27 MiB per layer through the forward; the
# peak over the other terms was 0.41 of a layer's temporaries x its 30 layers; benchmarks/planner_vs_measured.py
# --real). Negligible on a 4-layer model, a third of the peak on SmolLM2's 30. Only tensors under glibc's largest
# mmap threshold come from the heap: larger ones (Llama-8B's 4,096 x 14,336 MLP temporaries) are mapped and unmapped
# whole and leave nothing behind.
CPU_RECOMPUTE_FRAGMENTATION = 0.41
CPU_MMAP_THRESHOLD = 32 * 2**20


# ---------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class ModelShape:
    """The config.json fields the planner needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    source: str = "config.json"  # or TABLE_NOTE

    @classmethod
    def from_config(cls, config: Any, source: str = "config.json") -> ModelShape:
        def get(key: str, default: Any = None) -> Any:
            return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)

        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(
            hidden=hidden,
            intermediate=int(get("intermediate_size") or 4 * hidden),
            layers=int(get("num_hidden_layers")),
            heads=heads,
            kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab=int(get("vocab_size")),
            tied=bool(get("tie_word_embeddings", True)),
            source=source,
        )

    def llama_linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of a Llama-shaped decoder (the layout the table's models share)."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = {
            "self_attn.q_proj": (h, q),
            "self_attn.k_proj": (h, kv),
            "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }
        return {f"model.layers.{n}.{k}": v for n in range(self.layers) for k, v in per_layer.items()}


def _known_table() -> dict:
    """lora_sft/known_models.json: model name -> its config fields and the other ids it goes by."""
    return json.loads(resources.files("lora_sft.model").joinpath("known_models.json").read_text())["models"]


def known_shape(model_path: str) -> ModelShape | None:
    """The shape of a hub model from lora_sft's table of known models (package data), or None."""
    table = _known_table()
    wanted = model_path.lower()
    for name, entry in table.items():
        if wanted in (n.lower() for n in [name, *entry["also"]]):
            return ModelShape.from_config(entry, TABLE_NOTE)
    return None


def known_models() -> dict[str, ModelShape]:
    table = _known_table()
    return {name: ModelShape.from_config(entry, TABLE_NOTE) for name, entry in table.items()}


# ---------------------------------------------------------------- what the run holds


@dataclass(frozen=True)
class Workload:
    """Everything the estimate depends on besides the micro batch and checkpointing."""

    shape: ModelShape
    linears: dict[str, tuple[int, int]]  # (in, out) of the base's linear layers: what quant.mode quantizes
    targets: dict[str, tuple[int, int]]  # the LoRA'd ones
    unquantized_params: int  # embeddings, an untied output layer, norms, biases, heads: kept in the compute dtype
    extra_trainable: int  # trainable beyond LoRA's A and B: modules_to_save, new token rows, DoRA magnitudes
    sequence: int  # tokens per row at the longest
    sequence_from: str  # "data.max_length" or "the longest tokenized row"
    device: str  # "cuda" or "cpu"
    dtype_bytes: int  # the compute dtype
    baseline: int = 0  # CPU: the process's RSS when it planned (after imports, data, tokenizer); 0 on CUDA
    gated_mlp: bool = True  # SwiGLU (gate, up, down) as in Llama, or a plain two-layer MLP (BERT)
    causal: bool = True  # a causal LM computes the vocabulary logits; a classifier a few labels
    shards: int = 0  # FSDP: the processes the model is divided among (train.distributed fsdp); 0: not sharded
    # CPU: bytes per weight of the weight files when the load keeps them mapped (file dtype = compute dtype), else 0
    mapped_file_bytes: int = 0


def _targets_without_plan(recipe: Recipe, linears: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """LoRA targets among a Llama layout's names, with peft's matching rules (model.resolve_targets')."""
    spec, lo = recipe.lora.target_modules, recipe.lora
    if spec == "all-linear":
        chosen = list(linears)
    elif isinstance(spec, str):
        chosen = [n for n in linears if re.fullmatch(spec, n)] or list(linears)
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in spec)] or list(linears)
    if lo.layers is not None:
        chosen = [n for n in chosen if int(n.split(".")[2]) in lo.layers]
    return {n: linears[n] for n in chosen}


def _lora_params(recipe: Recipe, targets: dict[str, tuple[int, int]]) -> int:
    # LoRA adds A (r x in) and B (out x r) per target, and DoRA a magnitude per output feature (peft's LoraLayer)
    r, dora = recipe.lora.rank, recipe.lora.dora
    return sum(r * (i + o) + (o if dora else 0) for i, o in targets.values())


def file_dtype_bytes(config: Any) -> int:
    """Bytes per weight of the base's weight files, from the config's dtype (fp32 when it names none: what
    save_pretrained writes without one)."""
    dtype = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    if config is not None and not isinstance(config, dict):
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4


def current_rss() -> int:
    """The process's resident memory now (/proc/self/statm), 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def workload(
    recipe: Recipe,
    plan: ModelPlan | None,
    shape: ModelShape,
    sequence: int | None = None,
    device: str | None = None,
    baseline: int | None = None,
    shards: int | None = None,
) -> Workload:
    """What the run holds, from the model plan (exact module shapes) or, without one, a Llama layout of `shape`.
    `sequence`: the longest tokenized row when known (else data.max_length). `shards`: the processes FSDP divides
    the model among (default: the launcher's, under train.distributed fsdp; 0 for none)."""
    from lora_sft.distributed import fsdp_shards
    from lora_sft.model.load import compute_dtype

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_bytes = torch.empty((), dtype=compute_dtype(recipe.quant)).element_size()
    if plan is not None and plan.linear_shapes:
        linears = dict(plan.linear_shapes)
        targets = {n: linears[n] for n in plan.targets if n in linears}
        unquantized = plan.total_params - sum(i * o for i, o in linears.values())
        extra = max(plan.trainable_params - _lora_params(recipe, targets), 0)
        gated = any(n.endswith(("gate_proj", "gate_up_proj", "w1", "w3")) for n in linears)
    else:
        linears = shape.llama_linears()
        targets = _targets_without_plan(recipe, linears)
        # embedding, the output layer when untied, two RMSNorms per layer and the final one (Llama's modules)
        unquantized = shape.vocab * shape.hidden * (1 if shape.tied else 2) + (2 * shape.layers + 1) * shape.hidden
        extra, gated = 0, True
    max_length = recipe.data.max_length
    file_bytes = file_dtype_bytes(plan.config) if plan is not None else 0  # unknown without the config
    return Workload(
        shape=shape,
        linears=linears,
        targets=targets,
        unquantized_params=unquantized,
        extra_trainable=extra,
        sequence=min(sequence, max_length) if sequence else max_length,
        sequence_from="the longest tokenized row" if sequence and sequence < max_length else "data.max_length",
        device=device,
        dtype_bytes=dtype_bytes,
        baseline=(current_rss() if baseline is None else baseline) if device == "cpu" else 0,
        gated_mlp=gated,
        causal=recipe.task == "causal_lm",
        shards=fsdp_shards(recipe) if shards is None else shards,
        # on CPU transformers loads a weight of the compute dtype as a view into the memory-mapped file
        # (safetensors), so the map stays open as long as the unquantized weights live; the layers quantized from it
        # leave their original pages resident (measured: SmolLM2's fp32 file, 405 MiB of linear weights, all in RSS)
        mapped_file_bytes=file_bytes if device == "cpu" and file_bytes == dtype_bytes else 0,
    )


# ---------------------------------------------------------------- the estimate


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    how: str  # the formula, in words


@dataclass(frozen=True)
class Estimate:
    """The peak memory of one configuration of the run, term by term."""

    device: str
    micro_batch: int
    sequence: int
    checkpointing: bool
    terms: tuple[Term, ...]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def allocated(self) -> int:
        """What torch allocates (torch.cuda.max_memory_allocated on a GPU): all but the runtime overhead."""
        return sum(t.bytes for t in self.terms if t.name != "runtime")

    def term(self, name: str) -> int:
        return next(t.bytes for t in self.terms if t.name == name)


def _quantized_terms(recipe: Recipe, work: Workload) -> list[Term]:
    mode, p = recipe.quant.mode, work.dtype_bytes
    weights = sum(i * o for i, o in work.linears.values())
    if mode == "none":
        return [Term("base weights", weights * p, f"{weights:,} linear weights x {p} bytes (compute dtype)")]
    if mode == "int8":
        # LLM.int8: one byte per weight and an fp32 scale per output row (bitsandbytes Int8Params.SCB)
        rows = sum(o for _, o in work.linears.values())
        return [
            Term("base weights", weights, f"{weights:,} linear weights x 1 byte (int8)"),
            Term("quantization constants", 4 * rows, f"{rows:,} output rows x 4 bytes (fp32 scale per row)"),
        ]
    # 4 bits per weight; one absmax per block of 64 weights, per tensor (bitsandbytes rounds each tensor up)
    blocks = sum(math.ceil(i * o / QUANT_BLOCK) for i, o in work.linears.values())
    if recipe.quant.double_quant:
        # 8-bit absmax per block + an fp32 second-level absmax per 256 blocks (QLoRA's double quantization)
        second = sum(math.ceil(math.ceil(i * o / QUANT_BLOCK) / DOUBLE_QUANT_BLOCK) for i, o in work.linears.values())
        constants, how = blocks + 4 * second, f"{blocks:,} blocks of 64 x 1 byte + {second:,} blocks of 256 x 4 bytes"
    else:
        constants, how = 4 * blocks, f"{blocks:,} blocks of 64 x 4 bytes (fp32 absmax)"
    largest = max(i * o for i, o in work.linears.values())
    return [
        Term("base weights", weights // 2, f"{weights:,} linear weights x 0.5 byte ({mode})"),
        Term("quantization constants", constants, how),
        # a 4-bit layer is dequantized to the compute dtype for its matmul, one layer at a time (bitsandbytes MatMul4Bit)
        Term(
            "dequantized layer",
            largest * p,
            f"the largest linear layer ({largest:,} weights) x {p} bytes, while it runs",
        ),
    ]


def _optimizer_term(recipe: Recipe, work: Workload) -> tuple[Term, list[str]]:
    name, r = recipe.train.optimizer, recipe.lora.rank
    tensors = [n for i, o in work.targets.values() for n in (r * i, r * o)] + (
        [work.extra_trainable] if work.extra_trainable else []
    )
    params = sum(tensors)
    notes = []
    if name in ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit"):
        # AdamW: exp_avg and exp_avg_sq, fp32 (torch.optim.AdamW; bitsandbytes' 32-bit paged AdamW the same)
        size, how = 8 * params, f"{params:,} params x 2 states x 4 bytes (fp32)"
    elif name in ("adamw_8bit", "paged_adamw_8bit"):
        # two 1-byte states + an fp32 absmax per 2048-value block; tensors under 4096 values stay fp32 (bitsandbytes)
        small = sum(n for n in tensors if n < OPTIM_8BIT_MIN_SIZE)
        big = params - small
        size = 2 * big + 2 * 4 * sum(math.ceil(n / OPTIM_8BIT_BLOCK) for n in tensors if n >= OPTIM_8BIT_MIN_SIZE)
        size += 8 * small
        how = f"{big:,} params x 2 states x 1 byte + block constants" + (
            f", {small:,} in small tensors fp32" if small else ""
        )
    elif name == "adafactor":
        # Adafactor (transformers' default: no first moment): factored second moment, a row and a column vector per
        # matrix, fp32
        dims = [d for i, o in work.targets.values() for d in (r + i, o + r)]
        size = 4 * (sum(dims) + work.extra_trainable)
        how = "fp32 row and column second moments per matrix"
    else:  # sgd: torch.optim.SGD without momentum (Trainer's "sgd") keeps no state
        size, how = 0, "plain SGD keeps no state"
    if name.startswith("paged_"):
        notes.append(
            f"{name}: the optimizer states sit in paged (unified) memory, which moves to CPU memory when the GPU runs short: counted here as GPU memory, though torch.cuda.max_memory_allocated does not count them"
        )
    return Term("optimizer states", size, f"{name}: {how}"), notes


def layer_activation_bytes(recipe: Recipe, work: Workload) -> tuple[int, int]:
    """Bytes a layer keeps for its backward pass, per token: (summed over all layers, the largest layer)."""
    s, p = work.shape, work.dtype_bytes
    per_layer: dict[str, int] = {}
    r, dropout = recipe.lora.rank, recipe.lora.dropout > 0
    for name, (n_in, _) in work.targets.items():
        # LoRA keeps A's output (r values) for B, and with dropout its dropped copy of the input and the mask (peft)
        layer = name.split(".layers.")[-1].split(".")[0] if ".layers." in name else name
        per_layer[layer] = per_layer.get(layer, 0) + r * p + (n_in * (p + 1) if dropout else 0)
    base = sum(per for per, _ in _layer_tensors(work)) + 4 * s.heads  # + SDPA's fp32 logsumexp per head
    return base * s.layers + sum(per_layer.values()), base + max(per_layer.values(), default=0)


def _layer_tensors(work: Workload) -> list[tuple[int, int]]:
    """The tensors a layer keeps for its backward, by kind: (bytes per token, bytes per token of one such tensor)."""
    s, p = work.shape, work.dtype_bytes
    h, i, hd = s.hidden, s.intermediate, s.head_dim
    return [
        # RMSNorm/LayerNorm upcast to fp32 and keep it, plus their output in the compute dtype; two per layer
        (2 * (4 * h + p * h), 4 * h),
        # SDPA keeps q, k (after RoPE), v and its output, o_proj keeps the output's contiguous copy
        (p * hd * 3 * s.heads, p * hd * s.heads),  # q, the output, o_proj's copy
        (p * hd * 2 * s.kv_heads, p * hd * s.kv_heads),  # k, v
        # SwiGLU keeps gate, silu(gate), up and their product (down's input); a plain MLP its input to and output of
        # the activation
        ((4 if work.gated_mlp else 2) * i * p, i * p),
    ]


def _heap_temporaries(work: Workload, tokens: int) -> int:
    """The bytes of one layer's temporaries (`_layer_tensors`) in tensors small enough for glibc to take from its heap
    (under CPU_MMAP_THRESHOLD); a larger tensor is mapped on its own."""
    return sum(tokens * per for per, tensor in _layer_tensors(work) if tokens * tensor < CPU_MMAP_THRESHOLD)


def estimate(recipe: Recipe, work: Workload, micro_batch: int, checkpointing: bool) -> Estimate:
    """The peak memory of a training step of `recipe` at this micro batch, with or without checkpointing."""
    s, p = work.shape, work.dtype_bytes
    tokens = micro_batch * work.sequence
    terms = _quantized_terms(recipe, work)
    terms.append(
        Term(
            "unquantized weights",
            work.unquantized_params * p,
            f"{work.unquantized_params:,} params (embeddings, {'tied output layer' if s.tied else 'output layer'}, norms, biases, heads) x {p} bytes",
        )
    )
    if work.mapped_file_bytes and recipe.quant.mode != "none":
        weights = sum(i * o for i, o in work.linears.values())
        terms.append(
            Term(
                "weight file pages",
                weights * work.mapped_file_bytes,
                f"{weights:,} linear weights x {work.mapped_file_bytes} bytes: their original values in the weight file, mapped while the unquantized weights point into it (RSS counts its pages)",
            )
        )
    trainable = _lora_params(recipe, work.targets) + work.extra_trainable
    # peft keeps the adapter in fp32 (autocast_adapter_dtype) and its gradients likewise
    terms.append(Term("lora weights", 4 * trainable, f"{trainable:,} trainable params x 4 bytes (fp32)"))
    terms.append(Term("lora gradients", 4 * trainable, f"{trainable:,} gradients x 4 bytes (fp32)"))
    optimizer, notes = _optimizer_term(recipe, work)
    terms.append(optimizer)
    all_layers, one_layer = layer_activation_bytes(recipe, work)
    final_norm = 4 * s.hidden + p * s.hidden  # the final norm's fp32 input and its output (the output layer's input)
    if checkpointing:
        # non-reentrant checkpointing keeps each layer's input, and recomputes one layer at a time in the backward
        act = tokens * (s.layers * s.hidden * p + one_layer + final_norm)
        how = f"{tokens:,} tokens x ({s.layers} layer inputs x {s.hidden} x {p} bytes + one layer recomputed {one_layer:,} bytes + final norm)"
    else:
        act = tokens * (all_layers + final_norm)
        how = (
            f"{tokens:,} tokens x {s.layers} layers x {all_layers // s.layers:,} bytes per token and layer + final norm"
        )
    terms.append(Term("activations", act, how))
    if work.device == "cpu" and checkpointing:
        temporaries = s.layers * _heap_temporaries(work, tokens)
        terms.append(
            Term(
                "heap fragmentation",
                int(CPU_RECOMPUTE_FRAGMENTATION * temporaries),
                f"{CPU_RECOMPUTE_FRAGMENTATION:.0%} of each recomputed layer's heap-allocated temporaries (tensors under {CPU_MMAP_THRESHOLD >> 20} MiB) x {s.layers} layers: freed, but kept by glibc's heap beneath the layer outputs saved after them (measured)",
            )
        )
    elif work.device == "cpu":
        terms.append(
            Term(
                "heap fragmentation",
                int(CPU_HEAP_FRAGMENTATION * act),
                f"{CPU_HEAP_FRAGMENTATION:.0%} of the activations: the forward's freed temporaries, kept by glibc's heap between the tensors saved for the backward (measured)",
            )
        )
    if work.causal:
        # the loss runs the output layer on at most `chunk_positions(vocab)` positions at a time (loss._frozen_chunks):
        # a chunk's fp32 logits and logsumexp's temporary of their size (2 x 4 bytes), + the previous chunk's softmax,
        # still referenced while the next chunk's logits are made, when there are several chunks (4 bytes more); plus
        # the compute-dtype logits before the upcast when that is not fp32
        chunk = chunk_positions(s.vocab)
        positions = min(tokens, chunk)
        per = (8 if tokens <= chunk else 12) + (p if p != 4 else 0)
        chunks = "one chunk" if tokens <= chunk else f"chunks of {chunk:,}"
        terms.append(
            Term(
                "loss logits",
                positions * s.vocab * per,
                f"{positions:,} positions ({chunks}) x {s.vocab:,} vocab x {per} bytes",
            )
        )
    else:
        terms.append(Term("loss logits", 0, "a classifier's logits are a few values per row"))
    if work.shards:
        terms = _sharded(recipe, work, terms, tokens)
        notes.append(
            f"FSDP over {work.shards} processes: the estimate is per process (GPU); each one divides the model, its gradients and optimizer states {work.shards} ways and keeps its own batch's activations"
        )
    planned = sum(t.bytes for t in terms)
    if work.device == "cuda":
        runtime = CUDA_CONTEXT + int(CUDA_ALLOCATOR_SLACK * planned)
        how = f"CUDA context {gib(CUDA_CONTEXT)} + caching-allocator slack {CUDA_ALLOCATOR_SLACK:.0%}"
    else:
        runtime = work.baseline + CPU_STEP_RUNTIME + int(CPU_ALLOCATOR_SLACK * planned)
        how = f"the process before loading {gib(work.baseline)} (measured) + the first step's kernels and threads {gib(CPU_STEP_RUNTIME)} + allocator slack {CPU_ALLOCATOR_SLACK:.0%}"
    terms.append(Term("runtime", runtime, how))
    return Estimate(work.device, micro_batch, work.sequence, checkpointing, tuple(terms), tuple(notes))


# Terms FSDP divides among its processes: every weight, gradient and optimizer state (each process keeps 1/N of
# each tensor, torch's fully_shard); the activations and the loss of a process's own batch are not divided.
SHARDED_TERMS = (
    "base weights",
    "quantization constants",
    "unquantized weights",
    "lora weights",
    "lora gradients",
    "optimizer states",
)
LAYER_NUMBER = re.compile(r"\.(?:layers|layer|h|block|blocks)\.(\d+)\.")  # a decoder layer's index in module names


def _sharded(recipe: Recipe, work: Workload, terms: list[Term], tokens: int) -> list[Term]:
    """FSDP over `work.shards` processes: the model's terms divided among them, what FSDP gathers whole for a
    step added, and the loss from the model's own forward (`loss.plain_path_reason`: all logits at once)."""
    n, p, s = work.shards, work.dtype_bytes, work.shape
    out = []
    for t in terms:
        if t.name in SHARDED_TERMS:
            out.append(Term(t.name, math.ceil(t.bytes / n), f"({t.how}) / {n} processes (FSDP shards)"))
        elif t.name == "loss logits" and work.causal:
            # the model's forward computes the logits of every position: fp32 logits, their log-softmax and its
            # gradient (3 x 4 bytes), plus the compute-dtype logits when that is not fp32
            per = 12 + (p if p != 4 else 0)
            out.append(Term(t.name, tokens * s.vocab * per, f"{tokens:,} positions x {s.vocab:,} vocab x {per} bytes"))
        else:
            out.append(t)
    layers: dict[str, dict[str, tuple[int, int]]] = {}
    for name, size in work.linears.items():
        m = LAYER_NUMBER.search(name)
        layers.setdefault(m.group(1) if m else name, {})[name] = size

    def gathered(linears: dict[str, tuple[int, int]]) -> int:
        # one layer as it is stored (4-bit weights and constants), its two norms, and its LoRA in the compute dtype
        stored = _quantized_terms(recipe, replace(work, linears=linears))
        lora = _lora_params(recipe, {k: v for k, v in linears.items() if k in work.targets})
        return sum(t.bytes for t in stored if t.name != "dequantized layer") + 2 * s.hidden * p + lora * p

    layer = max(gathered(linears) for linears in layers.values())
    # accelerate keeps the final norm and the output layer gathered from the forward to the backward
    head = s.vocab * s.hidden * p if work.causal else 0
    out.append(
        Term(
            "fsdp gathered",
            2 * layer + head,
            f"the largest layer gathered whole ({layer:,} bytes) and the next one fetched ahead, + the output layer ({head:,} bytes)",
        )
    )
    return out


# ---------------------------------------------------------------- the device, the budget and the settings


@dataclass(frozen=True)
class DeviceMemory:
    kind: str  # "cuda" or "cpu"
    total: int
    available: int  # what the run may take: free GPU memory + the context already counted, or MemAvailable + own RSS

    @classmethod
    def read(cls, baseline: int = 0) -> DeviceMemory:
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            # mem_get_info has created the context, which the estimate counts: add it back
            return cls("cuda", total, free + CUDA_CONTEXT)
        info = {}
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    key, value = line.split(":", 1)
                    info[key] = int(value.split()[0]) * 1024
        except (OSError, ValueError):
            pass
        total = info.get("MemTotal", 0)
        # MemAvailable leaves out this process's own pages, which the estimate counts (its baseline)
        return cls("cpu", total, info.get("MemAvailable", total) + baseline)

    def describe(self) -> str:
        name = "GPU" if self.kind == "cuda" else "CPU memory"
        return f"{name}: {gib(self.available)} available of {gib(self.total)}"


def gib(n: int) -> str:
    """A size as a person reads it: GiB from 1 GiB up, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class MemoryPlan:
    """The estimate for the settings the run trains with, and how they were chosen."""

    estimate: Estimate
    device: DeviceMemory
    budget: int | None  # bytes (train.memory_budget), None without one
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    work: Workload = field(repr=False)
    picked: str | None = None  # what the budget or `auto` decided, as a line

    def apply(self, recipe: Recipe) -> Recipe:
        """The recipe training uses: these settings in its train section (saved_dict still gives the user's)."""
        return recipe.with_train(
            micro_batch_size=self.micro_batch_size,
            grad_accum=self.grad_accum,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def lines(self, processes: int = 1) -> list[str]:
        """The estimate, term by term, and its verdict. `processes` > 1 (DDP under a launcher): the estimate is
        per process, each holding the whole quantized model on its own GPU."""
        e, w = self.estimate, self.work
        source = f"; {TABLE_NOTE}" if w.shape.source == TABLE_NOTE else ""
        where = f"on {'the GPU' if e.device == 'cuda' else 'the CPU'}"
        if processes > 1:  # DDP: every process holds the whole quantized model and its own activations
            where = f"per {'GPU' if e.device == 'cuda' else 'process'} ({processes} processes, each holding the whole model)"
        out = [
            f"memory estimate {where}: {gib(e.total)} at micro batch {e.micro_batch}, sequence {e.sequence} ({w.sequence_from}), gradient checkpointing {'on' if e.checkpointing else 'off'}{source}"
        ]
        out += [f"  {t.name}: {gib(t.bytes)} ({t.how})" for t in e.terms]
        out += [f"  note: {n}" for n in e.notes]
        limit = self.budget if self.budget is not None else self.device.available
        against = f"the budget of {gib(self.budget)}" if self.budget is not None else self.device.describe()
        verdict = "fits" if e.total <= limit else "does NOT fit (the run may run out of memory)"
        out.append(f"verdict: {verdict} in {against}")
        if self.picked:
            out.append(self.picked)
        return out


def budget_bytes(recipe: Recipe, device: DeviceMemory) -> int | None:
    b = recipe.train.memory_budget
    return None if b is None else device.available if b == "auto" else memory_bytes(b)


def _choices(recipe: Recipe) -> list[bool]:
    g = recipe.train.gradient_checkpointing
    return [False, True] if g == "auto" else [bool(g)]


def plan_memory(
    recipe: Recipe,
    work: Workload,
    device: DeviceMemory | None = None,
    keep_micro_batch: int | None = None,
) -> MemoryPlan:
    """The settings the run trains with. With train.memory_budget: the largest micro batch (a divisor of the
    effective batch) that fits, checkpointing off whenever some micro batch fits without it (recomputation costs
    about a third of every step; a smaller micro batch at the same effective batch costs less), else on; a run
    that cannot fit is refused. Without a budget: the recipe's micro batch, and `auto` checkpointing on only when
    the run would not fit the device's available memory without it. `keep_micro_batch`: a resumed run keeps the
    micro batch its checkpoint was trained with (its data order depends on it), under a budget; refused if it no
    longer fits."""
    device = device or DeviceMemory.read(work.baseline)
    t = recipe.train
    effective = t.micro_batch_size * t.grad_accum
    budget = budget_bytes(recipe, device)

    def made(micro: int, ckpt: bool, picked: str | None) -> MemoryPlan:
        return MemoryPlan(
            estimate(recipe, work, micro, ckpt), device, budget, micro, effective // micro, ckpt, work, picked
        )

    if budget is None:  # the micro batch as written (a resume keeps it too), checkpointing by the device
        micro, fixed = t.micro_batch_size, t.gradient_checkpointing
        if fixed != "auto":
            return made(micro, bool(fixed), None)
        off = estimate(recipe, work, micro, False)
        ckpt = off.total > device.available
        why = "more than" if ckpt else "within"
        return made(
            micro,
            ckpt,
            f"gradient checkpointing (auto): {'on' if ckpt else 'off'}, the run without it needs about {gib(off.total)}, {why} the {gib(device.available)} available",
        )
    micros = [keep_micro_batch] if keep_micro_batch else [m for m in range(effective, 0, -1) if effective % m == 0]
    for ckpt in _choices(recipe):
        for micro in micros:
            e = estimate(recipe, work, micro, ckpt)
            if e.total <= budget:
                kept = " (the micro batch of the checkpoint resumed from)" if keep_micro_batch else ""
                return made(
                    micro,
                    ckpt,
                    f"picked for the budget of {gib(budget)}: micro batch {micro}{kept} x grad_accum {effective // micro} (effective batch {effective} kept), gradient checkpointing {'on' if ckpt else 'off'}: about {gib(e.total)}",
                )
    raise UserError(refusal(recipe, work, budget, keep_micro_batch))


def refusal(recipe: Recipe, work: Workload, limit: int, kept: int | None = None) -> list[str]:
    """Why the run cannot fit `limit`, and the settings that would make it fit, each with its estimate."""
    where = recipe.where("train", "memory_budget")
    micro, ckpt = kept or 1, _choices(recipe)[-1]
    least = estimate(recipe, work, micro, ckpt)
    big = sorted(least.terms, key=lambda t: -t.bytes)[:3]
    lines = [
        f"{where}: the run needs about {gib(least.total)} even at micro batch {micro}{' (the checkpoint resumed from was trained with it)' if kept else ''} with gradient checkpointing {'on' if ckpt else 'off'}, more than the budget of {gib(limit)} (largest: {', '.join(f'{t.name} {gib(t.bytes)}' for t in big)})"
    ]
    for setting, total in fixes(recipe, work, limit, micro, ckpt):
        lines.append(f"{where}: it fits with {setting}: about {gib(total)}")
    if len(lines) == 1:
        lines.append(
            f"{where}: nothing lora_sft can change makes it fit; raise the budget or use a device with more memory"
        )
    return lines


def fixes(recipe: Recipe, work: Workload, limit: int, micro: int, ckpt: bool) -> list[tuple[str, int]]:
    """Settings that would make the run fit `limit` (at `micro`, `ckpt`), each with its estimate."""
    out = []
    # a shorter data.max_length: the longest power of two below the sequence that fits
    length = 2 ** (max(work.sequence - 1, 1).bit_length() - 1)
    while length >= 64:
        e = estimate(recipe, replace(work, sequence=length), micro, ckpt)
        if e.total <= limit:
            out.append((f"data.max_length={length}", e.total))
            break
        length //= 2
    # bitsandbytes' optimizers are refused under FSDP (recipe.TrainSection), which divides the states anyway
    if recipe.train.optimizer not in ("adamw_8bit", "paged_adamw_8bit", "sgd") and not work.shards:
        optimizer = "paged_adamw_8bit" if work.device == "cuda" else "adamw_8bit"
        e = estimate(
            recipe.model_copy(update={"train": recipe.train.model_copy(update={"optimizer": optimizer})}),
            work,
            micro,
            ckpt,
        )
        if e.total <= limit:
            out.append((f"train.optimizer={optimizer}", e.total))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in work.targets})
    fewer = [x for x in ("q_proj", "v_proj") if x in leaves] or leaves[:1]
    if len(fewer) < len(leaves):
        targets = {n: s for n, s in work.targets.items() if n.rsplit(".", 1)[-1] in fewer}
        e = estimate(recipe, replace(work, targets=targets), micro, ckpt)
        if e.total <= limit:
            out.append((f"lora.target_modules=[{', '.join(fewer)}]", e.total))
    if recipe.quant.mode in ("none", "int8"):
        nf4 = recipe.model_copy(update={"quant": recipe.quant.model_copy(update={"mode": "nf4", "double_quant": True})})
        e = estimate(nf4, work, micro, ckpt)
        if e.total <= limit:
            out.append(("quant.mode=nf4", e.total))
    smaller = []
    for name, shape in known_models().items():
        other = workload(recipe, None, shape, work.sequence, work.device, work.baseline)
        e = estimate(recipe, other, micro, ckpt)
        params = sum(i * o for i, o in other.linears.values()) + other.unquantized_params
        ours = sum(i * o for i, o in work.linears.values()) + work.unquantized_params
        if e.total <= limit and params < ours:
            smaller.append((e.total, name))
    if smaller:
        total, name = max(smaller)
        out.append((f"a smaller model, e.g. model.path={name}", total))
    return out


def sequence_of(bundle: Any) -> int | None:
    """The longest tokenized training row, when the data was tokenized."""
    if bundle is None or bundle.train is None:
        return None
    if bundle.stats.get("train", {}).get("streamed"):  # data.streaming: any row may come, up to max_length
        return None
    if not len(bundle.train):
        return None
    from lora_sft.data import lengths

    return int(lengths(bundle.train).max())  # from the Arrow column: no row becomes Python objects
