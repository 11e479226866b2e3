"""Data stage: which tokens carry loss, label ids, and bad rows named by file:line."""

from __future__ import annotations

import pytest
from helpers import build_tokenizer, write_jsonl

from lora_sft.data import build, check
from lora_sft.errors import UserError
from lora_sft.recipe.load import load_recipe
from lora_sft.tokens import IGNORE_INDEX as IGNORE

pytestmark = pytest.mark.unit
CORPUS = ["Name a fruit. apple banana cherry", "What is two plus two? four", "system user assistant"] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS)


@pytest.fixture
def make(tmp_path, write_recipe):
    def make(fmt, rows, task="causal_lm", **data):
        train = write_jsonl(tmp_path / "train.jsonl", rows)
        return load_recipe(
            write_recipe(
                {
                    "task": task,
                    "output_dir": str(tmp_path / "run"),
                    "model": {"path": "unused"},
                    "data": {"format": fmt, "train": str(train), **data},
                }
            )
        )

    return make


def trained_text(tokenizer, sample):
    return tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"]) if label != IGNORE])


def untrained_text(tokenizer, sample):
    return tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"]) if label == IGNORE])


def test_chat_template_trains_only_assistant_turns(make, tokenizer):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a fruit."},
                {"role": "assistant", "content": "apple"},
                {"role": "user", "content": "What is two plus two?"},
                {"role": "assistant", "content": "four"},
            ]
        }
    ]
    sample = build(make("messages", rows), tokenizer).train[0]
    assert trained_text(tokenizer, sample) == "apple<|im_end|>\nfour<|im_end|>\n"
    assert untrained_text(tokenizer, sample) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nWhat is two plus two?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        sample["input_ids"]
        == tokenizer(tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False), add_special_tokens=False)[
            "input_ids"
        ]
    )


def test_alpaca_uses_the_chat_template_when_there_is_one(make, tokenizer):
    sample = build(
        make("alpaca", [{"instruction": "Name a fruit.", "input": "red", "output": "cherry"}]), tokenizer
    ).train[0]
    assert trained_text(tokenizer, sample) == "cherry<|im_end|>\n"
    assert (
        untrained_text(tokenizer, sample) == "<|im_start|>user\nName a fruit.\n\nred<|im_end|>\n<|im_start|>assistant\n"
    )


def test_alpaca_without_template_uses_the_alpaca_prompt_and_learns_eos(make, tokenizer):
    plain = build_tokenizer(CORPUS)
    plain.chat_template = None
    sample = build(make("alpaca", [{"instruction": "Name a fruit.", "output": "apple"}]), plain).train[0]
    assert trained_text(plain, sample) == "apple<|im_end|>"
    assert untrained_text(plain, sample).endswith("### Instruction:\nName a fruit.\n\n### Response:\n")
    assert sample["labels"][-1] == plain.eos_token_id


def test_prompt_completion_and_train_on_inputs(make, tokenizer):
    rows = [{"prompt": "What is two plus two?", "completion": " four"}]
    sample = build(make("prompt_completion", rows), tokenizer).train[0]
    assert trained_text(tokenizer, sample) == " four<|im_end|>"
    everything = build(make("prompt_completion", rows, train_on_inputs=True), tokenizer).train[0]
    assert everything["labels"] == everything["input_ids"]


def test_truncation_that_leaves_no_response_drops_the_sample(make, tokenizer):
    rows = [
        {"prompt": "What is two plus two? " * 10, "completion": "four"},
        {"prompt": "Name a fruit.", "completion": "apple"},
    ]
    bundle = build(make("prompt_completion", rows, max_length=12, max_dropped=0.5), tokenizer)
    assert (
        len(bundle.train) == 1
        and bundle.stats["train"]["dropped_no_trained_token"] == 1
        and bundle.stats["train"]["truncated"] == 1
    )
    assert all(len(s["input_ids"]) <= 12 for s in bundle.train)


def test_classification_labels_by_name_or_id(make, tokenizer):
    rows = [{"text": "apple", "label": "food"}, {"text": "four", "label": "math"}, {"text": "banana", "label": "food"}]
    bundle = build(make("classification", rows, task="classification", shuffle=False), tokenizer)
    assert bundle.labels == ["food", "math"] and [s["labels"] for s in bundle.train] == [0, 1, 0]
    ids = build(
        make(
            "classification",
            [{"text": "a", "label": 2}, {"text": "b", "label": 0}],
            task="classification",
            shuffle=False,
        ),
        tokenizer,
    )
    assert ids.labels == ["0", "1", "2"] and [s["labels"] for s in ids.train] == [2, 0]
    with pytest.raises(UserError, match=r"train\.jsonl:2: label 'sport' is not in data\.labels \(food, math\)"):
        check(
            make(
                "classification",
                [rows[0], {"text": "x", "label": "sport"}],
                task="classification",
                labels=["food", "math"],
            )
        )


def test_eval_fraction_is_seeded_and_disjoint(make):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(20)]
    a, b = (
        check(make("prompt_completion", rows, eval_fraction=0.25)),
        check(make("prompt_completion", rows, eval_fraction=0.25)),
    )
    assert [e.prompt for e in a.eval] == [e.prompt for e in b.eval] and len(a.eval) == 5
    assert not {e.prompt for e in a.eval} & {e.prompt for e in a.train}


