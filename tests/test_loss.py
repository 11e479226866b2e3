"""lora_sft.model.loss: the causal LM loss from logits at trained targets only, in chunks, equals the plain path.

The plain path is the model's own forward with labels (transformers' ForCausalLMLoss over full logits). In fp32
the selected, chunked path gives the same loss and the same gradient on every trainable parameter (1e-5):
padded and packed batches, gradient accumulation (Trainer's num_items_in_batch), a LoRA'd, a fully trained
(modules_to_save) and a tied lm_head, trainable token rows; Trainer's training losses, eval loss and trained
adapter; `eval`'s score. No `positions x vocab` tensor exists in forward or backward; models whose forward does
more than decoder -> lm_head -> cross-entropy, and classification, keep the plain path.
"""

from __future__ import annotations

import pytest
import torch
from helpers import REPO, as_ready, build_tokenizer, save_tiny_llama

from lora_sft import data as data_stage
from lora_sft import model as model_stage
from lora_sft import preflight
from lora_sft import train as train_stage
from lora_sft.model import loss as loss_stage
from lora_sft.recipe.load import load_recipe
from lora_sft.run import trainer as trainer_stage
from lora_sft.settings import resolve

TOLERANCE = 1e-5


def _recipe(model_path, tmp_path, write_recipe, packing=False, lora=None, train=None, data=None):
    return load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": str(model_path)},
                "lora": {"rank": 4, "alpha": 8, "dropout": 0.0, **(lora or {})},
                "data": {
                    "format": "alpaca",
                    "train": str(REPO / "data/examples/alpaca.jsonl"),
                    "eval_fraction": 0.125,
                    "max_length": 64,
                    "packing": packing,
                    **(data or {}),
                },
                "train": {
                    "lr": 3e-2,
                    "max_steps": 3,
                    "micro_batch_size": 4,
                    "warmup": 0,
                    "scheduler": "constant",
                    "logging_steps": 1,
                    "save_steps": 3,
                    **(train or {}),
                },
            }
        )
    )


def _build(recipe, peft_config=None):
    """The model as lora_sft builds it (4-bit nf4 base + LoRA from the recipe; `peft_config`: a hand-made LoRA
    config instead, for what a recipe cannot ask), B matrices set nonzero so every A gets a gradient too."""
    prepared = preflight.prepare(recipe).ready()
    torch.manual_seed(0)
    base = model_stage.load_base(resolve(recipe), prepared.plan)
    if peft_config is None:
        model = model_stage.add_lora(base, recipe, prepared.plan)
    else:
        from peft import get_peft_model

        model = get_peft_model(base, peft_config)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # B starts at zero, token rows at their init: move them all
    model.train()
    return model, prepared


def _batches(recipe, prepared, n=2, size=4):
    collate = data_stage.collator(recipe, prepared.tokenizer)
    rows = list(prepared.bundle.train.select(range(n * size)))
    batches = [dict(collate(rows[i * size : (i + 1) * size])) for i in range(n)]
    for b in batches:
        b.pop("num_real_tokens", None)
    return batches


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


def _plain(model, batch, num_items=None):
    kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
    return model(**batch, **kwargs).loss


