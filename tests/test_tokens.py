"""The token rules (lora_sft.tokens) on hand-written rows: every stage counts, shifts and masks through them."""

from __future__ import annotations

import math

import pytest
import torch

from lora_sft import tokens
from lora_sft.tokens import IGNORE_INDEX as X

pytestmark = pytest.mark.unit


def test_ignore_index_is_what_cross_entropy_skips():
    logits, labels = torch.randn(3, 5), torch.tensor([1, X, 4])
    assert torch.equal(
        torch.nn.functional.cross_entropy(logits, labels),
        torch.nn.functional.cross_entropy(logits[[0, 2]], labels[[0, 2]]),
    )


def test_position_zero_is_never_counted_as_trained():
    assert tokens.count_trained([5, 6, 7]) == 2  # every label trained: the first has nothing before it
    assert tokens.count_trained([X, X, 7, X, 9]) == 2
    assert tokens.count_trained([5, X, X]) == 0
    assert tokens.count_trained([5]) == 0 and tokens.count_trained([]) == 0


def test_a_batch_counts_each_row_without_its_first_column():
    batch = torch.tensor([[5, 6, 7, X], [X, X, 8, 9], [4, X, X, X]])
    assert tokens.count_trained(batch) == 2 + 2 + 0 == sum(tokens.count_trained(row) for row in batch.tolist())


def test_first_target_and_has_target():
    assert tokens.first_target([5, X, 7, 8]) == 2
    assert tokens.first_target([5, 6]) == 1
    assert tokens.first_target([5, X, X]) == 3 and not tokens.has_target([5, X, X])
    assert tokens.has_target([X, 3])


def test_mask_first_is_what_packing_keeps():
    assert tokens.mask_first([5, 6, 7]) == [X, 6, 7]
    assert tokens.mask_first([X, X]) == [X, X]


def test_next_token_targets_line_up_with_the_logits():
    labels = torch.tensor([[10, 11, X, 13], [X, 21, 22, X]])
    assert tokens.next_token_targets(labels).tolist() == [[11, X, 13, X], [21, 22, X, X]]
    assert labels.tolist() == [[10, 11, X, 13], [X, 21, 22, X]]  # not changed in place
    assert tokens.is_target(tokens.next_token_targets(labels)).sum().item() == tokens.count_trained(labels)


def test_the_shifted_loss_is_the_models_own():
    """The rule matches transformers: a causal LM's loss is cross_entropy of the logits against next_token_targets."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    labels = torch.tensor([[1, X, 9, 3, X, 2]])
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    targets = tokens.next_token_targets(labels)
    keep = tokens.is_target(targets)
    ours = torch.nn.functional.cross_entropy(out.logits[keep].float(), targets[keep])
    assert torch.allclose(ours, out.loss, rtol=1e-6, atol=1e-6)


def test_perplexity_is_exp_of_the_loss_capped():
    assert tokens.perplexity(0.0) == 1.0
    assert tokens.perplexity(math.log(7.5)) == pytest.approx(7.5)
    assert tokens.perplexity(1e6) == math.exp(50) == tokens.perplexity(50.0)


def test_label_config_maps_both_ways():
    assert tokens.label_config(["neg", "pos", "mixed"]) == {
        "num_labels": 3,
        "id2label": {0: "neg", 1: "pos", 2: "mixed"},
        "label2id": {"neg": 0, "pos": 1, "mixed": 2},
    }
    assert tokens.label_config([]) == {"num_labels": 0, "id2label": {}, "label2id": {}}
