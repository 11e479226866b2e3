"""The memory planner: the peak memory of a training run on its device, estimated before any weight is loaded.

It reads the model's config (through the model plan, or lora_sft's table of known models when the config cannot
be read) and the recipe, never weights, and sums one term per thing that lives in memory at the peak of a
training step: the quantized base and its constants, the weights kept unquantized, the LoRA weights with their
gradients and optimizer states, the activations kept for the backward pass (with or without gradient
checkpointing), the loss's logits, and the runtime's own overhead. `fitting.plan_memory` then resolves the settings the run trains
with (the micro batch and grad_accum under `train.memory_budget`, `train.gradient_checkpointing: auto`); the shape
comes from the config or `shapes`' table of known models.

Every formula has a one-line comment saying where it comes from. Sizes are bytes; GiB = 2**30 bytes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

from lora_sft.model.loss import chunk_positions  # the loss's output layer runs this many positions at a time
from lora_sft.model.shapes import ModelShape, file_dtype_bytes

if TYPE_CHECKING:
    from lora_sft.model.plan import ModelPlan
    from lora_sft.settings import RunSettings

GIB = 2**30

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


def _targets_without_plan(settings: RunSettings, linears: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    """LoRA targets among a Llama layout's names, with peft's matching rules (model.resolve_targets')."""
    spec, lo = settings.lora.target_modules, settings.lora
    if spec == "all-linear":
        chosen = list(linears)
    elif isinstance(spec, str):
        chosen = [n for n in linears if re.fullmatch(spec, n)] or list(linears)
    else:
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in spec)] or list(linears)
    if lo.layers is not None:
        chosen = [n for n in chosen if int(n.split(".")[2]) in lo.layers]
    return {n: linears[n] for n in chosen}


def _lora_params(settings: RunSettings, targets: dict[str, tuple[int, int]]) -> int:
    # LoRA adds A (r x in) and B (out x r) per target, and DoRA a magnitude per output feature (peft's LoraLayer)
    r, dora = settings.lora.rank, settings.lora.dora
    return sum(r * (i + o) + (o if dora else 0) for i, o in targets.values())


