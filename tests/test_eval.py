"""`eval` and the recipe's eval section on the tiny run: metrics, the before/after table, eval.md, summary.json, offline; and `generate`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import REPO

from lora_sft.cli.main import main
from lora_sft.export.evaluation import score, user_prompt
from lora_sft.export.reopen import open_run
from lora_sft.run.metrics import load_metric


@pytest.mark.e2e
def test_eval_section_after_training(tiny_run):
    run_dir, _, proc = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = summary["evaluation"]
    base, tuned = evaluation["base"], evaluation["fine_tuned"]
    assert set(tuned) == set(base) == {"loss", "perplexity", "token_accuracy", "exact_match", "rouge1", "rougeL"}
    # the eval section takes loss, perplexity and token accuracy from the Trainer's evaluations before and after
    # training: they are what `score` measures again from the saved adapter and the base
    for name in ("loss", "perplexity", "token_accuracy"):
        assert tuned[name] == summary["eval"][name] and base[name] == summary["eval_before"][name], name
    run = open_run(run_dir)
    items = list(run.bundle().eval)
    for model, measured in ((run.model(), tuned), (run.base(), base)):
        model.eval()
        again = score(run, model, items)
        assert again["loss"] == pytest.approx(measured["loss"], rel=1e-4)
        assert again["token_accuracy"] == pytest.approx(measured["token_accuracy"], abs=1e-9)
    assert tuned["loss"] < base["loss"] and 0 <= base["token_accuracy"] <= tuned["token_accuracy"] <= 1
    assert "eval fine-tuned: loss" in proc.stdout and "eval base: loss" in proc.stdout
    table = (run_dir / "eval.md").read_text()
    assert "| metric | base | fine-tuned | change |" in table
    assert f"| loss | {base['loss']:.4f} | {tuned['loss']:.4f} | {tuned['loss'] - base['loss']:+.4f} |" in table
    # the fixed prompt, rendered with the saved chat template, and what each model made of it
    [sample] = evaluation["samples"]
    assert sample["prompt"] == "<|im_start|>user\nCount the words.\n\npillow silver<|im_end|>\n<|im_start|>assistant\n"
    assert {"base", "fine_tuned"} <= set(sample) and "## Sample generations" in table


@pytest.mark.e2e
def test_eval_says_how_far_it_is_while_it_scores_and_generates(tiny_run, tmp_path, monkeypatch):
    """A large eval split scores, and a batch of prompts generates, for minutes: lines come while they work (here
    one per generated token, PROGRESS_SECONDS set to 0), not only when a batch is done."""
    from lora_sft.export import evaluation

    run_dir = tmp_path / "run"  # a copy: eval writes eval.md and summary.json
    shutil.copytree(tiny_run[0], run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    monkeypatch.setattr(evaluation, "PROGRESS_SECONDS", 0.0)
    lines: list[str] = []
    evaluation.evaluate_run(run_dir, log=lines.append)
    rows = len(list(open_run(run_dir).bundle().eval))
    start = lines.index(f"eval fine-tuned: scoring {rows} rows")
    ticks = [line for line in lines if line.startswith("  generate fine-tuned: 0/2, token ")]
    assert [t.split(", token ")[1].split(" ")[0] for t in ticks] == [f"{i}/6" for i in range(1, len(ticks) + 1)]
    assert 1 <= len(ticks) <= 6 and start < lines.index(ticks[0]) < lines.index(
        next(x for x in lines if x.startswith("  generate fine-tuned: 2/2 ("))
    )
    assert "generate fine-tuned: 1 responses to eval.prompts" in lines


@pytest.mark.e2e
def test_eval_with_a_data_file_offline(tiny_run, tmp_path):
    """The shipped metric modules load with the hub switched off and an empty cache."""
    run_dir = tmp_path / "run"  # a copy: the other tests read the original's eval section results
    shutil.copytree(tiny_run[0], run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    rows = [json.loads(line) for line in (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()[:3]]
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "HTTP_PROXY": "http://127.0.0.1:9",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "eval", str(run_dir), "--data", str(data)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluation = json.loads((run_dir / "summary.json").read_text())["evaluation"]
    assert evaluation["rows"] == 3 and evaluation["data"] == str(data) and "base" not in evaluation
    assert {"exact_match", "rougeL", "token_accuracy"} <= set(evaluation["fine_tuned"])
    assert "| metric | fine-tuned |" in (run_dir / "eval.md").read_text()
    # the model card says what eval.md and summary.json now say, not what the eval section measured before
    card = (run_dir / "adapter" / "README.md").read_text()
    assert f"3 held-out samples ({data})" in card and "(eval split)" not in card
    assert f"| exact_match | {evaluation['fine_tuned']['exact_match']:.4f} |" in card


@pytest.mark.e2e
def test_eval_again_replaces_its_reports_and_no_file_of_the_users(tiny_run, tmp_path):
    """`eval` run a second time rewrites eval.md, summary.json and the card; the user's files in the run directory
    stay, and a link at eval.md is replaced, never the file it points to."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir, ignore=shutil.ignore_patterns("checkpoints", "export"))
    assert main(["eval", str(run_dir)]) == 0
    mine = tmp_path / "my-report.md"
    mine.write_text("the user's report")
    (run_dir / "eval.md").unlink()
    (run_dir / "eval.md").symlink_to(mine)
    (run_dir / "notes.md").write_text("the user's notes")
    (run_dir / "adapter" / "my-prompts.txt").write_text("the user's prompts")
    assert main(["eval", str(run_dir)]) == 0
    assert mine.read_text() == "the user's report"
    assert not (run_dir / "eval.md").is_symlink() and "| metric |" in (run_dir / "eval.md").read_text()
    assert (run_dir / "notes.md").read_text() == "the user's notes"
    assert (run_dir / "adapter" / "my-prompts.txt").read_text() == "the user's prompts"


