"""The causal LM loss, computed only where a label is trained and never as one `positions x vocab` tensor.

A causal LM's forward turns every position into a full-vocabulary row of logits, although prompt tokens and
padding never reach the loss. Here the decoder runs as in the model's own forward (the same modules, so LoRA
layers, NEFTune's hook on the embeddings and gradient checkpointing all act as usual), then only the hidden
states whose next-token target is trained are kept (`tokens.next_token_targets`: the state at t predicts the
label at t + 1), and the output layer + cross-entropy run over them in chunks (`chunk_positions`: CHUNK_POSITIONS,
fewer for a large vocabulary, so that one chunk's logits stay within CHUNK_ELEMENTS values):

- frozen output layer (a plain nn.Linear, the usual case): `_FrozenHeadCrossEntropy` computes each chunk's
  logits (fp32 for the cross-entropy), its loss and, when a gradient is needed, the gradient w.r.t. the chunk's
  hidden states right away (softmax - one-hot, times the weight); only those (positions x hidden, fp32 so that
  bf16 runs round no more than the plain path) are kept, and backward scales them by the incoming gradient: two matmuls per chunk, nothing recomputed (the idea of
  Liger's fused linear cross-entropy).
- any other output layer (LoRA on lm_head, a modules_to_save copy, trainable token rows, a tied lm_head whose
  embedding trains): each chunk's output layer + cross-entropy under non-reentrant activation checkpointing,
  so the logits are recomputed chunk by chunk in backward and gradients reach every trainable parameter.

Models whose forward does more between the decoder and the loss use their own forward with labels (the plain
path): `plain_path_reason` says why.

Under DDP (several processes) the model must be called through the DDP wrapper: its forward prepares the gradient
synchronization, which a call into the decoder would skip (the ranks' gradients would then not be averaged, or DDP
would stop at the next step). So the wrapper's forward runs, asked for the hidden states and for the logits of the
last position only (`logits_to_keep=1`); its last hidden state is the decoder's output (after the final norm, as
transformers' output capturing ties it), and the chunked loss goes on from there. Only with a frozen output layer:
a trainable one would be used in that forward without reaching the loss. Other wrappers (FSDP, torch.compile)
use the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

import torch
from torch import nn
from torch.nn import functional as F

from lora_sft import compat
from lora_sft.tokens import is_target, next_token_targets

CHUNK_POSITIONS = 1024  # selected positions per output-layer chunk at most
# logits per chunk at most (128 MiB in fp32): with Llama-3's 128,256 tokens a chunk is 261 positions, not 1,024, and
# the loss's peak (the chunk's logits and the cross-entropy's temporaries) drops from about 1.7 GiB to 0.4 GiB on an
# 8B model, still a matmul large enough to keep a GPU busy
CHUNK_ELEMENTS = 2**25


def chunk_positions(vocab: int) -> int:
    """Selected positions per output-layer chunk for a vocabulary of `vocab` tokens."""
    return max(1, min(CHUNK_POSITIONS, CHUNK_ELEMENTS // max(vocab, 1)))


def _head_chunk(head: nn.Module) -> int:
    weight = getattr(head, "weight", None)  # nn.Linear, and peft's wrappers (LoRA, modules_to_save, trainable tokens)
    return chunk_positions(weight.shape[0]) if isinstance(weight, torch.Tensor) else CHUNK_POSITIONS


# transformers' causal LMs whose forward is exactly `hidden = decoder(...); logits = lm_head(hidden); loss =
# ForCausalLMLoss(logits, labels)` (read in transformers 5.24), so the path here gives what their forward gives.
# Others (Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier, Bamba's z-loss, remote
# code, encoder-decoders, ...) use the plain path: correct, only without the savings.
STANDARD_CAUSAL_LMS = frozenset(
    f"{name}ForCausalLM"
    for name in (
        "Llama",
        "Mistral",
        "Ministral",
        "Ministral3",
        "Mixtral",
        "Qwen2",
        "Qwen2Moe",
        "Qwen3",
        "Qwen3Moe",
        "Qwen3_5",
        "Phi",
        "Phi3",
        "Gemma",
        "Gemma2",
        "Gemma3",
        "Glm",
        "Glm4",
        "Olmo",
        "Olmo2",
        "Olmo3",
        "Olmoe",
        "SmolLM3",
        "Starcoder2",
        "StableLm",
        "Helium",
        "Apertus",
        "Arcee",
        "Exaone4",
        "Ernie4_5",
        "SeedOss",
        "Nemotron",
        "GPTNeoX",
        "DeepseekV2",
        "DeepseekV3",
    )
)
# Config settings with which one of those forwards changes the logits or adds to the loss (Gemma2/3's soft cap,
# a MoE's router auxiliary loss), and the like in other families, refused wherever they are set.
LOGIT_CHANGING_SETTINGS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "logits_soft_cap",
    "lm_head_multiplier",
    "z_loss_coefficient",
    "output_router_logits",
)


def plain_path_reason(model: nn.Module) -> str | None:
    """Why `model`'s loss must come from its own forward with labels; None when the selected, chunked path
    here gives the same loss and gradients. `model` is what Trainer calls: a PeftModel, or a bare causal LM, or
    either under DDP."""
    from peft import PeftModel
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel
    from transformers import PreTrainedModel

    if isinstance(model, FSDPModule):  # FSDP2 shards in place: the model keeps its class, its forward gathers weights
        return "the model is sharded by FSDP (its forward gathers each layer's weights)"
    inner = getattr(model, "module", None) if isinstance(model, DistributedDataParallel) else None
    if isinstance(inner, nn.Module):  # DDP: through its forward (see the module's docstring)
        if reason := plain_path_reason(inner):
            return reason
        head = _decoder_and_head(inner.get_base_model() if isinstance(inner, PeftModel) else inner)[1]
        if head is None or not frozen_linear(head):
            return "under DDP the output layer must be frozen (a trained one would be used in a forward that does not reach the loss)"
        return None
    if isinstance(model, PeftModel):
        config = model.active_peft_config
        # prompt learning prepends virtual tokens and activated LoRA (alora) computes offsets in PeftModel.forward
        if config.is_prompt_learning or getattr(config, "alora_invocation_tokens", None):
            return f"peft {config.peft_type} changes the inputs in its own forward"
        base = model.get_base_model()
    elif isinstance(model, PreTrainedModel):
        base = model
    else:  # DDP, FSDP, torch.compile, ...: their forward does the work (gradient sync), so it must run
        return f"the model is wrapped ({type(model).__name__})"
    kind = type(base)
    if kind.__name__ not in STANDARD_CAUSAL_LMS or not kind.__module__.startswith("transformers.models."):
        return f"{kind.__module__}.{kind.__name__} is not one of the causal LMs whose forward is known to be standard"
    for config in (base.config, getattr(base.config, "text_config", None)):
        for key in LOGIT_CHANGING_SETTINGS:
            if getattr(config, key, None):
                return f"config {key}={getattr(config, key)!r} changes the logits or the loss"
    if not compat.uses_causal_lm_loss(base):
        return "the model's loss function is not transformers' ForCausalLMLoss"
    decoder, head = _decoder_and_head(base)
    if head is None or decoder is base or decoder is not getattr(base, str(base.base_model_prefix), None):
        return "no separate decoder and output layer"
    return None


def _decoder_and_head(base: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """A transformers causal LM's decoder (what its forward calls first) and output layer."""
    return base.get_decoder(), base.get_output_embeddings()  # type: ignore[operator]


