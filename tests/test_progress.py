"""What `train` prints (lora_sft.run.progress): outside a terminal one plain line every logging_steps and one per
evaluation, `--quiet` prints the end-of-run summary alone, and the summary's table holds summary.json's numbers
and lists every file of the run directory."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import yaml
from helpers import REPO

from lora_sft.run.checkpoint import checkpoints

LINE = re.compile(
    r"step (\d+)/(\d+)  loss (\d+\.\d{4})  lr (\d\.\de[-+]\d\d)  ([\d,]+) trained tok/s  (\d+\.\d) GB  eta (\d+:\d\d(?::\d\d)?)"
)


def _table(stdout: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The summary that ends the output: its rows (label -> value) and its files (label -> paths)."""
    lines = stdout.splitlines()
    start = lines.index("summary")
    end = lines.index("files", start)
    row = re.compile(r"  (\S+(?: \S+)*)  +(.+)")
    rows = dict(row.fullmatch(line).groups() for line in lines[start + 1 : end])  # type: ignore[union-attr]
    files: dict[str, list[str]] = {}
    for line in lines[end + 1 :]:
        label, path = row.fullmatch(line).groups()  # type: ignore[union-attr]
        files.setdefault(label, []).append(path)
    return rows, files


def _seconds(clock: str) -> int:
    parts = [int(p) for p in clock.split(":")]
    return sum(p * 60**i for i, p in enumerate(reversed(parts)))


@pytest.mark.e2e
def test_plain_lines_every_logging_steps_and_one_per_evaluation(tiny_run):
    """tiny_run: 12 steps, logging_steps 4, an eval split, trained through the CLI with its output captured."""
    run_dir, _, proc = tiny_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "loss" in r}
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = proc.stdout.splitlines()
    steps = [m for line in lines if (m := LINE.fullmatch(line))]
    assert len(steps) == sum(line.startswith("step ") for line in lines)  # every step line has the exact layout
    assert [int(m.group(1)) for m in steps] == [4, 8, 12] == sorted(logged)  # the last one is max_steps
    for m in steps:
        record = logged[int(m.group(1))]
        assert m.group(2) == "12"
        assert m.group(3) == f"{record['loss']:.4f}" and m.group(4) == f"{record['learning_rate']:.1e}"
        assert int(m.group(5).replace(",", "")) > 0
        assert 0 < float(m.group(6)) <= round(summary["peak_memory_mb"] / 1024, 1)  # the peak so far
    assert steps[-1].group(7) == "0:00"
    # the evaluations before and after training, each a line with the numbers summary.json holds
    evals = [line for line in lines if line.startswith("eval step ")]
    assert evals == [
        f"eval step {step}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        for step, metrics in ((0, summary["eval_before"]), (12, summary["eval"]))
    ]
    printed = proc.stdout + proc.stderr
    assert "{'loss'" not in printed and "train_runtime" not in printed  # Trainer's raw log dicts
    assert "it/s]" not in printed and "s/it]" not in printed and "%|" not in printed  # no tqdm bar anywhere
    assert "FutureWarning" not in printed


@pytest.mark.e2e
def test_the_summary_table_holds_summary_json_and_every_file(tiny_run):
    run_dir, _, proc = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert proc.stdout.count("run directory") == 1  # at the start; the summary lists the files
    assert proc.stdout.splitlines().index("summary") > max(
        i for i, line in enumerate(proc.stdout.splitlines()) if line.startswith(("eval ", "pushed"))
    )  # printed last, after the eval section and the push
    rows, files = _table(proc.stdout)
    assert list(rows) == [
        "time",
        "steps",
        "tokens",
        "seen tokens/s",
        "peak memory",
        "train loss",
        *(f"eval {k}" for k in summary["eval"]),
        # what only the eval section measured: the generation metrics, base -> fine-tuned
        *(f"held-out {k}" for k in summary["evaluation"]["fine_tuned"] if k not in summary["eval"]),
    ]
    wall, train = re.fullmatch(r"(\S+) \(training (\S+)\)", rows["time"]).groups()  # type: ignore[union-attr]
    assert _seconds(wall) == round(summary["wall_time_s"]) and _seconds(train) == round(summary["train_time_s"])
    assert rows["steps"] == f"12 ({round(summary['epochs'], 2):g} epochs)" and summary["steps"] == 12
    assert rows["tokens"] == f"{summary['tokens_seen']:,} seen, {summary['tokens_trained']:,} trained"
    assert rows["seen tokens/s"] == f"{summary['tokens_per_second']:,.0f}"
    assert rows["peak memory"] == f"{summary['peak_memory_mb'] / 1024:.1f} GB (cpu peak rss)"
    assert rows["train loss"] == f"{summary['train_loss']:.4f} (last logged; mean {summary['train_loss_mean']:.4f})"
    for k, after in summary["eval"].items():
        assert rows[f"eval {k}"] == f"{summary['eval_before'][k]:.4f} → {after:.4f}"
    # every file and folder of the run directory, by its full path; each complete checkpoint
    listed = {path for paths in files.values() for path in paths}
    expected = {f"{p}/" if p.is_dir() else str(p) for p in run_dir.iterdir() if not p.name.startswith(".")}
    expected = (expected - {f"{run_dir / 'checkpoints'}/"}) | {f"{p}/" for p in checkpoints(run_dir / "checkpoints")}
    expected |= {str(run_dir / "adapter" / "README.md")}
    assert listed == expected
    assert files["model card"] == [str(run_dir / "adapter" / "README.md")] and files["checkpoints"] == [
        f"{run_dir / 'checkpoints' / 'checkpoint-12'}/"
    ]


@pytest.mark.e2e
def test_the_summary_time_includes_the_eval_section(tiny_llama, tmp_path):
    """summary.json's wall time (the summary's `time`) runs to the end of the run, after the recipe's eval section
    (which reloads the model and generates), not to the end of the Trainer's last evaluation."""
    from lora_sft.recipe.load import load_recipe
    from lora_sft.train import run

    recipe = {
        "task": "causal_lm",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 2, "alpha": 4},
        "data": {"format": "alpaca", "train": str(REPO / "data/examples/alpaca.jsonl"), "eval_fraction": 0.125},
        "train": {"max_steps": 1, "micro_batch_size": 4, "warmup": 0, "save_steps": 1, "eval_before": False},
        "eval": {"after_train": True, "generate": 2, "max_new_tokens": 4},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    said: list[tuple[float, str]] = []
    result = run(load_recipe(tmp_path / "recipe.yaml"), log=lambda line: said.append((time.perf_counter(), str(line))))
    opened = next(t for t, line in said if line.startswith("run directory: "))
    evaluated = next(t for t, line in said if line.startswith("wrote ") and line.endswith("eval.md"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["wall_time_s"] >= round(evaluated - opened, 2) and result.summary == summary


@pytest.mark.e2e
def test_quiet_prints_the_summary_alone(tiny_llama, tmp_path):
    """A classification run with --quiet: nothing on stdout but the summary (eval before -> after per metric),
    nothing on stderr."""
    recipe = {
        "task": "classification",
        "output_dir": str(tmp_path / "run"),
        "model": {"path": str(tiny_llama)},
        "lora": {"rank": 2, "alpha": 4, "dropout": 0.0},
        "data": {
            "format": "classification",
            "train": str(REPO / "data/quickstart/train.jsonl"),
            "eval": str(REPO / "data/quickstart/eval.jsonl"),
            "max_length": 48,
        },
        "train": {"max_steps": 2, "micro_batch_size": 8, "warmup": 0, "logging_steps": 1, "save_steps": 2},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    proc = subprocess.run(
        [sys.executable, "-m", "lora_sft", "train", str(tmp_path / "recipe.yaml"), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    assert proc.stdout.splitlines()[0] == "summary"
    rows, files = _table(proc.stdout)  # the rest is the table and the files
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and set(summary["eval"]) == {"loss", "accuracy", "f1"}
    for k in ("loss", "accuracy", "f1"):
        assert rows[f"eval {k}"] == f"{summary['eval_before'][k]:.4f} → {summary['eval'][k]:.4f}"
    assert files["summary"] == [str(tmp_path / "run" / "summary.json")]


@pytest.mark.unit
def test_one_epoch_is_singular_and_the_rates_say_what_they_count(tmp_path):
    from lora_sft.console import amount
    from lora_sft.run.progress import summary_lines
    from lora_sft.run.records import Summary
    from lora_sft.run.rundir import RunDir

    assert [amount(n, "epoch") for n in (1, 1.0, 0.5, 2, 1200)] == [
        "1 epoch",
        "1 epoch",
        "0.5 epochs",
        "2 epochs",
        "1,200 epochs",
    ]
    summary = Summary(
        train_loss=0.5,
        train_loss_mean=0.6,
        eval_loss=None,
        eval=None,
        eval_before=None,
        steps=1,
        epochs=1.0,
        tokens_seen=500,
        tokens_trained=100,
        tokens_per_second=50.0,
        skipped_steps=[],
        trainable_params=10,
        total_params=100,
        peak_memory_mb=1024.0,
        peak_memory_kind="cpu_peak_rss",
        train_time_s=10.0,
        wall_time_s=12.0,
    )
    lines = summary_lines(summary, RunDir(tmp_path / "run"))
    assert "  steps          1 (1 epoch)" in lines and "  seen tokens/s  50" in lines