@pytest.mark.unit
def test_shipped_generation_metrics():
    em = load_metric("exact_match").compute(
        predictions=["stone river", " RIVER  STONE ", "x"], references=["stone river", "RIVER STONE", "y"]
    )
    assert em == {"exact_match": pytest.approx(2 / 3)}
    rouge = load_metric("rouge").compute(
        predictions=["the cat sat on the mat", "a b c d"], references=["the cat is on the mat", "d c b a"]
    )
    # LCS 5 of 6 both ways (F 5/6); reversed order: LCS 1 of 4 (F 1/4) while unigram overlap is complete
    assert rouge["rougeL"] == pytest.approx((5 / 6 + 1 / 4) / 2) and rouge["rouge1"] == pytest.approx((5 / 6 + 1) / 2)


@pytest.mark.e2e
def test_generate_renders_the_saved_chat_template(tiny_run, capsys, monkeypatch):
    run_dir, _, _ = tiny_run
    assert main(["generate", str(run_dir), "--prompt", "Count the words.\n\nriver stone", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    run = open_run(run_dir)
    prompt = user_prompt(run.tokenizer, [{"role": "user", "content": "Count the words.\n\nriver stone"}])
    assert prompt == run.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count the words.\n\nriver stone"}], tokenize=False, add_generation_prompt=True
    )
    ids = run.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        new = run.model().generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False
        )
    assert printed == run.tokenizer.decode(new[0, ids.shape[1] :], skip_special_tokens=True).strip()

    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hello\nand again\n\n"))
    assert main(["generate", str(run_dir), "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


@pytest.mark.e2e
def test_one_eval_loss_token_weighted_whatever_the_batching_or_packing(tiny_llama, tmp_path, monkeypatch, capsys):
    """The Trainer's eval loss (summary.json, metrics.jsonl) is the mean over every scored token, as `eval` reports it:
    micro batches of 3 samples of uneven lengths (the last batch holds one) and packed rows give the same number."""
    import yaml

    losses = {}
    for packing in (False, True):
        out = tmp_path / f"run-packed-{packing}"
        recipe = {
            "task": "causal_lm",
            "output_dir": str(out),
            "model": {"path": str(tiny_llama)},
            "quant": {"mode": "none"},
            "lora": {"rank": 2, "alpha": 4, "dropout": 0.0},
            "data": {
                "format": "alpaca",
                "train": str(REPO / "data/examples/alpaca.jsonl"),
                "eval_fraction": 0.125,
                "max_length": 128,
                "packing": packing,
            },
            "train": {"max_steps": 1, "micro_batch_size": 3, "warmup": 0, "logging_steps": 1, "save_steps": 1},
            "eval": {"generate": 0},
        }
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["train", str(tmp_path / "r.yaml")]) == 0, capsys.readouterr().err
        assert main(["eval", str(out), "--base"]) == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        evaluation = summary["evaluation"]
        assert evaluation["rows"] == (
            json.loads((out / "manifest.json").read_text())["data"]["eval"].get("packed_rows") if packing else 8
        )
        assert summary["eval_loss"] == pytest.approx(evaluation["fine_tuned"]["loss"], rel=1e-5)
        assert summary["eval_before"]["loss"] == pytest.approx(evaluation["base"]["loss"], rel=1e-5)
        logged = [
            r["eval_loss"]
            for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in r
        ]
        assert logged == [summary["eval_before"]["loss"], summary["eval_loss"]]
        losses[packing] = summary["eval_before"]["loss"]
    # the same base on the same eval samples: packing changes the rows, not the loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
