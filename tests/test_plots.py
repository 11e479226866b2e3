"""loss.png in every run directory (train and eval loss, the learning rate on a second axis), redrawn at each
checkpoint and at the end; `plot`, which overlays runs labelled by name, and its one-line errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from lora_sft.cli.main import main
from lora_sft.run import plots
from lora_sft.run.records import Manifest
from lora_sft.run.rundir import RunDir

PNG = b"\x89PNG\r\n\x1a\n"  # the 8 bytes every PNG file starts with


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGBA"))


def drawn(figure, path) -> np.ndarray:
    """The figure as the plots module writes it, read back."""
    plots.save(figure, path)
    return pixels(path)


def points(line) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())]


def logged(records: list[dict], metric: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[metric])) for r in records if metric in r]


@pytest.mark.e2e
def test_a_finished_run_has_its_loss_plot_with_both_curves(tiny_run, tmp_path):
    run = RunDir(tiny_run[0])
    assert run.loss_plot.read_bytes().startswith(PNG)
    assert Image.open(run.loss_plot).size == (800, 450)
    records = run.read_metrics()
    figure = plots.loss_figure(records, run.name)
    losses, lr = figure.axes  # the learning rate on its own y axis, sharing the steps
    assert losses.get_title() == "run" and losses.get_xlabel() == "step" and lr.get_ylabel() == "learning rate"
    train, evals = losses.get_lines()
    assert (train.get_label(), evals.get_label()) == ("train loss", "eval loss")
    assert points(train) == logged(records, "loss") and [x for x, _ in points(train)] == [4, 8, 12]
    # before training and after it: the evaluation that follows training is in the plot
    assert points(evals) == logged(records, "eval_loss") and [x for x, _ in points(evals)] == [0, 12]
    [rate] = lr.get_lines()
    assert points(rate) == logged(records, "learning_rate") and {y for _, y in points(rate)} == {3e-2}
    assert [t.get_text() for t in losses.get_legend().get_texts()] == ["train loss", "eval loss", "learning rate"]
    # the file is this figure: drawn from metrics.jsonl as the run left it, after its last evaluation
    assert np.array_equal(pixels(run.loss_plot), drawn(figure, tmp_path / "again.png"))
    assert not list(run.root.glob("*.tmp"))


RECORDS = [
    {"step": 0, "epoch": 0, "eval_loss": 3.0},
    {"step": 1, "epoch": 0.25, "loss": 3.2, "grad_norm": 1.5, "learning_rate": 1e-3},
    {"step": 2, "epoch": 0.5, "loss": 2.6, "grad_norm": 1.1, "learning_rate": 8e-4},
    {"step": 2, "epoch": 0.5, "eval_loss": 2.7},
    {"step": 3, "epoch": 0.75, "loss": 2.2, "grad_norm": 0.9, "learning_rate": 5e-4},
    {"step": 4, "epoch": 1.0, "loss": 1.9, "grad_norm": 0.8, "learning_rate": 2e-4},
    {"step": 4, "epoch": 1.0, "train_runtime": 1.5, "train_loss": 2.5},
    {"step": 4, "epoch": 1.0, "eval_loss": 2.1},
]


def a_run(root, records=RECORDS) -> RunDir:
    run = RunDir(root)
    run.create({"task": "causal_lm"}, Manifest.new(0, "abc", {}, "test"))
    for record in records:
        run.log(record)
    return run


@pytest.mark.unit
def test_loss_plot_is_redrawn_at_each_checkpoint_and_after_the_last_evaluation(tmp_path):
    """What Trainer calls: on_save at a checkpoint, on_train_end, then on_evaluate for the evaluation after training."""
    run = a_run(tmp_path / "my-run", RECORDS[:3])
    callback, state = plots.LossPlot(run), None

    def expected(n: int) -> np.ndarray:
        return drawn(plots.loss_figure(RECORDS[:n], "my-run"), tmp_path / f"expected-{n}.png")

    callback.on_save(None, state, None)  # the checkpoint at step 2
    at_checkpoint = pixels(run.loss_plot)
    assert np.array_equal(at_checkpoint, expected(3))
    for record in RECORDS[3:5]:
        run.log(record)
    callback.on_evaluate(None, state, None)  # an evaluation during training: the next checkpoint draws it
    assert np.array_equal(pixels(run.loss_plot), at_checkpoint)
    callback.on_save(None, state, None)
    assert np.array_equal(pixels(run.loss_plot), expected(5)) and not np.array_equal(at_checkpoint, expected(5))
    for record in RECORDS[5:7]:
        run.log(record)
    callback.on_train_end(None, state, None)
    assert np.array_equal(pixels(run.loss_plot), expected(7))
    run.log(RECORDS[7])
    callback.on_evaluate(None, state, None)  # the evaluation after training
    assert np.array_equal(pixels(run.loss_plot), expected(8))
    assert sorted(p.name for p in run.root.iterdir()) == sorted(
        [".lora_sft-run", "checkpoints", "recipe.yaml", "metrics.jsonl", "manifest.json", "loss.png"]
    )


@pytest.mark.e2e
def test_plot_overlays_runs_labelled_by_name(tiny_run, tmp_path, monkeypatch, capsys):
    baseline = tmp_path / "baseline"
    shutil.copytree(tiny_run[0], baseline, ignore=shutil.ignore_patterns("checkpoints", "adapter", "export"))
    other = a_run(tmp_path / "runs" / "lower-lr")
    monkeypatch.chdir(tmp_path)

    assert main(["plot", str(baseline), str(other.root)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'plot.png'} (loss of 2 runs)"
    runs = [(name, RunDir(root).read_metrics()) for name, root in (("baseline", baseline), ("lower-lr", other.root))]
    figure = plots.overlay_figure(runs, "loss")
    [axes] = figure.axes
    assert [line.get_label() for line in axes.get_lines()] == ["baseline", "lower-lr"]
    assert [points(line) for line in axes.get_lines()] == [logged(records, "loss") for _, records in runs]
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["baseline", "lower-lr"]
    assert axes.get_title() == "loss" and axes.get_ylabel() == "loss"
    assert np.array_equal(pixels(tmp_path / "plot.png"), drawn(figure, tmp_path / "expected.png"))

    # any metric of metrics.jsonl, to any file: the same picture with eval_loss
    out = tmp_path / "eval.svg"
    assert main(["plot", str(baseline), str(other.root), "--metric", "eval_loss", "--out", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml") and "lower-lr" in out.read_text()
    figure = plots.overlay_figure(runs, "eval_loss")
    assert [points(line) for line in figure.axes[0].get_lines()] == [logged(r, "eval_loss") for _, r in runs]


@pytest.mark.unit
def test_runs_of_the_same_name_are_told_apart_by_their_paths(tmp_path, monkeypatch):
    a_run(tmp_path / "a" / "run")
    a_run(tmp_path / "b" / "run")
    monkeypatch.chdir(tmp_path)
    assert plots._labels(["a/run", "b/run"], [RunDir("a/run"), RunDir("b/run")]) == ["a/run", "b/run"]
    assert plots._labels(["a/run"], [RunDir("a/run")]) == ["run"]


@pytest.mark.unit
def test_plot_errors_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys):
    run = a_run(tmp_path / "run")
    (tmp_path / "notes").mkdir()
    monkeypatch.chdir(tmp_path)
    cases = [
        (
            ["plot", "notes"],
            "notes: not a run directory (it has no .lora_sft-run); pass the output_dir of a `train` run",
        ),
        (["plot", "nowhere"], "nowhere: no such folder; pass the output_dir of a `train` run"),
        (
            ["plot", "run", "--metric", "accuracy"],
            "--metric accuracy: run has no 'accuracy' in metrics.jsonl; its metrics: epoch, eval_loss, loss, grad_norm, learning_rate, train_runtime, train_loss",
        ),
        (
            ["plot", "run", "--out", "notes"],
            "--out notes: cannot tell the format; give a file name ending in .png, .svg, .pdf",
        ),
        (["plot", "run", "--out", "x/y.png"], f"--out x/y.png: the folder {tmp_path / 'x'} does not exist"),
    ]
    for argv, error in cases:
        assert main(argv) == 2, argv
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {error}"), line
    (tmp_path / "dir.png").mkdir()
    assert main(["plot", "run", "--out", "dir.png"]) == 2
    assert "--out dir.png: is a folder; give a file name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.png", "notes", "run"]
    assert not run.loss_plot.exists()


@pytest.mark.unit
@pytest.mark.parametrize("suffix", plots.FORMATS)
def test_plot_replaces_only_an_image_it_wrote(tmp_path, monkeypatch, capsys, suffix):
    """A second `plot` to the same --out replaces its own image; a file of the user's there is refused, unchanged."""
    a_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / f"loss{suffix}"
    assert main(["plot", "run", "--out", out.name]) == 0
    first = out.read_bytes()
    assert main(["plot", "run", "--out", out.name, "--metric", "eval_loss"]) == 0
    assert out.read_bytes() != first
    capsys.readouterr()
    figure = tmp_path / f"figure{suffix}"
    plots.overlay_figure([("theirs", [{"step": 1, "loss": 1.0}])], "loss").savefig(figure, format=suffix[1:])
    before = figure.read_bytes()
    assert main(["plot", "run", "--out", figure.name]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: --out {figure.name}: {figure} exists and lora_sft did not write it; `plot` replaces only its own: give --out another file name, or move that file away"
    ]
    assert figure.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([figure.name, out.name, "run"])
