"""data.streaming (CPU, tiny Llama, real Trainer).

- The stream hands the Trainer exactly the samples the whole-data stage makes (same tokens, same labels, file
  order with shuffle off), and a streamed run trains on them with the same per-step losses (within 1e-6) as the
  non-streamed run: one batch holds the whole data, so the order the Trainer draws it in does not matter.
- Streaming + packing + shuffle, killed with SIGKILL mid-run (test_resume's helpers) and resumed, logs the same
  per-step losses and writes the same adapter as the unbroken streamed run, bitwise; the run crosses blocks and
  passes over the data, and is killed inside a block.
- A bad row past the first block passes `validate` (which says it checked the first block) and stops `train`
  with its file:line, exit 2. Streaming under a launcher is refused in one line.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, adapter, build_tokenizer, losses, write_jsonl
from test_resume import _signal_at, _start
from test_resume import recipe_dict as resume_recipe

from lora_sft import data as data_stage
from lora_sft.cli.main import main
from lora_sft.data import stream
from lora_sft.data.read import read_source, stream_source
from lora_sft.errors import UserError
from lora_sft.recipe.schema import Recipe
from lora_sft.recipe.sections import Source
from lora_sft.run.checkpoint import EXTRA, checkpoints

ROWS = [json.loads(line) for line in (REPO / "data/examples/alpaca.jsonl").read_text().splitlines()]


def recipe_dict(tiny_llama, folder: Path, rows: list, data: dict | None = None, **train) -> dict:
    """test_resume's recipe (alpaca, max_length 64, a checkpoint every step) streaming `rows`, without dropout."""
    recipe = resume_recipe(
        tiny_llama, folder / "run", **{"max_steps": 3, "micro_batch_size": 8, "grad_accum": 1} | train
    )
    source = write_jsonl(folder / "train.jsonl", rows)
    recipe["data"] |= {"train": str(source), "streaming": True, **(data or {})}
    recipe["lora"]["dropout"] = 0.0
    recipe["train"]["eval_before"] = False
    return recipe


def _write(recipe: dict, folder: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.unit
def test_stream_yields_the_whole_data_stages_samples(tmp_path):
    tokenizer = build_tokenizer([json.dumps(r) for r in ROWS])
    recipe = Recipe.model_validate(
        recipe_dict("unused", tmp_path, ROWS[:20], {"shuffle": False, "stream_buffer": 7}, max_steps=1)
    )
    whole = data_stage.build(
        recipe.model_copy(update={"data": recipe.data.model_copy(update={"streaming": False})}), tokenizer
    )
    streamed = stream.build(recipe, tokenizer, stream.check(recipe))
    items = iter(streamed.train)
    got = [next(items) for _ in range(2 * len(whole.train))]  # two passes: the stream loops
    want = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in whole.train]
    assert got == want + want
    assert streamed.stats["train"]["rows"] == 7  # the first block only: what validate checks


@pytest.mark.e2e
def test_streamed_run_equals_whole_data_run(tiny_llama, tmp_path):
    runs = {}
    for streaming in (False, True):
        folder = tmp_path / str(streaming)
        folder.mkdir()
        held_out = str(write_jsonl(folder / "eval.jsonl", ROWS[40:44]))
        recipe = recipe_dict(tiny_llama, folder, ROWS[:8], {"shuffle": False, "streaming": streaming, "eval": held_out})
        assert main(["train", str(_write(recipe, folder))]) == 0
        runs[streaming] = folder / "run"
    whole, streamed = losses(runs[False]), losses(runs[True])
    assert [s for s, _ in streamed] == [1, 2, 3]
    assert [s for s, _ in whole] == [1, 2, 3]
    assert all(abs(a - b) <= 1e-6 for (_, a), (_, b) in zip(whole, streamed)), (whole, streamed)
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs.values()]
    assert summaries[0]["tokens_trained"] == summaries[1]["tokens_trained"]
    assert abs(summaries[0]["eval_loss"] - summaries[1]["eval_loss"]) <= 1e-6  # data.eval, read whole either way


STEPS = 6


