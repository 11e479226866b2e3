"""data.add_special_tokens: a chat template's markers that a base tokenizer lacks become special tokens with
new, trained embedding rows; the run, the export and a plain reload all carry the grown vocabulary."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, build_tokenizer, save_tiny_llama
from transformers import AutoModelForCausalLM

from lora_sft import model as model_stage
from lora_sft.cli.main import main
from lora_sft.data import cache
from lora_sft.errors import UserError
from lora_sft.recipe.load import load_recipe
from lora_sft.settings import resolve

MARKERS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="session")
def bare_llama(tmp_path_factory):
    """A 2-layer random Llama whose tokenizer has neither the chatml markers nor a chat template."""
    return _bare(tmp_path_factory.mktemp("bare-llama"), tied=False)


def _bare(path, tied: bool):
    corpus = (REPO / "data/examples/chat.jsonl").read_text().splitlines()
    tokenizer = build_tokenizer(corpus, specials=["<|endoftext|>"], eos="<|endoftext|>", template=None)
    return save_tiny_llama(path, tokenizer, tied)


def _recipe(bare_llama, tmp_path, write_recipe, **data):
    return write_recipe(
        {
            "task": "causal_lm",
            "output_dir": str(tmp_path / "run"),
            "model": {"path": str(bare_llama)},
            "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
            "data": {
                "format": "messages",
                "train": str(REPO / "data/examples/chat.jsonl"),
                "eval_fraction": 0.125,
                "max_length": 128,
                "chat_template": "chatml",
                **data,
            },
            "train": {"lr": 3e-2, "max_steps": 4, "micro_batch_size": 8, "warmup": 0, "save_steps": 4},
        }
    )


@pytest.mark.unit
def test_markers_become_single_special_tokens(bare_llama, tmp_path, write_recipe):
    recipe = load_recipe(_recipe(bare_llama, tmp_path, write_recipe))
    source = model_stage.resolve_source(recipe)
    plain = model_stage.load_tokenizer(recipe.model_copy(update={"task": "classification"}), source)
    assert all(len(plain(m, add_special_tokens=False)["input_ids"]) > 1 for m in MARKERS)  # the bare base splits them
    tokenizer = model_stage.load_tokenizer(recipe, source)
    base = len(plain)
    assert model_stage.added_token_ids(tokenizer) == [base, base + 1]
    assert [tokenizer(m, add_special_tokens=False)["input_ids"] for m in MARKERS] == [[base], [base + 1]]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"  # a turn ends on its marker
    # the tokenized-data cache is keyed by the tokenizer: adding the tokens changes the key
    assert cache.tokenizer_fingerprint(tokenizer) != cache.tokenizer_fingerprint(plain)
    plan = model_stage.plan_model(recipe, source, None)
    before = (plan.trainable_params, plan.total_params)
    model_stage.plan_tokens(plan, tokenizer, model_stage.added_token_ids(tokenizer))
    # two rows in embed_tokens and two in the untied lm_head, 64 wide
    assert plan.trainable_tokens == {"model.embed_tokens": [base, base + 1], "lm_head": [base, base + 1]}
    assert plan.trainable_params - before[0] == 2 * 2 * 64 and plan.total_params - before[1] == 2 * 2 * 64
    assert plan.vocab_rows == base + 2 and plan.new_tokens == MARKERS


@pytest.mark.unit
def test_tied_embeddings_train_the_rows_once(tmp_path, write_recipe):
    """A base whose lm_head is its embedding: one set of trainable rows, which the output layer uses too; the
    plan's trainable count is what peft makes trainable (add_lora checks it)."""
    bare = _bare(tmp_path / "tied", tied=True)
    recipe = load_recipe(_recipe(bare, tmp_path, write_recipe))
    source = model_stage.resolve_source(recipe)
    tokenizer = model_stage.load_tokenizer(recipe, source)
    plan = model_stage.plan_model(recipe, source, None)
    n = plan.rows
    # the tied weight counted once, as in the loaded model (transformers 5 ties it only at load)
    assert plan.total_params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(bare).parameters())
    model_stage.plan_tokens(plan, tokenizer, model_stage.added_token_ids(tokenizer))
    assert plan.output_embedding is None and plan.trainable_tokens == {"model.embed_tokens": [n, n + 1]}
    assert plan.total_params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(bare).parameters()) + 2 * 64
    base = model_stage.load_base(resolve(recipe), plan)
    embedding = base.get_input_embeddings().weight
    assert embedding.shape[0] == n + 2 and base.get_output_embeddings().weight is embedding
    assert torch.equal(embedding[n], embedding[:n].mean(0)) and torch.equal(embedding[n + 1], embedding[n])
    model = model_stage.add_lora(base, recipe, plan)  # raises if peft's trainable count differs from the plan's
    rows = [p for k, p in model.named_parameters() if "trainable_tokens_delta" in k]
    assert len(rows) == 1 and rows[0].shape == (2, 64)
    ids = torch.tensor([[5, n + 1]])
    with torch.no_grad():
        rows[0][1] += 1.0  # the trained row reaches the tied output layer too
        logits = model(input_ids=ids).logits[0, -1]
    assert logits[n + 1] != logits[n]


