"""The run directory's owner (lora_sft.run.rundir): a finished run opened through it, its typed records read and
written back byte for byte, and the model card rendered after the eval section, so it holds the eval table."""

from __future__ import annotations

import json
import re

import pytest

from lora_sft.export.card import write_card
from lora_sft.export.reopen import FinishedRun, open_run
from lora_sft.run.records import Evaluation, Manifest, Summary
from lora_sft.run.rundir import CARD, RunDir


def _logged(stdout: str, name: str) -> dict[str, str]:
    """The metrics `train` printed for the eval section's `name` (base, fine-tuned), as 4-decimal strings."""
    [line] = [line for line in stdout.splitlines() if line.startswith(f"eval {name}: ")]
    return dict(item.rsplit(" ", 1) for item in line.removeprefix(f"eval {name}: ").split(", "))


@pytest.mark.e2e
def test_a_finished_run_opens_through_its_owner(tiny_run):
    run_dir, _, _ = tiny_run
    run = open_run(run_dir)
    assert isinstance(run, FinishedRun) and run.dir.root == run_dir.resolve() and run.adapter == run_dir / "adapter"
    saved, loaded = run.dir.read_recipe(), run.recipe.saved_dict()
    assert loaded["train"].pop("gradient_checkpointing") is False  # a finished run is not trained again
    saved["train"].pop("gradient_checkpointing")
    assert loaded == saved  # otherwise recipe.yaml as written loads back as the recipe
    summary = run.dir.read_summary()
    assert isinstance(summary, Summary) and summary.steps == 12 and isinstance(summary.evaluation, Evaluation)
    # the typed records write exactly the JSON that is on disk: same keys, same order, same values
    raw = run.dir.summary.read_text()
    assert json.dumps(Summary.from_json(json.loads(raw)).to_json(), indent=2, default=str) + "\n" == raw
    raw = run.dir.manifest.read_text()
    assert json.dumps(Manifest.from_json(json.loads(raw)).to_json(), indent=2, default=str) + "\n" == raw


@pytest.mark.e2e
def test_the_card_holds_the_eval_table_locally_and_on_the_hub(tiny_run):
    """The card is rendered after the recipe's eval section: adapter/README.md, and the copy pushed with
    hub.after: train, have the base / fine-tuned table with the numbers the eval section measured."""
    run_dir, hub, proc = tiny_run
    base, tuned = _logged(proc.stdout, "base"), _logged(proc.stdout, "fine-tuned")
    assert set(base) == set(tuned) >= {"loss", "perplexity", "token_accuracy"}
    rows = [f"| {k} | {base[k]} | {tuned[k]} | " for k in tuned]
    local = (run_dir / "adapter" / CARD).read_text()
    pushed = hub.files[("me/tiny-adapter", "v1")][CARD].decode()
    for card in (local, pushed):
        assert "## Evaluation" in card and "| metric | base | fine-tuned | change |" in card
        for row in rows:
            assert row in card, row
    table = re.search(r"## Evaluation\n\n(\d+) held-out samples \(eval split\)\.", local)
    assert table and int(table.group(1)) == json.loads((run_dir / "manifest.json").read_text())["data"]["eval"]["rows"]


@pytest.mark.unit
def test_the_card_has_no_eval_table_before_an_evaluation(tmp_path):
    run = RunDir(tmp_path / "run")
    stats = {"train": {"rows": 4, "trained_tokens": 40}, "eval": {"rows": 0}}
    recipe = {"task": "causal_lm", "model": {"path": "org/base"}, "quant": {"mode": "nf4"}, "lora": {"rank": 4}}
    run.create(recipe, Manifest.new(0, "f", stats, "org/base (hub)"))
    summary = Summary(1.0, 1.0, None, None, None, 1, 1.0, 10, 5, 1.0, [], 8, 100, 1.0, "cpu_peak_rss", 1.0, 1.0)
    run.finish(Manifest.from_json(run.read_manifest()), summary)
    run.adapter.mkdir()
    write_card(run, None)
    assert "## Evaluation" not in run.card.read_text() and "base_model: org/base" in run.card.read_text()
    evaluation = Evaluation("eval split", 2, {"loss": 0.5}, [], base={"loss": 0.75})
    run.write_evaluation(evaluation, "table")
    write_card(run, None)
    assert "| loss | 0.7500 | 0.5000 | -0.2500 |" in run.card.read_text()
    assert json.loads(run.summary.read_text())["evaluation"] == {
        "data": "eval split",
        "rows": 2,
        "base": {"loss": 0.75},
        "fine_tuned": {"loss": 0.5},
        "samples": [],
    }