@pytest.mark.e2e
def test_streamed_packed_killed_and_resumed_equals_unbroken(tiny_llama, tmp_path, capsys):
    # 24 rows in blocks of 10: about 5 packed rows a block, 4 rows a step, so 6 steps cross blocks and passes
    settings = {"packing": True, "stream_buffer": 10}
    train = {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2}
    recipes = {}
    for name in ("unbroken", "killed"):
        (tmp_path / name).mkdir()
        recipe = recipe_dict(tiny_llama, tmp_path / name, ROWS[:24], settings, **train)
        recipe["lora"]["dropout"] = 0.1  # the resumed RNG must match too
        recipes[name] = _write(recipe, tmp_path / name)
    killed = tmp_path / "killed" / "run"
    proc = _start(recipes["killed"])
    _signal_at([(proc, killed, 4, signal.SIGKILL)])
    assert main(["train", str(recipes["unbroken"])]) == 0  # while the other one starts
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "summary.json").exists()
    saved = json.loads((checkpoints(killed / "checkpoints")[-1] / EXTRA.format("stream")).read_text())
    assert saved["consumed"] % 4 == 0 and set(saved["position"]) == {"passes", "block", "source", "row", "skip"}

    assert main(["train", str(recipes["killed"]), "--resume"]) == 0
    unbroken = tmp_path / "unbroken" / "run"
    assert losses(killed) == losses(unbroken)
    assert [s for s, _ in losses(killed)] == list(range(1, STEPS + 1))
    ref, got = adapter(unbroken), adapter(killed)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    summary = json.loads((unbroken / "summary.json").read_text())
    assert summary["tokens_seen"] == json.loads((killed / "summary.json").read_text())["tokens_seen"]


@pytest.mark.e2e
def test_bad_row_mid_stream_stops_with_its_place(tiny_llama, tmp_path, capsys):
    rows = ROWS[:39] + [{"instruction": "no output here"}] + ROWS[39:45]
    recipe = _write(recipe_dict(tiny_llama, tmp_path, rows, {"stream_buffer": 10}, max_steps=6), tmp_path)
    assert main(["validate", str(recipe)]) == 0
    assert (
        "streamed in blocks of 10 rows (the first 10 checked now, the rest as they are read)" in capsys.readouterr().out
    )
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: {tmp_path / 'train.jsonl'}:40: "), err
    assert checkpoints(tmp_path / "run" / "checkpoints")  # it stopped mid-stream, after steps were trained and saved


@pytest.mark.unit
def test_streaming_under_a_launcher_is_refused(tmp_path, monkeypatch):
    recipe = Recipe.model_validate(recipe_dict("unused", tmp_path, ROWS[:4]))
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(UserError) as e:
        stream.check(recipe)
    assert e.value.problems == [
        "data.streaming: streaming trains in one process (the stream is not split between processes); run without torchrun or accelerate launch, or set data.streaming: false"
    ]


class _FakeHubStream:
    """What datasets' load_dataset(..., streaming=True) returns, as far as the stream uses it: iteration and skip."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __iter__(self):
        return iter(self.rows)

    def skip(self, n: int) -> _FakeHubStream:
        return _FakeHubStream(self.rows[n:])


@pytest.mark.unit
def test_hub_source_is_read_with_datasets_streaming(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return _FakeHubStream(ROWS[:5])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    source = Source(path="someone/alpaca-like", format="alpaca")
    rows = list(stream_source(source, "data.train", start=3))
    assert [r.value for r in rows] == ROWS[3:5]
    assert [r.place for r in rows] == ["someone/alpaca-like[train] row 4", "someone/alpaca-like[train] row 5"]
    assert calls == [("someone/alpaca-like", {"name": None, "split": "train", "revision": None, "streaming": True})]


@pytest.mark.unit
def test_stream_source_from_any_row_equals_read_source(tmp_path):
    """A folder of a .jsonl (blank lines, a BOM, CRLF, a bad line), a .txt and a .csv: from every start row, the
    stream gives read_source's rows from there, places included."""
    folder = tmp_path / "data"
    folder.mkdir()
    lines = [json.dumps(r) for r in ROWS[:4]]
    (folder / "a.jsonl").write_bytes(("\ufeff" + lines[0] + "\r\n\n" + lines[1] + "\n{oops\n  \n" + lines[2]).encode())
    (folder / "b.txt").write_text("one line\n\nanother line\n")
    (folder / "c.csv").write_text("text\nfirst\nsecond\n")
    source = Source(path=str(folder), format="text")
    whole = read_source(source, "data.train")
    assert len(whole) == 8
    for start in range(len(whole) + 1):
        assert list(stream_source(source, "data.train", start)) == whole[start:], start