@pytest.mark.parametrize(
    "content, message",
    [
        (
            '{"instruction": "x"}\n',
            r"train\.jsonl:1: missing field 'output' \(format alpaca needs instruction, output; map other column names with columns:\)",
        ),
        (
            '{"instruction": "x", "output": "y"}\n{"instruction": 3, "output": "y"}\n',
            r"train\.jsonl:2: field 'instruction' must be a string, not int",
        ),
        ('{"instruction": "x", "output": "y"}\n[1, 2]\n', r"train\.jsonl:2: a row must be a JSON object, not list"),
        ('{"instruction": "x", "output": "y"}\n{"instruction": \n', r"train\.jsonl:2: invalid JSON"),
        ("", r"train\.jsonl:1: the file holds no rows"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, write_recipe, content, message):
    (tmp_path / "train.jsonl").write_text(content)
    recipe = load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": "x",
                "model": {"path": "x"},
                "data": {"format": "alpaca", "train": str(tmp_path / "train.jsonl")},
            }
        )
    )
    with pytest.raises(UserError, match=message):
        check(recipe)


def test_invalid_utf8_and_unknown_role(tmp_path, write_recipe):
    (tmp_path / "train.jsonl").write_bytes(b'{"messages": []}\n{"text": "caf\xe9"}\n')
    recipe = load_recipe(
        write_recipe(
            {
                "task": "causal_lm",
                "output_dir": "x",
                "model": {"path": "x"},
                "data": {"format": "messages", "train": str(tmp_path / "train.jsonl")},
            }
        )
    )
    with pytest.raises(UserError, match=r"train\.jsonl:2: invalid UTF-8"):
        check(recipe)
    write_jsonl(
        tmp_path / "train.jsonl",
        [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
    )
    with pytest.raises(UserError, match=r"train\.jsonl:1: messages\[0\]\.role: unknown role 'human'"):
        check(recipe)


def test_labels_come_from_the_train_rows_only(tmp_path, make):
    rows = [{"text": "apple", "label": "food"}, {"text": "four", "label": "math"}]
    evals = write_jsonl(
        tmp_path / "eval.jsonl",
        [{"text": "a", "label": "food"}, {"text": "b", "label": "sport"}, {"text": "c", "label": "art"}],
    )
    with pytest.raises(UserError) as err:
        check(make("classification", rows, task="classification", eval=str(evals)))
    assert err.value.problems == [
        f"{evals}:2: label 'sport' is seen only in eval rows (train rows have food, math); add it to the train data or list every label in data.labels",
        f"{evals}:3: label 'art' is seen only in eval rows (train rows have food, math); add it to the train data or list every label in data.labels",
    ]
    listed = check(
        make(
            "classification",
            rows,
            task="classification",
            eval=str(evals),
            labels=["food", "math", "sport", "art"],
            shuffle=False,
        )
    )
    assert listed.labels == ["food", "math", "sport", "art"] and [e.label for e in listed.eval] == [
        "food",
        "sport",
        "art",
    ]
    write_jsonl(tmp_path / "eval.jsonl", [{"text": "a", "label": 2}])
    with pytest.raises(
        UserError, match=r"eval\.jsonl:1: label id 2 is seen only in eval rows \(train rows have ids 0\.\.1\)"
    ):
        check(
            make(
                "classification",
                [{"text": "a", "label": 0}, {"text": "b", "label": 1}],
                task="classification",
                eval=str(evals),
            )
        )


@pytest.mark.parametrize("label", [3_000_000_000, 4096])
def test_huge_label_ids_are_refused_before_anything_is_allocated(make, label):
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": label}]
    with pytest.raises(UserError) as err:
        check(make("classification", rows, task="classification", shuffle=False))
    assert len(err.value.problems) == 1 and err.value.problems[0].endswith(
        f"train.jsonl:2: label id {label} would make {label + 1} classes (more than 4096); list the labels in data.labels"
    )
    with pytest.raises(UserError, match=rf"train\.jsonl:2: label id {label} is out of range \(0\.\.1\)"):
        check(make("classification", rows, task="classification", labels=["neg", "pos"]))


CHAT_OK = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def test_tool_calls_must_be_a_list_of_objects_and_a_trained_turn_must_not_be_empty(tmp_path, make):
    rows = [
        CHAT_OK,
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": "wx()"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": ["wx"]}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "  "},
                {"role": "user", "content": "?"},
                {"role": "assistant", "content": "ok"},
            ]
        },
        {"prompt": [{"role": "user", "content": "Hi"}], "completion": [{"role": "assistant", "content": ""}]},
    ]
    with pytest.raises(UserError) as err:
        check(make("messages", rows[:5]))
    path = tmp_path / "train.jsonl"
    assert err.value.problems == [
        f"{path}:2: messages[1].tool_calls must be a list of objects, not str",
        f"{path}:3: messages[1].tool_calls must be a list of objects, not list",
        f"{path}:4, 5: messages[1]: the assistant turn is empty (no content, no tool_calls) and would be trained; fill it in or remove the row",
    ]
    assert (
        len(check(make("messages", [rows[0], rows[4]], train_turns="last")).train) == 2
    )  # the empty turn is not trained
    with pytest.raises(UserError, match=r"train\.jsonl:1: completion\[0\]: the assistant turn is empty"):
        check(make("prompt_completion", rows[5:]))


def test_no_trained_turn_is_found_by_check_without_a_tokenizer(tmp_path, make):
    with pytest.raises(UserError) as err:
        check(make("messages", [CHAT_OK, {"messages": [{"role": "user", "content": "Hi"}]}]))
    assert err.value.problems == [
        f"{tmp_path / 'train.jsonl'}:2: no turn of the trained roles (assistant), so nothing would be trained; add one or change data.train_roles"
    ]