def current_rss() -> int:
    """The process's resident memory now (/proc/self/statm), 0 where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def workload(
    settings: RunSettings,
    plan: ModelPlan | None,
    shape: ModelShape,
    sequence: int | None = None,
    baseline: int | None = None,
) -> Workload:
    """What the run holds, from the model plan (exact module shapes) or, without one, a Llama layout of `shape`,
    on the settings' machine (its device, its compute dtype) with the processes FSDP divides the model among.
    `sequence`: the longest tokenized row when known (else data.max_length). `baseline`: the CPU memory the
    process holds before loading (default: this process's now)."""
    device = settings.machine.kind
    dtype_bytes = torch.empty((), dtype=settings.dtype).element_size()
    if plan is not None and plan.linear_shapes:
        linears = dict(plan.linear_shapes)
        targets = {n: linears[n] for n in plan.targets if n in linears}
        unquantized = plan.total_params - sum(i * o for i, o in linears.values())
        extra = max(plan.trainable_params - _lora_params(settings, targets), 0)
        gated = any(n.endswith(("gate_proj", "gate_up_proj", "w1", "w3")) for n in linears)
    else:
        linears = shape.llama_linears()
        targets = _targets_without_plan(settings, linears)
        # embedding, the output layer when untied, two RMSNorms per layer and the final one (Llama's modules)
        unquantized = shape.vocab * shape.hidden * (1 if shape.tied else 2) + (2 * shape.layers + 1) * shape.hidden
        extra, gated = 0, True
    max_length = settings.data.max_length
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
        causal=settings.task == "causal_lm",
        shards=settings.shards,
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


def _quantized_terms(settings: RunSettings, work: Workload) -> list[Term]:
    mode, p = settings.quant.mode, work.dtype_bytes
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
    if settings.quant.double_quant:
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


def _optimizer_term(settings: RunSettings, work: Workload) -> tuple[Term, list[str]]:
    name, r = settings.train.optimizer, settings.lora.rank
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


def layer_activation_bytes(settings: RunSettings, work: Workload) -> tuple[int, int]:
    """Bytes a layer keeps for its backward pass, per token: (summed over all layers, the largest layer)."""
    s, p = work.shape, work.dtype_bytes
    per_layer: dict[str, int] = {}
    r, dropout = settings.lora.rank, settings.lora.dropout > 0
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


def estimate(settings: RunSettings, work: Workload, micro_batch: int, checkpointing: bool) -> Estimate:
    """The peak memory of a training step of the settings' run at this micro batch, with or without checkpointing:
    the weights, the trainable parameters with their gradients and optimizer states, the activations (and on the
    CPU the heap they leave fragmented), the loss's logits, then (FSDP) each process's share, and the runtime."""
    tokens = micro_batch * work.sequence
    terms = _weight_terms(settings, work)
    trainable = _lora_params(settings, work.targets) + work.extra_trainable
    # peft keeps the adapter in fp32 (autocast_adapter_dtype) and its gradients likewise
    terms.append(Term("lora weights", 4 * trainable, f"{trainable:,} trainable params x 4 bytes (fp32)"))
    terms.append(Term("lora gradients", 4 * trainable, f"{trainable:,} gradients x 4 bytes (fp32)"))
    optimizer, notes = _optimizer_term(settings, work)
    terms.append(optimizer)
    terms += _activation_terms(settings, work, tokens, checkpointing)
    terms.append(_loss_term(work, tokens))
    if work.shards:
        terms = _sharded(settings, work, terms, tokens)
        notes.append(
            f"FSDP over {work.shards} processes: the estimate is per process (GPU); each one divides the model, its gradients and optimizer states {work.shards} ways and keeps its own batch's activations"
        )
    terms.append(_runtime_term(work, sum(t.bytes for t in terms)))
    return Estimate(work.device, micro_batch, work.sequence, checkpointing, tuple(terms), tuple(notes))


def _weight_terms(settings: RunSettings, work: Workload) -> list[Term]:
    """The frozen base: its quantized layers, the weights kept unquantized and (CPU) the mapped weight file."""
    s, p = work.shape, work.dtype_bytes
    terms = _quantized_terms(settings, work)
    terms.append(
        Term(
            "unquantized weights",
            work.unquantized_params * p,
            f"{work.unquantized_params:,} params (embeddings, {'tied output layer' if s.tied else 'output layer'}, norms, biases, heads) x {p} bytes",
        )
    )
    if work.mapped_file_bytes and settings.quant.mode != "none":
        weights = sum(i * o for i, o in work.linears.values())
        terms.append(
            Term(
                "weight file pages",
                weights * work.mapped_file_bytes,
                f"{weights:,} linear weights x {work.mapped_file_bytes} bytes: their original values in the weight file, mapped while the unquantized weights point into it (RSS counts its pages)",
            )
        )
    return terms


def _activation_terms(settings: RunSettings, work: Workload, tokens: int, checkpointing: bool) -> list[Term]:
    """What the backward pass keeps of the forward, and on the CPU the heap the freed temporaries leave behind."""
    s, p = work.shape, work.dtype_bytes
    all_layers, one_layer = layer_activation_bytes(settings, work)
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
    terms = [Term("activations", act, how)]
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
    return terms


def _loss_term(work: Workload, tokens: int) -> Term:
    """The loss's logits at their peak."""
    if not work.causal:
        return Term("loss logits", 0, "a classifier's logits are a few values per row")
    s, p = work.shape, work.dtype_bytes
    # the loss runs the output layer on at most `chunk_positions(vocab)` positions at a time (loss._frozen_chunks):
    # a chunk's fp32 logits and logsumexp's temporary of their size (2 x 4 bytes), + the previous chunk's softmax,
    # still referenced while the next chunk's logits are made, when there are several chunks (4 bytes more); plus
    # the compute-dtype logits before the upcast when that is not fp32
    chunk = chunk_positions(s.vocab)
    positions = min(tokens, chunk)
    per = (8 if tokens <= chunk else 12) + (p if p != 4 else 0)
    chunks = "one chunk" if tokens <= chunk else f"chunks of {chunk:,}"
    return Term(
        "loss logits",
        positions * s.vocab * per,
        f"{positions:,} positions ({chunks}) x {s.vocab:,} vocab x {per} bytes",
    )


def _runtime_term(work: Workload, planned: int) -> Term:
    """The runtime's own overhead on top of the `planned` bytes: the CUDA context and the caching allocator's slack,
    or on the CPU the process before loading, the first step's kernels and threads and malloc's slack."""
    if work.device == "cuda":
        runtime = CUDA_CONTEXT + int(CUDA_ALLOCATOR_SLACK * planned)
        how = f"CUDA context {gib(CUDA_CONTEXT)} + caching-allocator slack {CUDA_ALLOCATOR_SLACK:.0%}"
    else:
        runtime = work.baseline + CPU_STEP_RUNTIME + int(CPU_ALLOCATOR_SLACK * planned)
        how = f"the process before loading {gib(work.baseline)} (measured) + the first step's kernels and threads {gib(CPU_STEP_RUNTIME)} + allocator slack {CPU_ALLOCATOR_SLACK:.0%}"
    return Term("runtime", runtime, how)


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


def _sharded(settings: RunSettings, work: Workload, terms: list[Term], tokens: int) -> list[Term]:
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
        stored = _quantized_terms(settings, replace(work, linears=linears))
        lora = _lora_params(settings, {k: v for k, v in linears.items() if k in work.targets})
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


def gib(n: int) -> str:
    """A size as a person reads it: GiB from 1 GiB up, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


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