def _assert_equal_paths(model, batches, num_items=None):
    """Loss per batch and the accumulated gradient of every trainable parameter, plain vs selected + chunked."""
    assert loss_stage.plain_path_reason(model) is None
    plain = []
    for b in batches:
        loss = _plain(model, b, num_items)
        loss.backward()
        plain.append(loss.detach())
    plain_grads = _grads(model)
    chunked = []
    for b in batches:
        loss = loss_stage.causal_lm_loss(model, b, num_items)
        loss.backward()
        chunked.append(loss.detach())
    chunked_grads = _grads(model)
    for p, c in zip(plain, chunked):
        assert c.item() == pytest.approx(p.item(), rel=TOLERANCE), (p, c)
    assert set(plain_grads) == set(chunked_grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, g in plain_grads.items():
        assert g is not None and chunked_grads[name] is not None and g.abs().sum() > 0, name
        err = (chunked_grads[name] - g).abs().max().item() / max(g.abs().max().item(), 1e-12)
        assert err <= TOLERANCE, (name, err)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 selected positions: every batch here spans several chunks and a ragged last one."""
    monkeypatch.setattr(loss_stage, "CHUNK_POSITIONS", 16)


@pytest.mark.e2e
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_loss_and_every_gradient_equal_the_plain_path(tiny_llama, tmp_path, write_recipe, small_chunks, packing):
    recipe = _recipe(tiny_llama, tmp_path, write_recipe, packing=packing)
    model, prepared = _build(recipe)
    batches = _batches(recipe, prepared, n=1)
    labels = batches[0]["labels"]
    # the batch has what the path must get right: masked prompts, and padding (padded) or packed samples (packed)
    assert (labels[:, 1:] == -100).any() and (labels[:, 1:] != -100).sum() > 16
    if packing:
        assert "attention_mask" not in batches[0] and (batches[0]["position_ids"][:, 1:] == 0).any()
    else:
        assert (batches[0]["attention_mask"] == 0).any()
    assert loss_stage.frozen_linear(model.get_base_model().get_output_embeddings())  # the fused path
    _assert_equal_paths(model, batches)


@pytest.mark.e2e
def test_gradient_accumulation_normalizes_over_num_items_in_batch(tiny_llama, tmp_path, write_recipe, small_chunks):
    """Two micro batches, each loss divided by the targets of both (Trainer's num_items_in_batch), summed by
    backward: what the plain path accumulates."""
    recipe = _recipe(tiny_llama, tmp_path, write_recipe)
    model, prepared = _build(recipe)
    batches = _batches(recipe, prepared, n=2)
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    per_batch = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert per_batch[0] != per_batch[1]  # so a per-batch mean would differ
    _assert_equal_paths(model, batches, num_items=torch.tensor(total))


@pytest.mark.e2e
@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
def test_a_trained_lm_head_gets_its_gradients(tiny_llama, tmp_path, write_recipe, small_chunks, head):
    """LoRA on lm_head (peft directly: lora_sft's targets leave heads out) or lm_head trained in full
    (lora.modules_to_save): the checkpointed chunks, with gradients on the head's own parameters."""
    from peft import LoraConfig

    if head == "lora":
        recipe = _recipe(tiny_llama, tmp_path, write_recipe)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"], task_type="CAUSAL_LM")
        model, prepared = _build(recipe, config)
        trained_head = ["lm_head.lora_A", "lm_head.lora_B"]
    else:
        recipe = _recipe(tiny_llama, tmp_path, write_recipe, lora={"modules_to_save": ["lm_head"]})
        model, prepared = _build(recipe)
        trained_head = ["lm_head.modules_to_save"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(any(t in n for n in names) for t in trained_head), names
    assert not loss_stage.frozen_linear(model.get_base_model().get_output_embeddings())  # the checkpointed path
    _assert_equal_paths(model, _batches(recipe, prepared, n=1))


def _bare_tied_llama(path):
    """A tied-embedding tiny Llama whose tokenizer lacks the chatml markers: lora_sft adds them as trainable rows."""
    corpus = (REPO / "data/examples/chat.jsonl").read_text().splitlines()
    tokenizer = build_tokenizer(corpus, specials=["<|endoftext|>"], eos="<|endoftext|>", template=None)
    return save_tiny_llama(path, tokenizer, tied=True)


@pytest.mark.e2e
@pytest.mark.parametrize("new_tokens", [False, True], ids=["frozen", "trainable-rows"])
def test_a_tied_lm_head(tmp_path, write_recipe, small_chunks, new_tokens):
    """A tied lm_head: frozen (the fused path), or with the embedding's new special-token rows trained
    (peft's trainable tokens reach the tied output layer: the checkpointed path)."""
    model_path = _bare_tied_llama(tmp_path / "tied")
    chat = {"format": "messages", "train": str(REPO / "data/examples/chat.jsonl"), "chat_template": "chatml"}
    data = (chat if new_tokens else {}) | {"max_length": 256}  # alpaca needs no template: no tokens are added
    recipe = _recipe(model_path, tmp_path, write_recipe, data=data)
    model, prepared = _build(recipe)
    base = model.get_base_model()
    assert (prepared.plan.trainable_tokens != {}) == new_tokens
    assert loss_stage.frozen_linear(base.get_output_embeddings()) != new_tokens
    if new_tokens:
        assert any("trainable_tokens_delta" in n for n, p in model.named_parameters() if p.requires_grad)
    else:
        assert base.get_output_embeddings().weight is base.get_input_embeddings().weight
    _assert_equal_paths(model, _batches(recipe, prepared, n=1))


# ---------------------------------------------------------------- no positions x vocab tensor


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest tensor any operation creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.e2e
@pytest.mark.parametrize("limit", ["positions", "elements"])
@pytest.mark.parametrize("head", ["frozen", "lora"])
def test_no_positions_by_vocab_tensor_in_forward_or_backward(tmp_path, monkeypatch, head, limit):
    """A vocabulary of 4096 and 600 positions (300+ of them trained) in chunks of 64: no tensor created in
    forward or backward, and none saved for backward, reaches 2 chunks' worth of logits; the plain path
    (the control) makes the full `positions x vocab` logits. The chunk is bounded by its positions
    (CHUNK_POSITIONS) or, for a large vocabulary, by its logits (CHUNK_ELEMENTS)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, batch, length = 4096, 2, 300
    if limit == "positions":
        monkeypatch.setattr(loss_stage, "CHUNK_POSITIONS", 64)
    else:
        monkeypatch.setattr(loss_stage, "CHUNK_ELEMENTS", 64 * vocab + vocab // 2)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_cache=False,
    )
    targets = ["q_proj", "v_proj"] + (["lm_head"] if head == "lora" else [])
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    ids = torch.randint(0, vocab, (batch, length))
    labels = ids.clone()
    labels[:, :100] = -100  # a third of the positions are prompt
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    full = batch * length * vocab

    def measure(run):
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        with _Largest() as mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run().backward()
        model.zero_grad(set_to_none=True)
        return mode.largest, max(saved)

    largest, saved = measure(lambda: loss_stage.causal_lm_loss(model, inputs))
    assert largest < 2 * 64 * vocab and saved < 2 * 64 * vocab, (largest, saved, full)
    plain_largest, _ = measure(lambda: model(**inputs).loss)
    assert plain_largest >= full  # the control: the plain path does make them


@pytest.mark.unit
def test_a_larger_vocabulary_gets_fewer_positions_per_chunk():
    """Chunks hold CHUNK_POSITIONS positions, or fewer where that many rows of logits would pass CHUNK_ELEMENTS
    values: Llama-2/Mistral (32,000) keep 1,024, Llama-3 (128,256) 261, Gemma (256,000) 131."""
    assert loss_stage.CHUNK_POSITIONS == 1024 and loss_stage.CHUNK_ELEMENTS == 2**25
    sizes = {v: loss_stage.chunk_positions(v) for v in (4096, 32000, 128256, 151936, 256000)}
    assert sizes == {4096: 1024, 32000: 1024, 128256: 261, 151936: 220, 256000: 131}
    assert all(n * v <= loss_stage.CHUNK_ELEMENTS for v, n in sizes.items() if n < loss_stage.CHUNK_POSITIONS)


# ---------------------------------------------------------------- the Trainer and `eval`


def _force_plain(monkeypatch):
    monkeypatch.setattr(loss_stage, "plain_path_reason", lambda model: "forced by the test")


@pytest.mark.e2e
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_trainer_losses_eval_loss_and_adapter_equal_the_plain_path(
    tiny_llama, tmp_path, write_recipe, monkeypatch, packing
):
    """Three optimizer steps of 2 accumulated micro batches with NEFTune and gradient checkpointing, evaluated
    before training, at step 2 and at the last step (Trainer evaluates there; that evaluation is also the one after
    training): Trainer's logged losses, eval losses and the trained LoRA weights are those of the plain path
    (Trainer's compute_loss over the model's own forward)."""
    results, calls = {}, []
    chunked_loss = loss_stage.causal_lm_loss
    monkeypatch.setattr(loss_stage, "causal_lm_loss", lambda *a, **k: calls.append(1) or chunked_loss(*a, **k))
    for plain in (False, True):
        if plain:
            assert len(calls) > 6  # the chunked run took the path: 6 micro batches and the evaluations
            _force_plain(monkeypatch)
            calls.clear()
        recipe = _recipe(
            tiny_llama,
            tmp_path / ("plain" if plain else "chunked"),
            write_recipe,
            packing=packing,
            # sgd: the weights move by lr x gradient (Adam's g / sqrt(v) would magnify rounding where v is tiny)
            train={
                "grad_accum": 2,
                "optimizer": "sgd",
                "lr": 0.5,
                "neftune_alpha": 5.0,
                "gradient_checkpointing": True,
                "eval_steps": 2,
            },
        )
        prepared = preflight.prepare(recipe).ready()
        model = train_stage.setup_model(resolve(recipe), prepared, log=lambda *_: None)
        result = train_stage.fit(
            resolve(recipe),
            model,
            as_ready(recipe, prepared.tokenizer, prepared.bundle, prepared.plan),
            log=lambda *_: None,
        )
        history = result.trainer.state.log_history
        results[plain] = (
            [h["loss"] for h in history if "loss" in h],
            [h["eval_loss"] for h in history if "eval_loss" in h],
            {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n},
        )
    assert not calls
    (losses, evals, weights), (plain_losses, plain_evals, plain_weights) = results[False], results[True]
    assert len(losses) == 3 and len(evals) == 2  # at steps 2 and 3 (the last: also the one after training)
    assert losses[-1] < losses[0]
    assert losses == pytest.approx(plain_losses, rel=TOLERANCE)
    assert evals == pytest.approx(plain_evals, rel=TOLERANCE)
    for name, w in plain_weights.items():
        assert torch.allclose(weights[name], w, rtol=1e-4, atol=1e-6), name


@pytest.mark.unit
def test_evaluation_keeps_logits_only_for_classification(tiny_llama, tmp_path, write_recipe):
    causal = _recipe(tiny_llama, tmp_path, write_recipe)
    assert (
        trainer_stage.training_arguments(resolve(causal), tmp_path / "out", has_eval=True).prediction_loss_only is True
    )
    classify = causal.model_copy(update={"task": "classification"})
    assert (
        trainer_stage.training_arguments(resolve(classify), tmp_path / "out", has_eval=True).prediction_loss_only
        is False
    )


@pytest.mark.e2e
def test_eval_score_equals_the_plain_path(tiny_run, monkeypatch):
    """`eval`'s loss, perplexity and token accuracy on a finished run: the same as over full logits."""
    from lora_sft.export.evaluation import score
    from lora_sft.export.reopen import open_run

    run = open_run(tiny_run[0])
    items = list(run.bundle().eval)
    model = run.model()
    assert loss_stage.plain_path_reason(model) is None
    monkeypatch.setattr(loss_stage, "CHUNK_POSITIONS", 16)
    chunked = score(run, model, items)
    _force_plain(monkeypatch)
    plain = score(run, model, items)
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=TOLERANCE)
    assert chunked["perplexity"] == pytest.approx(plain["perplexity"], rel=TOLERANCE)
    assert chunked["token_accuracy"] == plain["token_accuracy"]


# ---------------------------------------------------------------- which models take the plain path


def _tiny(config_class, model_class, **extra):
    config = config_class(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        **extra,
    )
    return model_class(config)


@pytest.mark.unit
def test_the_plain_path_is_kept_where_the_forward_does_more():
    import transformers as tf
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    def reason(model):
        return loss_stage.plain_path_reason(model)

    llama = _tiny(tf.LlamaConfig, tf.LlamaForCausalLM)
    assert reason(llama) is None
    assert reason(get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))) is None
    assert reason(_tiny(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, final_logit_softcapping=None)) is None
    assert reason(_tiny(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=2)) is None

    refused = {
        "softcap": _tiny(tf.Gemma2Config, tf.Gemma2ForCausalLM, final_logit_softcapping=30.0),
        "router loss": _tiny(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=2, output_router_logits=True),
        "logit_scale": _tiny(tf.CohereConfig, tf.CohereForCausalLM),
        "logits_scaling": _tiny(tf.GraniteConfig, tf.GraniteForCausalLM, logits_scaling=4.0),
        "classification": _tiny(tf.LlamaConfig, tf.LlamaForSequenceClassification, pad_token_id=0),
    }
    reasons = {name: reason(model) for name, model in refused.items()}
    assert "final_logit_softcapping" in reasons["softcap"] and "output_router_logits" in reasons["router loss"]
    assert "CohereForCausalLM" in reasons["logit_scale"] and "GraniteForCausalLM" in reasons["logits_scaling"]
    assert "LlamaForSequenceClassification" in reasons["classification"]

    prompt = get_peft_model(
        _tiny(tf.LlamaConfig, tf.LlamaForCausalLM), PromptTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM")
    )
    assert "PROMPT_TUNING" in reason(prompt)
    wrapped = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    assert "wrapped" in reason(wrapped)

    custom = _tiny(tf.LlamaConfig, tf.LlamaForCausalLM)
    custom.loss_function = lambda *a, **k: None
    assert "ForCausalLMLoss" in reason(custom)


@pytest.mark.gpu
def test_bf16_on_a_gpu_matches_the_plain_path_and_allocates_less():
    """bf16 weights under autocast, as a GPU run trains: the loss and LoRA gradients match the plain path to bf16
    precision, and the step's peak allocation is lower (no 4 x 512 x 32000 fp32 logits)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        use_cache=False,
    )
    base = LlamaForCausalLM(config).to("cuda", torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float() + torch.randn_like(p, dtype=torch.float32) * 0.05
    ids = torch.randint(0, config.vocab_size, (4, 512), device="cuda")
    labels = ids.clone()
    labels[:, :170] = -100
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def step(run):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run()
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return float(loss), grads, torch.cuda.max_memory_allocated() - start

    plain_loss, plain_grads, plain_peak = step(lambda: model(**inputs).loss)
    loss, grads, peak = step(lambda: loss_stage.causal_lm_loss(model, inputs))
    assert loss == pytest.approx(plain_loss, rel=1e-2)
    for name, g in plain_grads.items():
        assert (grads[name] - g).norm() <= 5e-2 * g.norm() + 1e-6, name
    assert peak < plain_peak - 4 * 512 * 32000 * 4 // 2, (peak, plain_peak)
