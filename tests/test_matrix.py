"""Every finished run stays usable: a tiny run for each data format, task and quant mode, trained with
relative paths in one working directory, then `eval`, `export`, `export --merged` and `generate`
(causal LM) on it through the CLI from another working directory.

Not the full product: each format, task and quant mode appears at least once, with the options that
broke runs before (train_on_inputs, text rows, packing, a .jinja chat template, int8 and none).
"""

from __future__ import annotations

import json
import math

import pytest
import yaml
from helpers import CHATML, REPO, write_jsonl

from lora_sft.cli.main import main
from lora_sft.recipe.load import load_recipe
from lora_sft.recipe.sections import QuantSection

ALPACA = [json.loads(line) for line in (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()]
CHAT = [json.loads(line) for line in (REPO / "data/examples/chat.jsonl").read_text().splitlines()]
ROWS = 8


def _rows(fmt: str) -> list[dict]:
    if fmt == "alpaca":
        return ALPACA[:ROWS]
    if fmt == "prompt_completion":
        return [{"prompt": f"{r['instruction']}\n{r['input']}\n", "completion": r["output"]} for r in ALPACA[:ROWS]]
    if fmt == "messages":
        return CHAT[:ROWS]
    if fmt == "text":
        return [{"text": f"{r['instruction']} {r['input']} -> {r['output']}"} for r in ALPACA[:ROWS]]
    return [
        {"text": r["input"], "label": "upper" if "upper" in r["instruction"] else "other"} for r in ALPACA[: 2 * ROWS]
    ]


# id: (task, format, quant mode, data options beyond the defaults)
CASES = {
    "alpaca-nf4": ("causal_lm", "alpaca", "nf4", {"chat_template": "template.jinja"}),
    "prompt_completion-fp4-train_on_inputs": ("causal_lm", "prompt_completion", "fp4", {"train_on_inputs": True}),
    "messages-int8": ("causal_lm", "messages", "int8", {}),
    "text-none-packed": ("causal_lm", "text", "none", {"packing": True}),
    "classification-int8": ("classification", "classification", "int8", {}),
}


@pytest.mark.unit
@pytest.mark.parametrize("mode", ["nf4", "fp4", "int8", "none"])
def test_the_saved_recipe_loads_back_in_every_quant_mode(mode, tmp_path, tiny_llama, monkeypatch):
    """recipe.yaml as a run writes it (defaults resolved, paths absolute) loads back unchanged."""
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "train.jsonl", ALPACA[:4])
    (tmp_path / "template.jinja").write_text(CHATML)
    recipe = {
        "task": "causal_lm",
        "output_dir": "runs/r",
        "model": {"path": str(tiny_llama)},
        "quant": {"mode": mode},
        "data": {
            "format": "alpaca",
            "train": ["train.jsonl", {"path": "*.jsonl", "weight": 2}],
            "chat_template": "template.jinja",
        },
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    saved = load_recipe(tmp_path / "r.yaml").saved_dict()
    assert saved["quant"]["double_quant"] is (mode in ("nf4", "fp4"))
    assert saved["output_dir"] == str(tmp_path / "runs/r") and saved["data"]["chat_template"] == str(
        tmp_path / "template.jinja"
    )
    assert saved["data"]["train"][0] == str(tmp_path / "train.jsonl") and saved["data"]["train"][1]["path"] == str(
        tmp_path / "*.jsonl"
    )
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_recipe(tmp_path / "recipe.yaml").saved_dict() == saved


@pytest.mark.unit
def test_double_quant_is_an_error_only_when_asked_for_outside_4bit():
    assert QuantSection(mode="fp4", double_quant=False).double_quant is False
    assert QuantSection(mode="none", double_quant=False).double_quant is False
    with pytest.raises(ValueError, match="double_quant applies to 4-bit modes only"):
        QuantSection(mode="int8", double_quant=True)


@pytest.mark.unit
def test_hub_ids_stay_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump(
            {
                "task": "causal_lm",
                "output_dir": "out",
                "model": {"path": "Qwen/Qwen2.5-0.5B"},
                "data": {
                    "format": "alpaca",
                    "train": {"path": "tatsu-lab/alpaca", "split": "train"},
                    "chat_template": "chatml",
                },
            }
        )
    )
    saved = load_recipe(tmp_path / "r.yaml").saved_dict()
    assert (
        saved["model"]["path"] == "Qwen/Qwen2.5-0.5B"
        and saved["data"]["train"]["path"] == "tatsu-lab/alpaca"
        and saved["data"]["chat_template"] == "chatml"
    )


