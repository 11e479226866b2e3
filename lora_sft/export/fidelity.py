"""Comparing models on the fidelity samples: each model's logits at the scored positions (the trained tokens' next-token
targets; a classifier's labels), and how far one is from another (max |logit diff|, mean KL, perplexity change,
greedy agreement). `export`, `eval`'s generator check and the GGUF serving check all measure with these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_sft import tokens
from lora_sft.errors import RunError
from lora_sft.export.reopen import FinishedRun

FORWARD_ROWS = 4  # rows per forward pass: a 49k vocabulary x 256 positions x 4 bytes is 50 MB of logits per row


class FidelityError(RunError):
    """The merged (or re-loaded) model does not reproduce the unmerged one: exit 1, one line."""


@dataclass
class Outputs:
    """One model's logits on the fidelity samples, flattened to the scored positions."""

    logits: torch.Tensor  # (positions, vocab or classes), fp32
    targets: torch.Tensor  # (positions,), the next token / label, IGNORE_INDEX where none


def positions(run: FinishedRun, batch: dict, logits: torch.Tensor, flat: bool = False) -> Outputs:
    """The scored positions of `batch`: the logits at every unpadded position (`flat`: already cut to them, as
    plain_load saves them) with their next-token targets; a classifier's logits with its labels."""
    logits = logits.float().cpu()
    if run.recipe.task == "classification":
        return Outputs(logits, batch["labels"].cpu())
    mask = batch["attention_mask"].bool().cpu()
    labels = batch["labels"].cpu()
    return Outputs(logits if flat else logits[mask], tokens.next_token_targets(labels)[mask])


def loss(out: Outputs) -> float:
    """Mean cross-entropy over the scored targets (trained tokens; a classifier's labels)."""
    keep = tokens.is_target(out.targets)
    return torch.nn.functional.cross_entropy(out.logits[keep], out.targets[keep]).item()


def perplexity(out: Outputs) -> float:
    return tokens.perplexity(loss(out))


def compare(ref: Outputs, other: Outputs) -> dict:
    """How far `other` is from `ref`: max |logit diff|, mean KL(ref || other), perplexity change, greedy agreement."""
    log_p, log_q = ref.logits.log_softmax(-1), other.logits.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)  # >= 0; rounding can dip a hair below
    ppl_ref, ppl_other = perplexity(ref), perplexity(other)
    return {
        "max_abs_logit_diff": (ref.logits - other.logits).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "perplexity_change": ppl_other - ppl_ref,
        "perplexity_change_relative": (ppl_other - ppl_ref) / ppl_ref,
        "greedy_agreement": (ref.logits.argmax(-1) == other.logits.argmax(-1)).float().mean().item(),
    }


def forward(run: FinishedRun, model, batch: dict) -> Outputs:
    """`model`'s outputs on the scored positions of `batch`, FORWARD_ROWS rows at a time."""
    device = next(model.parameters()).device
    parts = []
    with torch.no_grad():
        for start in range(0, len(batch["input_ids"]), FORWARD_ROWS):
            rows = {k: v[start : start + FORWARD_ROWS] for k, v in batch.items()}
            logits = model(**{k: v.to(device) for k, v in rows.items() if k != "labels"}).logits
            parts.append(positions(run, rows, logits))
    return Outputs(torch.cat([p.logits for p in parts]), torch.cat([p.targets for p in parts]))
