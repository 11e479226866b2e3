"""The token rules every stage shares, written once: which labels are trained, how they line up with
the logits, how they are counted, what a loss means, and how a classifier names its labels.

- A label of IGNORE_INDEX is not trained: PyTorch's cross_entropy and transformers' models skip it.
- A causal LM's logits at position t predict the token at t + 1 (transformers shifts the labels inside
  the model), so the label at position 0 is never a target: nothing precedes it.
- Trained tokens are counted as the loss sees them: labels that are not IGNORE_INDEX, position 0 aside.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100  # the label of a token that is not trained (PyTorch's cross_entropy default ignore_index)
MAX_LOG_PERPLEXITY = 50.0  # a diverged loss reports perplexity e^50 rather than overflowing


def count_trained(labels: list[int] | torch.Tensor) -> int:
    """Trained tokens of one labels row (a list) or of a batch of rows (a 2-D tensor): labels that are not
    IGNORE_INDEX, leaving out position 0 of each row (it is never a target)."""
    if isinstance(labels, list):
        return sum(t != IGNORE_INDEX for t in labels[1:])
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def first_target(labels: list[int]) -> int:
    """The position of a row's first trained token (never 0), or len(labels) when it has none."""
    return next((i for i, t in enumerate(labels) if i > 0 and t != IGNORE_INDEX), len(labels))


def has_target(labels: list[int]) -> bool:
    """Whether a labels row trains at least one token (position 0 is never a target)."""
    return first_target(labels) < len(labels)


def mask_first(labels: list[int]) -> list[int]:
    """A row's labels with position 0 not trained: what a sample keeps when it is packed behind another
    (there its first label would be the target of the previous sample's last token)."""
    return [IGNORE_INDEX, *labels[1:]]


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets lined up with a causal LM's logits (batch, positions): the target of the logits at t is the
    label at t + 1; the last position has none (IGNORE_INDEX)."""
    targets = labels.new_full(labels.shape, IGNORE_INDEX)
    targets[..., :-1] = labels[..., 1:]
    return targets


def is_target(targets: torch.Tensor) -> torch.Tensor:
    """A boolean mask of the positions whose target is trained."""
    return targets != IGNORE_INDEX


def perplexity(loss: float) -> float:
    """exp(mean loss per trained token), capped at e^MAX_LOG_PERPLEXITY so a diverged run still reports a number."""
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def label_config(labels: list[str]) -> dict:
    """A classifier's label maps as its config takes them: num_labels, id2label (index -> name) and label2id."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }
