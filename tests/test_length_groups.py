"""data.group_by_length: the batches of an unpacked causal run pad less, seeded by (seed, epoch); packed and
classification runs keep the plain shuffle. Batches come from the Trainer's own dataloader, as `train` builds it
(`training_arguments`, the data stage's length column, `SeedLengthGroups` at each epoch's start).

That a run killed mid-epoch and resumed trains on the same batches is tests/test_resume.py: its runs are unpacked,
of samples from 46 to 102 characters, grouped by default, and cross an epoch boundary; without `SeedLengthGroups`
their per-step losses differ."""

from __future__ import annotations

import random

import pytest
import torch
from helpers import build_tokenizer, write_jsonl
from transformers import Trainer
from transformers.trainer_callback import TrainerState

from lora_sft import data as data_stage
from lora_sft.preflight import describe_plan
from lora_sft.recipe.load import load_recipe
from lora_sft.run import trainer as trainer_stage
from lora_sft.settings import groups_by_length, resolve

pytestmark = pytest.mark.unit

WORDS = ["apple", "banana", "cherry", "river", "stone", "cloud", "paper", "green", "quiet", "seven"]
MICRO, ACCUM, ROWS = 4, 2, 96


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([" ".join(WORDS)] * 4 + ["Below is an instruction. Write a response."] * 4)


def spread_rows(n: int = ROWS) -> list[dict]:
    """Alpaca rows whose responses spread from 1 to about 120 words, lognormal (as chat data does)."""
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        words = min(120, max(1, round(rng.lognormvariate(3.0, 0.9))))
        rows.append({"instruction": "Say some words.", "output": " ".join(rng.choice(WORDS) for _ in range(words))})
    return rows


@pytest.fixture
def recipe(tmp_path, write_recipe):
    train = write_jsonl(tmp_path / "train.jsonl", spread_rows())

    def make(seed: int = 3, task: str = "causal_lm", **data):
        return load_recipe(
            write_recipe(
                {
                    "task": task,
                    "output_dir": str(tmp_path / "run"),
                    "seed": seed,
                    "model": {"path": "unused"},
                    "data": {"format": "alpaca", "train": str(train), "max_length": 512, **data},
                    "train": {"micro_batch_size": MICRO, "grad_accum": ACCUM},
                },
                name=f"recipe-{seed}-{sorted(data.items())}.yaml",
            )
        )

    return make


def epoch_batches(recipe, tokenizer, epochs: int = 1, first: int = 0) -> list[list[dict]]:
    """The train batches of each epoch, from a fresh Trainer's dataloader, starting at epoch `first`."""
    bundle = data_stage.build(recipe, tokenizer)
    args = trainer_stage.training_arguments(
        resolve(recipe), recipe.output_dir, has_eval=False
    )  # Trainer makes this folder
    trainer = Trainer(
        model=torch.nn.Linear(1, 1),
        args=args,
        train_dataset=bundle.train,
        data_collator=data_stage.collator(recipe, tokenizer),
        processing_class=tokenizer,
    )
    loader = trainer.accelerator.prepare(trainer.get_train_dataloader())
    out = []
    for epoch in range(first, first + epochs):
        if groups_by_length(recipe):  # what `train` does at each epoch's start
            trainer_stage.SeedLengthGroups().on_epoch_begin(
                args, TrainerState(epoch=epoch), None, train_dataloader=loader
            )
        loader.set_epoch(epoch)  # what Trainer does next (the plain shuffle's seed)
        out.append(list(loader))
    return out


def padding(batches: list[dict]) -> tuple[int, int]:
    """(pad tokens, real tokens) of an epoch, counted from the attention masks."""
    masks = [b["attention_mask"] for b in batches]
    return sum(int((m == 0).sum()) for m in masks), sum(int(m.sum()) for m in masks)


def rows_of(batches: list[dict]) -> list[tuple[int, ...]]:
    return [tuple(r[m.bool()].tolist()) for b in batches for r, m in zip(b["input_ids"], b["attention_mask"])]


def test_grouped_batches_pad_less_and_visit_every_sample_once(recipe, tokenizer):
    grouped_recipe, plain_recipe = recipe(), recipe(group_by_length=False)
    assert groups_by_length(grouped_recipe) and not groups_by_length(plain_recipe)
    bundle = data_stage.build(grouped_recipe, tokenizer)
    lengths = [len(r) for r in bundle.train["input_ids"]]
    assert list(bundle.train[data_stage.LENGTH]) == lengths and max(lengths) > 4 * min(lengths)  # a real spread

    (grouped,), (plain,) = epoch_batches(grouped_recipe, tokenizer), epoch_batches(plain_recipe, tokenizer)
    samples = sorted(tuple(r) for r in bundle.train["input_ids"])
    assert sorted(rows_of(grouped)) == sorted(rows_of(plain)) == samples  # each sample once, nothing cut
    (pad_grouped, real_grouped), (pad_plain, real_plain) = padding(grouped), padding(plain)
    assert real_grouped == real_plain == sum(lengths)
    # the same samples, less than a third of the padding (exact counts, from the masks Trainer's batches carry)
    assert 3 * pad_grouped < pad_plain, (pad_grouped, pad_plain)
    # the longest sample's batch comes first (an out-of-memory run fails at its first step)
    assert max(lengths) in (len(r) for r in rows_of(grouped[:1]))


def test_the_order_is_seeded_by_seed_and_epoch(recipe, tokenizer):
    """The same seed draws the same batches; a new epoch draws new ones, and a fresh Trainer told the epoch (a resumed
    run) draws that epoch's batches again; another seed draws another order."""
    first, second = epoch_batches(recipe(seed=3), tokenizer, epochs=2)
    again = epoch_batches(recipe(seed=3), tokenizer)[0]
    assert rows_of(first) == rows_of(again)
    assert rows_of(second) != rows_of(first) and sorted(rows_of(second)) == sorted(rows_of(first))
    assert rows_of(epoch_batches(recipe(seed=3), tokenizer, first=1)[0]) == rows_of(second)
    assert rows_of(epoch_batches(recipe(seed=4), tokenizer)[0]) != rows_of(first)


def test_packed_and_classification_runs_keep_the_plain_shuffle(recipe, tokenizer, tmp_path, write_recipe):
    packed = recipe(packing=True)
    assert packed.data.group_by_length and not groups_by_length(packed)
    args = trainer_stage.training_arguments(resolve(packed), "unused", has_eval=False)
    assert args.train_sampling_strategy == "random"
    assert data_stage.LENGTH not in data_stage.build(packed, tokenizer).train.column_names
    rows = [{"text": " ".join(WORDS[: i % 7 + 1]), "label": ["a", "b"][i % 2]} for i in range(8)]
    classify = load_recipe(
        write_recipe(
            {
                "task": "classification",
                "output_dir": str(tmp_path / "run"),
                "model": {"path": "unused"},
                "data": {"format": "classification", "train": str(write_jsonl(tmp_path / "c.jsonl", rows))},
            },
            name="classify.yaml",
        )
    )
    assert classify.data.group_by_length and not groups_by_length(classify)
    assert (
        trainer_stage.training_arguments(resolve(classify), "unused", has_eval=False).train_sampling_strategy
        == "random"
    )
    # the classification collator pads every column it gets: no length column reaches the model
    assert data_stage.LENGTH not in data_stage.build(classify, tokenizer).train.column_names


def test_training_arguments_and_the_plan_say_it(recipe):
    grouped = recipe()
    args = trainer_stage.training_arguments(resolve(grouped), "unused", has_eval=True)
    assert (args.train_sampling_strategy, args.length_column_name) == ("group_by_length", data_stage.LENGTH)
    off = trainer_stage.training_arguments(resolve(recipe(group_by_length=False)), "unused", has_eval=True)
    assert off.train_sampling_strategy == "random"
    checked = data_stage.check(grouped)
    assert ", grouped by length, " in next(
        line for line in describe_plan(resolve(grouped), checked, None) if line.startswith("data:")
    )
    off_line = next(
        line
        for line in describe_plan(resolve(recipe(group_by_length=False)), checked, None)
        if line.startswith("data:")
    )
    assert "grouped" not in off_line and "packed" not in off_line


def test_switching_it_reuses_the_tokenized_cache(recipe, tokenizer):
    """The option orders batches; it changes no token, so the cached data stays valid."""
    assert data_stage.cache_key(recipe(), tokenizer) == data_stage.cache_key(recipe(group_by_length=False), tokenizer)
    assert data_stage.cache_key(recipe(), tokenizer) != data_stage.cache_key(recipe(max_length=256), tokenizer)