def _finite_metrics(metrics: dict) -> None:
    assert metrics and all(isinstance(v, int | float) and math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_every_run_is_usable_from_another_directory(case, tiny_llama, tmp_path, monkeypatch, capsys):
    task, fmt, mode, options = CASES[case]
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "data").mkdir(parents=True)
    elsewhere.mkdir()
    write_jsonl(work / "data/train.jsonl", _rows(fmt))
    (work / "template.jinja").write_text(CHATML)
    recipe = {
        "task": task,
        "output_dir": "runs/r",
        "model": {"path": str(tiny_llama)},
        "quant": {"mode": mode},
        "lora": {"rank": 2, "alpha": 4, "dropout": 0.0},
        "data": {"format": fmt, "train": "data/train.jsonl", "eval_fraction": 0.25, "max_length": 128} | options,
        "train": {
            "max_steps": 2,
            "micro_batch_size": 2,
            "warmup": 0,
            "logging_steps": 1,
            "save_steps": 2,
            "eval_before": False,
        },
        # int8 saved double_quant: true, which its own eval.after_train then refused to load
        "eval": {"generate": 2, "max_new_tokens": 4, "after_train": mode == "int8", "base": False},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    monkeypatch.chdir(work)
    assert main(["train", "recipe.yaml"]) == 0, capsys.readouterr().err
    run = work / "runs/r"
    capsys.readouterr()
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["data"]["train"] == str(work / "data/train.jsonl") and saved["output_dir"] == str(run)
    assert ("evaluation" in json.loads((run / "summary.json").read_text())) is (mode == "int8")
    card = (run / "adapter/README.md").read_text()
    assert (
        card.startswith("---\nlibrary_name: peft\n")
        and f"local folder, `{tiny_llama.name}`" in card
        and "https://github.com/" not in card
    )

    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(run), "--base"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    evaluation = json.loads((run / "summary.json").read_text())["evaluation"]
    for name in ("base", "fine_tuned"):
        _finite_metrics(evaluation[name])
    expected = {"loss", "accuracy", "f1"} if task == "classification" else {"loss", "perplexity", "token_accuracy"}
    if fmt not in ("text", "classification"):
        expected |= {"exact_match", "rouge1", "rougeL"}
    assert set(evaluation["fine_tuned"]) == expected and "eval fine-tuned: loss" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert evaluation["fine_tuned"]["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    if fmt == "text":
        assert "no prompt/response pairs" in (run / "eval.md").read_text()

    for args in ([], ["--merged"]):
        out = tmp_path / f"export{len(args)}"
        assert main(["export", str(run), "--out", str(out), "--samples", "2", *args]) == 0, capsys.readouterr().err
        capsys.readouterr()
        report = json.loads((out / "fidelity.json").read_text())
        # --samples 2: at least 2 rows, and for a causal LM at least 512 scored tokens (train rows after the eval split)
        assert report["passed"] and report["problems"] == [] and report["samples"] >= 2
        assert report["held_out"] == (report["train_samples"] == 0)
        loaded = report["loaded_plain"]["adapter"]
        if task == "causal_lm":
            assert len(loaded["generated_text"]) == 2 and all(loaded["generated_text"]), loaded  # from 2 prompts
        else:
            assert len(loaded["predicted"]) == report["samples"] == 2 and report["held_out"]
        if args:  # merged onto the weights as trained (dequantized, the default): (d) before the merge
            assert (out / "merged/config.json").is_file() and report["pairs"]["d_vs_c"]["max_abs_logit_diff"] <= report[
                "tolerance"
            ]
            # the merged model is the one trained (LLM.int8() also rounds activations, which no weight can hold)
            if mode != "int8":
                assert report["pairs"]["a_vs_c"]["max_abs_logit_diff"] <= report["tolerance"]
        card = (out / "adapter/README.md").read_text()
        assert "https://github.com/)" not in card and "base_model:" not in card.split("\n---\n", 1)[0]

    if task == "causal_lm":
        assert (
            main(["generate", str(run), "--prompt", "Sort these words alphabetically.", "--max-new-tokens", "4"]) == 0
        ), capsys.readouterr().err
        assert capsys.readouterr().out.strip()
        if fmt == "text":  # raw text to continue: an empty prompt is one line, not a crash in generate
            assert main(["generate", str(run), "--prompt", ""]) == 2
            assert (
                capsys.readouterr()
                .err.strip()
                .splitlines()[-1]
                .startswith("error: prompt '' is empty: this run continues raw text")
            )
    else:
        assert main(["generate", str(run), "--prompt", "x"]) == 2
        assert "generate needs a causal_lm run" in capsys.readouterr().err