@pytest.mark.unit
def test_explicit_list_adds_exactly_those(bare_llama, tmp_path, write_recipe):
    wanted = ["<|im_end|>", "<tool>", "<|im_start|>"]
    recipe = load_recipe(_recipe(bare_llama, tmp_path, write_recipe, add_special_tokens=wanted))
    tokenizer = model_stage.load_tokenizer(recipe, model_stage.resolve_source(recipe))
    assert tokenizer.convert_ids_to_tokens(model_stage.added_token_ids(tokenizer)) == wanted
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.unit
def test_a_list_that_leaves_a_template_marker_split_is_refused(bare_llama, tmp_path, write_recipe):
    recipe = load_recipe(_recipe(bare_llama, tmp_path, write_recipe, add_special_tokens=["<|im_end|>", "<tool>"]))
    with pytest.raises(UserError) as e:
        model_stage.load_tokenizer(recipe, model_stage.resolve_source(recipe))
    assert len(e.value.problems) == 1 and "the list leaves <|im_start|> (written by chat template 'chatml')" in str(
        e.value
    )


@pytest.mark.unit
def test_false_refuses_with_one_line(bare_llama, tmp_path, write_recipe, capsys):
    path = _recipe(bare_llama, tmp_path, write_recipe, add_special_tokens=False)
    with pytest.raises(UserError) as e:
        model_stage.load_tokenizer(load_recipe(path), model_stage.resolve_source(load_recipe(path)))
    assert len(e.value.problems) == 1
    line = e.value.problems[0]
    assert "data.add_special_tokens" in line and "<|im_start|>, <|im_end|>" in line and "auto" in line
    for command in ("validate", "train"):
        assert main([command, str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: {line}"]
    assert not (tmp_path / "run").exists()


@pytest.mark.unit
def test_validate_and_preview_show_the_tokens(bare_llama, tmp_path, write_recipe, capsys):
    path = str(_recipe(bare_llama, tmp_path, write_recipe))
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert "special tokens added for the chat template: <|im_start|> <|im_end|>" in out
    line = next(x.strip() for x in out.splitlines() if x.strip().startswith("trainable params: "))
    trainable = int(line.split()[2].replace(",", ""))
    assert trainable == 8448  # LoRA rank 4 on 14 modules (8,192) + two 64-wide rows in embed_tokens and lm_head
    assert "  adapter size: about 33.0 KiB (the trainable params in fp32)\n" in out
    assert main(["preview", path, "-n", "1", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    recipe = load_recipe(path)
    tokenizer = model_stage.load_tokenizer(recipe, model_stage.resolve_source(recipe))
    ids = row["input_ids"]
    start, end = tokenizer.convert_tokens_to_ids(MARKERS)
    # every marker in the text is one token: as many ids as markers, and no marker spelled out
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert ids.count(start) == text.count("<|im_start|>") >= 2 and ids.count(end) == text.count("<|im_end|>") >= 2
    assert "<|im_start|>" not in tokenizer.decode([i for i in ids if i not in (start, end)])


@pytest.mark.e2e
def test_new_rows_train_and_export_reloads(bare_llama, tmp_path, write_recipe, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(_recipe(bare_llama, tmp_path, write_recipe))
    assert main(["train", path]) == 0
    run = tmp_path / "run"
    adapter = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    rows = {k: v for k, v in adapter.items() if "trainable_tokens" in k}
    assert sorted(rows) == [
        "base_model.model.lm_head.token_adapter.trainable_tokens_delta",
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
    ]
    assert all(k in rows or "lora_" in k for k in adapter)  # nothing else: no whole embedding matrices
    base = AutoModelForCausalLM.from_pretrained(bare_llama)
    n = base.get_input_embeddings().num_embeddings
    for name, layer in (("embed_tokens", base.get_input_embeddings()), ("lm_head", base.get_output_embeddings())):
        trained = next(v for k, v in rows.items() if name in k)
        mean = layer.weight.detach().mean(0)
        assert trained.shape == (2, 64)
        assert (trained - mean).abs().max() > 1e-3  # the new rows moved from their mean start
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"model.embed_tokens": [n, n + 1], "lm_head": [n, n + 1]}
    tokenizer = AutoTokenizer.from_pretrained(run / "adapter")
    assert tokenizer.eos_token == "<|im_end|>" and len(tokenizer) == n + 2

    # export: the adapter on the plain base grown to the tokenizer, and the merge onto the original weights,
    # reproduce (b); the merge onto the dequantized weights (in memory here) reproduces the trained model, rows too
    assert main(["export", str(run), "--merged", "--onto", "original", "--dtype", "fp32"]) == 0  # rows compared bitwise
    out = capsys.readouterr().out
    assert "added special tokens (trainable_token_indices)" in out
    report = json.loads((run / "export" / "fidelity.json").read_text())
    assert report["passed"]
    assert report["loaded_plain"]["adapter"]["vs_b"]["max_abs_logit_diff"] <= report["tolerance"]
    assert report["pairs"]["b_vs_c"]["max_abs_logit_diff"] <= report["tolerance"]
    assert report["merge_onto"]["dequantized"]["max_abs_logit_diff"] <= report["tolerance"]  # fp32 merge rounding
    merged = AutoModelForCausalLM.from_pretrained(run / "export" / "merged")
    assert merged.get_input_embeddings().num_embeddings == n + 2
    assert merged.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # outside the LoRA targets and the two new rows, the merged model is the base, bit for bit
    for name in ("get_input_embeddings", "get_output_embeddings"):
        before, after = getattr(base, name)().weight.detach(), getattr(merged, name)().weight.detach()
        assert torch.equal(after[:n], before)
        assert torch.equal(after[n:], next(v for k, v in rows.items() if ("embed" in k) == ("input" in name)))
    targets = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter if "lora_" in k}
    base_params = dict(base.named_parameters())
    for key, value in merged.named_parameters():
        if key.removesuffix(".weight") not in targets and "embed_tokens" not in key and "lm_head" not in key:
            assert torch.equal(value, base_params[key]), key

    # the card's "Use it" code for the unquantized base (what --onto original merged onto), run as written, loads
    # the adapter and gives the merged model's logits
    card = (run / "export" / "adapter" / "README.md").read_text()
    use = card.split("## Use it")[1].split("## Recipe")[0]
    code = use.split("the unquantized base (fp32) + the adapter")[1].split("```python")[1].split("```")[0]
    assert "base.resize_token_embeddings(len(tokenizer))" in code
    scope: dict = {}
    exec(
        code.replace(f"path/to/{bare_llama.name}", str(bare_llama)).replace("path/to/adapter", str(run / "adapter")),
        scope,
    )
    ids = scope["tokenizer"].apply_chat_template(
        [{"role": "user", "content": "hi there"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        assert torch.allclose(scope["model"](input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


@pytest.mark.unit
def test_generate_stops_on_the_end_of_turn_token(bare_llama, tmp_path, write_recipe):
    from lora_sft.export.evaluation import generate_text

    recipe = load_recipe(_recipe(bare_llama, tmp_path, write_recipe))
    tokenizer = model_stage.load_tokenizer(recipe, model_stage.resolve_source(recipe))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    class Model(torch.nn.Module):
        """Answers 'hi' then <|im_end|> then more text, stopping only where generate is told to."""

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, eos_token_id, max_new_tokens, **kwargs):
            more = tokenizer("hi", add_special_tokens=False)["input_ids"] + [end]
            more += [] if eos_token_id == end else tokenizer(" and on", add_special_tokens=False)["input_ids"]
            return torch.cat([input_ids, torch.tensor([more])], 1)

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True
    )
    assert generate_text(Model(), tokenizer, prompt, 8) == "hi"


@pytest.mark.e2e
def test_resume_restores_the_new_rows_exactly(bare_llama, tmp_path, write_recipe, capsys):
    from safetensors.torch import load_file

    path = str(_recipe(bare_llama, tmp_path, write_recipe))
    assert main(["train", path, "train.save_steps=2"]) == 0
    run = tmp_path / "run"
    unbroken = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    earlier = run / "checkpoints" / "checkpoint-2"
    assert any("trainable_tokens" in k for k in load_file(str(earlier / "adapter_model.safetensors")))
    assert main(["train", path, "train.save_steps=2", "--resume", str(earlier)]) == 0
    assert f"resuming from {earlier}" in capsys.readouterr().out
    resumed = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert sorted(resumed) == sorted(unbroken) and all(torch.equal(unbroken[k], resumed[k]) for k in unbroken)


def _without_token_rows(adapter_file) -> None:
    """The adapter file rewritten without the added tokens' rows (an adapter of another run, or cut down)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter_file))
    save_file({k: v for k, v in tensors.items() if "trainable_tokens" not in k}, str(adapter_file), {"format": "pt"})


@pytest.mark.e2e
def test_an_adapter_without_the_added_tokens_rows_is_refused_before_anything_loads(
    bare_llama, tmp_path, write_recipe, capsys
):
    """The run's tokenizer has two tokens past the base's rows; an adapter (or a checkpoint) without their rows
    ended export, eval and generate in exit 1 (peft's loader: a KeyError) and would resume with the rows untrained.
    Each is refused up front in one line naming the layer, nothing written."""
    path = str(_recipe(bare_llama, tmp_path, write_recipe))
    assert main(["train", path, "train.save_steps=2", "--quiet"]) == 0
    run = tmp_path / "run"
    _without_token_rows(run / "adapter" / "adapter_model.safetensors")
    _without_token_rows(run / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    capsys.readouterr()
    before = {str(p): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))}
    why = "past the base's 400 embedding rows (<|im_start|>, <|im_end|>), and the adapter in {} holds no rows for them in model.embed_tokens; the adapter and that tokenizer do not belong together"
    for argv, folder in (
        (["export", str(run)], run / "adapter"),
        (["eval", str(run)], run / "adapter"),
        (["generate", str(run), "--prompt", "hi"], run / "adapter"),
        (["train", path, "train.save_steps=2", "--resume", str(run / "checkpoints" / "checkpoint-2")], None),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and why.format(folder or run / "checkpoints" / "checkpoint-2") in err[0], err
    assert {str(p): p.read_bytes() if p.is_file() else None for p in sorted(tmp_path.rglob("*"))} == before
