"""`init`: a recipe for every data format that `validate` accepts, the format detected from the rows (and refused with
the evidence when they fit several formats or none), sizes from the model's config, the planner's estimate in the
header, and an existing file never replaced."""

from __future__ import annotations

import json
import re

import pytest
import yaml
from helpers import REPO, build_tokenizer, save_tiny_llama, write_jsonl

from lora_sft.cli.main import main
from lora_sft.data.formats import FIELDS

pytestmark = pytest.mark.unit

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
ALPACA = [json.loads(line) for line in (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()]
CHAT = [json.loads(line) for line in (REPO / "data/examples/chat.jsonl").read_text().splitlines()]


def _data(kind: str, tmp_path):
    """A data file of each format the project reads (formats.FIELDS), and ShareGPT chats."""
    if kind == "alpaca":
        return REPO / "data/examples/alpaca.jsonl"
    if kind == "messages":
        return REPO / "data/examples/chat.jsonl"
    if kind == "classification":
        return REPO / "data/quickstart/train.jsonl"
    if kind == "sharegpt":
        turns = [
            [
                {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
                for m in r
            ]
            for r in (c["messages"] for c in CHAT)
        ]
        return write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": t} for t in turns])
    if kind == "prompt_completion":
        rows = [{"prompt": f"{r['instruction']}\n{r['input']}", "completion": r["output"]} for r in ALPACA]
        return write_jsonl(tmp_path / "pc.jsonl", rows)
    if kind == "text":  # a .txt file: one row per line
        path = tmp_path / "corpus.txt"
        path.write_text("".join(f"{r['instruction']} {r['input']} {r['output']}\n" for r in ALPACA))
        return path
    raise AssertionError(kind)


CASES = {  # data -> (the format init must detect, the task it must pick)
    "alpaca": ("alpaca", "causal_lm"),
    "messages": ("messages", "causal_lm"),
    "sharegpt": ("messages", "causal_lm"),
    "prompt_completion": ("prompt_completion", "causal_lm"),
    "text": ("text", "causal_lm"),
    "classification": ("classification", "classification"),
}


def test_every_format_is_covered():
    assert {fmt for fmt, _ in CASES.values()} == set(FIELDS)


@pytest.mark.parametrize("kind", CASES)
def test_init_detects_the_format_and_validate_accepts_the_recipe(kind, tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    fmt, task = CASES[kind]
    model = MINILM if task == "classification" else str(tiny_llama)
    data = _data(kind, tmp_path)
    assert main(["init", "--model", model, "--data", str(data), "--out", "r.yaml"]) == 0
    text = (tmp_path / "r.yaml").read_text()
    recipe = yaml.safe_load(text)
    assert (recipe["data"]["format"], recipe["task"], recipe["data"]["train"]) == (fmt, task, str(data))
    assert f"data: {fmt} rows ({', '.join(FIELDS[fmt])}), detected from the first rows" in text
    capsys.readouterr()
    assert main(["validate", "r.yaml"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "r.yaml: ok" in out and "trainable params" in out
    # the header's estimate is the planner's, as validate prints it (the runtime term measures this process)
    header = [line.removeprefix("#   ") for line in text.splitlines() if line.startswith("#   ")]
    terms = [t for t in header if t.startswith(("base weights:", "unquantized weights:", "lora weights:"))]
    assert len(terms) == 3 and all(f"    {t}" in out for t in terms), (terms, out)


def test_sizes_follow_the_model(tiny_llama, tmp_path, monkeypatch):
    """A tiny model (under 1B) gets rank 16, lr 2e-4, micro batch 4 x 4, and max_length capped at its 512
    positions; an 8B hub model, offline, its shape from the table: lr 1e-4, micro batch 1 x 16, 2048 tokens."""
    monkeypatch.chdir(tmp_path)
    alpaca = str(REPO / "data/examples/alpaca.jsonl")
    assert main(["init", "--model", str(tiny_llama), "--data", alpaca, "--out", "tiny.yaml"]) == 0
    tiny = yaml.safe_load((tmp_path / "tiny.yaml").read_text())
    assert tiny["lora"] == {"rank": 16, "alpha": 32, "target_modules": "all-linear"}
    assert (tiny["train"]["lr"], tiny["train"]["micro_batch_size"], tiny["train"]["grad_accum"]) == (2e-4, 4, 4)
    assert tiny["data"]["max_length"] == 512 and tiny["data"]["eval_fraction"] == 0.1

    chat = str(REPO / "data/examples/chat.jsonl")
    assert main(["init", "--model", "meta-llama/Llama-3.1-8B-Instruct", "--data", chat, "--out", "big.yaml"]) == 0
    text = (tmp_path / "big.yaml").read_text()
    big = yaml.safe_load(text)
    assert (big["train"]["lr"], big["train"]["micro_batch_size"], big["train"]["grad_accum"]) == (1e-4, 1, 16)
    assert big["data"]["max_length"] == 2048
    assert "8.03B parameters, 4-15B parameters" in text and "shape from lora_sft's table of known models" in text
    assert re.search(r"# memory estimate on the (CPU|GPU): [\d.]+ GiB at micro batch 1, sequence 2048", text)
    assert main(["validate", "big.yaml"]) == 0


def test_a_base_tokenizer_without_a_chat_template_gets_one(tmp_path, monkeypatch, capsys):
    """Chat rows on a model whose tokenizer has no template (a base model): chatml, whose markers this tokenizer
    holds as tokens; validate then masks with it."""
    monkeypatch.chdir(tmp_path)
    corpus = (REPO / "data/examples/chat.jsonl").read_text().splitlines()
    base = save_tiny_llama(tmp_path / "base", build_tokenizer(corpus, template=None))
    chat = str(REPO / "data/examples/chat.jsonl")
    assert main(["init", "--model", str(base), "--data", chat, "--out", "r.yaml"]) == 0
    text = (tmp_path / "r.yaml").read_text()
    assert yaml.safe_load(text)["data"]["chat_template"] == "chatml"
    assert "chat template: chatml (the tokenizer has none; its tokens hold chatml's markers)" in text
    assert main(["validate", "r.yaml"]) == 0, capsys.readouterr().err


def _one_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_rows_that_fit_two_formats_are_refused_with_the_evidence(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = [
        {"instruction": r["instruction"], "output": r["output"], "messages": c["messages"]}
        for r, c in zip(ALPACA, CHAT)
    ]
    data = write_jsonl(tmp_path / "x.jsonl", rows)
    assert main(["init", "--model", str(tiny_llama), "--data", str(data)]) == 2
    assert _one_error(capsys) == (
        f"error: {data}:1: rows have fields {{instruction, output, messages}}: fits alpaca and messages; pass --format"
    )
    assert not (tmp_path / "recipe.yaml").exists()
    assert main(["init", "--model", str(tiny_llama), "--data", str(data), "--format", "messages"]) == 0
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["data"]["format"] == "messages"


def test_rows_that_fit_no_format_or_two_different_ones(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "b"}])
    assert main(["init", "--model", str(tiny_llama), "--data", str(data)]) == 2
    error = _one_error(capsys)
    assert error == (
        f"error: {data}:1: rows have fields {{question, answer}}: fits no format (alpaca needs instruction, output; "
        "prompt_completion needs prompt, completion; messages needs messages; text needs text; classification needs "
        "text, label); rename the fields, or write the recipe by hand and map them in the source (column mapping is "
        f'per source): data: {{train: {{path: "{data}", format: prompt_completion, columns: {{prompt: question, completion: answer}}}}}}'
    )
    # what it suggests is a data section the recipe takes as it is (there is no data.columns)
    recipe = {"task": "causal_lm", "output_dir": str(tmp_path / "run"), "model": {"path": str(tiny_llama)}}
    recipe |= yaml.safe_load(error.split("per source): ", 1)[1])
    (tmp_path / "by-hand.yml").write_text(yaml.safe_dump(recipe))  # .yml: the glob below looks for what init wrote
    assert main(["validate", str(tmp_path / "by-hand.yml")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    data = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA[0], CHAT[0]])
    assert main(["init", "--model", str(tiny_llama), "--data", str(data)]) == 2
    assert _one_error(capsys) == (
        f"error: {data}:2: rows have fields {{messages}}: fits messages, but {data}:1 fits alpaca; put each format in a "
        "file of its own, or pass --format"
    )
    alpaca = str(REPO / "data/examples/alpaca.jsonl")
    assert main(["init", "--model", str(tiny_llama), "--data", alpaca, "--task", "classification"]) == 2
    assert "--task classification: classification trains on classification rows (text, label)" in _one_error(capsys)
    assert list(tmp_path.glob("*.yaml")) == []


def test_an_existing_file_is_never_replaced(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text("mine\n")
    alpaca = str(REPO / "data/examples/alpaca.jsonl")
    assert main(["init", "--model", str(tiny_llama), "--data", alpaca]) == 2
    assert _one_error(capsys) == (
        "error: --out recipe.yaml: the file exists; init never replaces a file: pass another --out, or remove it"
    )
    assert (tmp_path / "recipe.yaml").read_text() == "mine\n"


def test_the_header_plans_at_the_tokenized_lengths_and_warns_only_when_it_does_not_fit(
    tiny_llama, tmp_path, monkeypatch
):
    """init's memory plan is validate's: at the longest tokenized row, not max_length; "More memory than the GPU
    has" only when the estimate exceeds the device's memory."""
    from lora_sft.model import fitting

    monkeypatch.chdir(tmp_path)
    alpaca = str(REPO / "data/examples/alpaca.jsonl")
    assert main(["init", "--model", str(tiny_llama), "--data", alpaca, "--out", "a.yaml"]) == 0
    text = (tmp_path / "a.yaml").read_text()
    planned = re.search(r"# memory estimate on the (?:CPU|GPU): .* sequence (\d+) \(the longest tokenized row\)", text)
    assert planned is not None and int(planned.group(1)) < yaml.safe_load(text)["data"]["max_length"] == 512
    assert "More memory than" not in text and "verdict: fits" in text

    small = fitting.DeviceMemory("cuda", 2**20, 2**20)  # a 1 MiB GPU: nothing fits
    monkeypatch.setattr(fitting.DeviceMemory, "read", classmethod(lambda cls, baseline=0: small))
    assert main(["init", "--model", str(tiny_llama), "--data", alpaca, "--out", "b.yaml"]) == 0
    text = (tmp_path / "b.yaml").read_text()
    assert "verdict: does NOT fit" in text and "# More memory than the GPU has: set train.memory_budget: auto" in text
