"""`preview`: trained tokens marked, the stats, and the --json form."""

from __future__ import annotations

import json

import pytest
from helpers import REPO

from lora_sft.cli.main import main

pytestmark = pytest.mark.unit


@pytest.fixture
def chat_recipe(tiny_llama, tmp_path, write_recipe):
    def make(**data):
        return str(
            write_recipe(
                {
                    "task": "causal_lm",
                    "output_dir": str(tmp_path / "run"),
                    "model": {"path": str(tiny_llama)},
                    "data": {
                        "format": "messages",
                        "train": str(REPO / "data/examples/chat.jsonl"),
                        "max_length": 256,
                        "eval_fraction": 0.1,
                        **data,
                    },
                }
            )
        )

    return make


def test_preview_marks_trained_tokens_and_prints_stats(chat_recipe, capsys):
    assert main(["preview", chat_recipe(), "-n", "2"]) == 0
    out = capsys.readouterr().out
    rows = 64 - round(64 * 0.1)
    assert f"train: {rows} rows -> {rows} samples," in out and "trained (" in out
    assert "truncated 0, dropped with no trained token 0, dropped as too long 0" in out
    assert out.count("=== train row") == 2 and "lengths (tokens per row):" in out
    sample = out.split("=== train row 0")[1].split("=== train row 1")[0]
    # every assistant turn, and nothing else, sits inside [[ ]]
    assert sample.count("[[") == sample.count("<|im_start|>assistant") >= 1
    assert all(part.split("]]")[0].endswith("<|im_end|>\n") for part in sample.split("[[")[1:])
    assert "[[<|im_start|>" not in sample
    assert main(["preview", chat_recipe(), "--split", "eval", "-n", "1"]) == 0
    assert "eval: 6 rows" in capsys.readouterr().out
    assert "packed into" not in out


def test_preview_json_gives_ids_labels_and_positions_when_packed(chat_recipe, capsys, tiny_llama):
    assert main(["preview", chat_recipe(packing=True), "--json", "-n", "3"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 3 and all(set(r) == {"input_ids", "labels", "position_ids"} for r in lines)
    assert all(len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"]) <= 256 for r in lines)
    assert any(r["position_ids"].count(0) > 1 for r in lines)  # several samples in a row
    assert "packing efficiency" in captured.err
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    trained = [t for r in lines for t, lab in zip(r["input_ids"], r["labels"]) if lab != -100]
    assert all(lab in (-100, t) for r in lines for t, lab in zip(r["input_ids"], r["labels"]))
    assert tok.convert_tokens_to_ids("<|im_end|>") in trained


def test_preview_without_an_eval_split(chat_recipe, capsys):
    assert main(["preview", chat_recipe(eval_fraction=0.0), "--split", "eval"]) == 2
    assert "there is no eval split; set data.eval or data.eval_fraction" in capsys.readouterr().err
