"""The data stage at scale: rows go through Arrow files a batch at a time, so the Python heap does not grow with the
number of rows, and what comes out is what tokenizing the checked rows one by one into lists gives."""

from __future__ import annotations

import bisect
import os
import random
import tracemalloc

import numpy as np
import pytest
from helpers import build_tokenizer, write_jsonl

from lora_sft import data as data_stage
from lora_sft.data import read
from lora_sft.data.encode import tokenize
from lora_sft.data.packing import best_fit_decreasing, bins_of, pack
from lora_sft.data.templates import NAMED
from lora_sft.errors import UserError
from lora_sft.recipe.load import load_recipe
from lora_sft.tokens import count_trained

pytestmark = pytest.mark.unit

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "then", "runs", "home"]


def chat(i: int, rng: random.Random) -> dict:
    say = lambda n: " ".join(rng.choices(WORDS, k=n))  # noqa: E731
    turns = [{"role": "user", "content": f"{i} {say(rng.randint(1, 12))}"}]
    turns.append({"role": "assistant", "content": say(rng.randint(1, 30))})
    if i % 3 == 0:
        turns += [{"role": "user", "content": say(3)}, {"role": "assistant", "content": say(rng.randint(1, 9))}]
    return {"messages": turns}


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return build_tokenizer([" ".join(rng.choices(WORDS, k=20)) for _ in range(50)])


@pytest.fixture
def recipe(tmp_path, write_recipe):
    def make(train, **data):
        return load_recipe(
            write_recipe(
                {
                    "task": "causal_lm",
                    "output_dir": str(tmp_path / "run"),
                    "model": {"path": "unused"},
                    "data": {"format": "messages", "train": train, "max_length": 48, "max_dropped": 1.0, **data},
                }
            )
        )

    return make


def mixed_sources(tmp_path) -> list:
    """Chats (some cut by max_length), alpaca rows with a weight, prompt/completion rows with a limit, long text rows
    that chunk: every path of the tokenizer, shuffled, weighted, held out."""
    rng = random.Random(1)
    write_jsonl(tmp_path / "chat.jsonl", [chat(i, rng) for i in range(120)])
    write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": f"say {i}", "input": "the dog" if i % 2 else "", "output": "a fox " * (i % 5 + 1)}
            for i in range(30)
        ],
    )
    write_jsonl(tmp_path / "pc.jsonl", [{"prompt": f"p {i} the", "completion": f"lazy {i}"} for i in range(40)])
    write_jsonl(tmp_path / "text.jsonl", [{"text": "the quick brown fox " * (i % 7 + 1)} for i in range(25)])
    return [
        str(tmp_path / "chat.jsonl"),
        {"path": str(tmp_path / "alpaca.jsonl"), "format": "alpaca", "weight": 1.5},
        {"path": str(tmp_path / "pc.jsonl"), "format": "prompt_completion", "limit": 33},
        {"path": str(tmp_path / "text.jsonl"), "format": "text"},
    ]


def by_lists(examples, tokenizer, opts) -> tuple[list[dict], dict]:
    """The data stage as it was: every checked row tokenized one by one (`tokenize`), the samples held in lists."""
    results = [tokenize(e, tokenizer, opts) for e in examples]
    samples = [s for r in results for s in r.samples]
    stats = {
        "rows": len(examples),
        "samples": len(samples),
        "truncated": sum(r.truncated for r in results),
        "dropped_no_trained_token": sum(r.untrained for r in results),
        "dropped_too_long": sum(r.too_long for r in results),
        "tokens": sum(len(s["input_ids"]) for s in samples),
        "trained_tokens": sum(count_trained(s["labels"]) for s in samples),
    }
    return samples, stats


@pytest.mark.parametrize("template", ["own", "chatml"])  # incremental masks; {% generation %} masks, batched
@pytest.mark.parametrize("packing", [False, True])
def test_arrow_built_data_equals_the_list_built_data_row_for_row(template, packing, tmp_path, recipe, tokenizer):
    tok = build_tokenizer(["the quick brown fox"] * 3, template=NAMED["chatml"]) if template == "chatml" else tokenizer
    r = recipe(mixed_sources(tmp_path), eval_fraction=0.1, packing=packing, cache=False)
    checked = data_stage.check(r)
    bundle = data_stage.build(r, tok, checked)
    for split, examples, got in (("train", checked.train, bundle.train), ("eval", checked.eval, bundle.eval)):
        samples, stats = by_lists(list(examples), tok, data_stage.options(r))
        if packing:
            samples, efficiency = pack(samples, r.data.max_length)
            stats |= {"packing_efficiency": efficiency, "packed_rows": len(samples)}
        else:
            samples = [s | {"length": len(s["input_ids"])} for s in samples]
        assert list(got) == samples
        assert bundle.stats[split] == pytest.approx(stats)
    assert bundle.stats["train"]["truncated"] > 0 and bundle.stats["eval"]["rows"] > 0


