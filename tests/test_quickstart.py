"""The README's quickstart, run as a user runs it: the CLI on recipes/quickstart.yaml (real MiniLM, 4-bit)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import yaml
from helpers import REPO

pytestmark = pytest.mark.e2e
CONTRACT = [
    "adapter/adapter_model.safetensors",
    "adapter/adapter_config.json",
    "adapter/README.md",
    "adapter/tokenizer_config.json",
    "recipe.yaml",
    "manifest.json",
    "metrics.jsonl",
    "loss.png",
    "summary.json",
    "checkpoints",
]


def test_quickstart(tmp_path):
    out = tmp_path / "quickstart"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "train", "recipes/quickstart.yaml", f"output_dir={out}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]  # peft's hub lookup at each checkpoint save among them
    assert proc.stdout.count(f"run directory: {out}") == 1  # at the start; the summary at the end lists the files

    for name in CONTRACT:
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["eval_before"]["accuracy"], summary["eval"]["accuracy"]
    assert after >= 0.85 and after - before >= 0.25, (before, after)
    assert "f1" in summary["eval"] and "f1" in summary["eval_before"]
    # the recipe's eval section re-measured base and fine-tuned from the saved adapter: the Trainer's numbers
    evaluation = summary["evaluation"]
    for ours, trainers in ((evaluation["fine_tuned"], summary["eval"]), (evaluation["base"], summary["eval_before"])):
        assert ours["accuracy"] == trainers["accuracy"] and ours["f1"] == pytest.approx(trainers["f1"], abs=1e-9)
        assert ours["loss"] == pytest.approx(trainers["loss"], rel=1e-4)
    table = (out / "eval.md").read_text()
    assert f"| accuracy | {before:.4f} | {after:.4f} |" in table and "| f1 |" in table
    for key in ("train_loss", "eval_loss", "tokens_trained", "tokens_per_second", "peak_memory_mb", "wall_time_s"):
        assert summary[key] is not None and summary[key] > 0, key
    # the summary's table: each metric before -> after training, as summary.json has it
    assert re.search(rf"\n  eval accuracy +{before:.4f} → {after:.4f}\n", proc.stdout), proc.stdout[-2000:]

    adapter_bytes = sum(f.stat().st_size for f in (out / "adapter").rglob("*") if f.is_file())
    assert adapter_bytes < 5 * 2**20, adapter_bytes

    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (
        resolved["output_dir"] == str(out)
        and resolved["quant"]["double_quant"] is True
        and resolved["train"]["gradient_checkpointing"] == "auto"  # as written; the planner resolves it per run
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["seed"] == 42 and len(manifest["data_fingerprint"]) == 64 and manifest["ended"] >= manifest["started"]
    )
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(manifest["versions"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records) and sum("eval_loss" in r for r in records) == 2
    assert list((out / "checkpoints").glob("checkpoint-*/adapter_model.safetensors"))
    card = (out / "adapter/README.md").read_text()
    assert card.startswith("---\nbase_model: sentence-transformers/all-MiniLM-L6-v2\nlibrary_name: peft")
    assert (
        json.loads((out / "adapter/adapter_config.json").read_text())["base_model_name_or_path"]
        == "sentence-transformers/all-MiniLM-L6-v2"
    )