@dataclass
class TargetLoss:
    """The cross-entropy over a batch's trained targets: summed (differentiable), how many, and (when asked)
    how many targets the argmax of the logits got right."""

    loss_sum: torch.Tensor
    targets: int
    correct: int | None = None


def target_loss(model: nn.Module, inputs: dict[str, torch.Tensor], count_correct: bool = False) -> TargetLoss:
    """The decoder on `inputs` (every model input but `labels`), then the output layer and cross-entropy on the
    positions whose next-token target is trained, `chunk_positions` at a time. Only for a model
    `plain_path_reason` accepts."""
    from peft import PeftModel
    from torch.nn.parallel import DistributedDataParallel

    inner = model.module if isinstance(model, DistributedDataParallel) else model
    decoder, head = _decoder_and_head(inner.get_base_model() if isinstance(inner, PeftModel) else inner)
    assert head is not None, "target_loss needs a model plain_path_reason accepts"
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    if inner is not model:  # DDP's forward must run: the whole model, the last position's logits only
        hidden = model(**model_inputs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    else:
        hidden = decoder(**model_inputs)[0]  # (batch, positions, hidden)
    targets = next_token_targets(labels.to(hidden.device))  # the state at t predicts the label at t + 1
    keep = is_target(targets)
    hidden, targets = hidden[keep], targets[keep]  # (n, hidden), (n,): trained targets only
    if targets.numel() == 0:
        # nothing trained: a zero that still reaches the graph, so backward runs (to zero gradients) as in plain
        return TargetLoss(hidden.sum() * 0.0, 0, 0 if count_correct else None)
    if frozen_linear(head):
        if torch.is_grad_enabled() and hidden.requires_grad:
            loss_sum = _FrozenHeadCrossEntropy.apply(hidden, head.weight, head.bias, targets)
            return TargetLoss(
                loss_sum, int(targets.numel()), _correct(hidden, targets, head) if count_correct else None
            )
        loss_sum, _, correct = _frozen_chunks(hidden, head.weight, head.bias, targets, False, count_correct)
        return TargetLoss(loss_sum, int(targets.numel()), correct)
    return _checkpointed(hidden, targets, head, count_correct)


def causal_lm_loss(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    num_items_in_batch: torch.Tensor | int | None = None,
    tally: list[int] | None = None,
) -> torch.Tensor:
    """The loss as transformers' ForCausalLMLoss normalizes it: summed over the targets and divided by
    `num_items_in_batch` when given (Trainer counts the targets of all the step's micro batches, so gradient
    accumulation sums to the mean over the step), else the mean over this batch's targets. `tally` (an
    evaluation): [targets the argmax got right, targets] of this batch are added to it."""
    scored = target_loss(model, inputs, count_correct=tally is not None)
    if tally is not None:
        tally[0] += scored.correct or 0
        tally[1] += scored.targets
    if num_items_in_batch is None:
        return scored.loss_sum / scored.targets if scored.targets else scored.loss_sum / 0.0  # no target: nan, as CE
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(scored.loss_sum.device)
    return scored.loss_sum / num_items_in_batch


def frozen_linear(head: nn.Module) -> TypeGuard[nn.Linear]:
    """An output layer the fused path handles: exactly nn.Linear (not a peft or bitsandbytes layer), nothing
    in it trained."""
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


def _frozen_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    with_grad: bool,
    count_correct: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `targets`, `chunk_positions` rows at a time;
    with `with_grad` also its gradient w.r.t. `hidden` (softmax - one-hot, times the weight), with
    `count_correct` how many targets the argmax gets right."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if with_grad else None
    correct, size = 0, chunk_positions(weight.shape[0])
    for start in range(0, hidden.shape[0], size):
        part = slice(start, start + size)
        logits = F.linear(hidden[part], weight, bias).float()  # the cross-entropy in fp32, as ForCausalLMLoss
        rows = torch.arange(logits.shape[0], device=logits.device)
        wanted = targets[part]
        log_norm = torch.logsumexp(logits, dim=-1)
        total += (log_norm - logits[rows, wanted]).sum()
        if count_correct:
            correct += int((logits.argmax(-1) == wanted).sum())
        if grad is not None:
            probs = logits.sub_(log_norm[:, None]).exp_()  # softmax, in place of the logits
            probs[rows, wanted] -= 1.0  # d(summed loss)/d(logits) = softmax - one-hot
            grad[part] = probs.to(weight.dtype) @ weight
        del logits
    return total, grad, correct if count_correct else None


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """`_frozen_chunks` as an autograd function: the gradient w.r.t. the hidden states is computed in forward
    (the output layer is frozen, so it is the only one needed) and kept instead of any logits; backward scales
    it by the incoming gradient (the normalization applied to the summed loss)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        total, grad, _ = _frozen_chunks(hidden, weight, bias, targets, True, False)
        ctx.hidden_dtype = hidden.dtype
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.hidden_dtype), None, None, None


def _chunk_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _checkpointed(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, count_correct: bool) -> TargetLoss:
    """A trainable (or unusual) output layer: each chunk's logits are recomputed in backward, so they are never
    all alive at once, and autograd reaches the layer's own trainable parameters."""
    from torch.utils.checkpoint import checkpoint

    total: torch.Tensor = torch.zeros((), dtype=torch.float32, device=hidden.device)
    correct, size = 0, _head_chunk(head)
    for start in range(0, hidden.shape[0], size):
        part, wanted = hidden[start : start + size], targets[start : start + size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_cross_entropy, head, part, wanted, use_reentrant=False)
        else:
            logits = head(part).float()
            total = total + F.cross_entropy(logits, wanted, reduction="sum")
            if count_correct:
                correct += int((logits.argmax(-1) == wanted).sum())
    if count_correct and torch.is_grad_enabled():
        correct = _correct(hidden, targets, head)
    return TargetLoss(total, int(targets.numel()), correct if count_correct else None)


def _correct(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> int:
    """How many targets the argmax of the logits predicts, chunk by chunk (no gradient)."""
    size = _head_chunk(head)
    with torch.no_grad():
        return sum(
            int((head(hidden[s : s + size]).argmax(-1) == targets[s : s + size]).sum())
            for s in range(0, hidden.shape[0], size)
        )