def test_ten_times_the_rows_does_not_grow_the_python_heap(tmp_path, recipe, tokenizer):
    """tracemalloc's peak over check + build (one process, no cache) for 2,000 and 20,000 short prompt/completion rows
    (the chats' masks take longer to make, not more memory: the same batches). Rows held as
    Python objects cost ~20 KB each (the old stage: 18,000 more rows, hundreds of MB). What still grows is bounded
    or small: a file over read.CHUNK (4 MiB: the 20,000 rows) is checked for UTF-8 in 1 MiB pieces (2 MiB of bytes
    and text at once), and numpy arrays of a few bytes per row (orders, sample counts, lengths, flags: ~150 bytes a
    row at the peak, ~2.7 MB for 18,000 more rows). Measured: +3.8 MB; the bound, 8 MB, is 1/45 of what lists of
    the rows would take."""
    peaks: list[int] = []
    for n in (2_000, 2_000, 20_000):  # the first run imports what the stage needs: not measured
        rng = random.Random(n)
        rows = [
            {"prompt": f"{i} {' '.join(rng.choices(WORDS, k=8))}", "completion": " ".join(rng.choices(WORDS, k=24))}
            for i in range(n)
        ]
        write_jsonl(tmp_path / f"{n}.jsonl", rows)
        r = recipe(str(tmp_path / f"{n}.jsonl"), format="prompt_completion", cache=False, num_proc=1)
        tracemalloc.start()
        bundle = data_stage.build(r, tokenizer, data_stage.check(r))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert len(bundle.train) == n
    peaks = peaks[1:]
    assert peaks[1] - peaks[0] < 8 * 2**20, [p / 2**20 for p in peaks]


ARROW_PEAK = """
import json, sys
import pyarrow as pa
from helpers import build_tokenizer
from lora_sft import data as data_stage
from lora_sft.recipe.load import load_recipe

tokenizer = build_tokenizer(["the quick brown fox jumps over a lazy dog and then runs home"])
recipe = load_recipe(sys.argv[1])
data_stage.build(recipe, tokenizer, data_stage.check(recipe))
print(json.dumps(pa.default_memory_pool().max_memory()))
"""


def test_ten_times_the_rows_does_not_grow_arrows_peak_allocation(tmp_path, write_recipe):
    """Arrow's own allocations (which tracemalloc does not see) at their peak over check + build, in a fresh
    process, for 2,000 and 20,000 rows of ~2 KB: the gathers read only the chunks that hold their rows (a column's
    own `take` on a file of many chunks first copied the whole file into memory: 40 MB more at 20,000 rows, and on
    every batch, so a million rows meant copying 2 GB a thousand times)."""
    import json
    import subprocess
    import sys

    from helpers import REPO

    peaks = []
    rng = random.Random(0)
    for n in (2_000, 20_000):
        rows = [
            {"prompt": f"{i} {' '.join(rng.choices(WORDS, k=8))}", "completion": " ".join(rng.choices(WORDS, k=400))}
            for i in range(n)
        ]
        write_jsonl(tmp_path / f"{n}.jsonl", rows)
        recipe = write_recipe(
            {
                "task": "causal_lm",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": "unused"},
                "data": {
                    "format": "prompt_completion",
                    "train": str(tmp_path / f"{n}.jsonl"),
                    "max_length": 2048,
                    "cache": False,
                    "num_proc": 1,
                },
            },
            name=f"{n}.yaml",
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        proc = subprocess.run(
            [sys.executable, "-c", ARROW_PEAK, str(recipe)], capture_output=True, text=True, env=env, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        peaks.append(json.loads(proc.stdout.splitlines()[-1]))
    assert peaks[1] - peaks[0] < 8 * 2**20, [p / 2**20 for p in peaks]


def test_a_large_file_read_line_by_line_gives_the_same_rows_and_errors(tmp_path, monkeypatch):
    lines = ['{"text": "a"}', "", '\ufeff{"text": "b"}\r', "not json", '{"text": "c"}']
    path = tmp_path / "t.jsonl"
    path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    whole = list(read._jsonl(path))
    monkeypatch.setattr(read, "CHUNK", 8)  # every file is "large": checked in chunks, read line by line
    assert list(read._jsonl(path)) == whole and [r.place.rsplit(":", 1)[1] for r in whole] == ["1", "3", "4", "5"]
    path.write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"t\.jsonl:3: invalid UTF-8 \(byte 38\)"):  # as when read whole
        list(read._jsonl(path))
    monkeypatch.setattr(read, "CHUNK", 1 << 24)
    with pytest.raises(UserError, match=r"t\.jsonl:3: invalid UTF-8 \(byte 38\)"):
        list(read._jsonl(path))


def test_bins_by_space_left_equal_the_sorted_free_list():
    """`bins_of` keeps open bins by the space they have left; the rule is best_fit_decreasing's, written as a sorted
    list of (space, bin): the same bin for every sample."""

    def free_list(lengths: list[int], capacity: int) -> list[int]:
        out, free, opened = [0] * len(lengths), [], 0
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            at = bisect.bisect_left(free, (lengths[i], -1))
            if at < len(free):
                space, b = free.pop(at)
            else:
                space, b, opened = capacity, opened, opened + 1
            out[i] = b
            if space - lengths[i] > 0:
                bisect.insort(free, (space - lengths[i], b))
        return out

    for seed in range(20):
        rng = random.Random(seed)
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(0, 400))]
        assert bins_of(lengths, 64).tolist() == free_list(lengths, 64)
    assert best_fit_decreasing([5, 4, 3, 2, 2], 8) == [[0, 2], [1, 3, 4]]
    assert np.array_equal(bins_of([5, 4, 3, 2, 2], 8), [0, 1, 0, 1, 1])
