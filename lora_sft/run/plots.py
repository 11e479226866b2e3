"""Plots drawn from metrics.jsonl: `loss.png` in every run directory, and the `plot` command, which overlays runs.

`loss.png` shows the train and eval loss against the optimizer step, with the learning rate on a second y axis,
titled with the run's name. `LossPlot` (a Trainer callback) redraws it at each checkpoint and when training ends,
and once more after the evaluation that follows training (its point would be missing otherwise). `plot` draws one
metric of several runs on one axis, each line labelled with its run's name.

Figures are built on matplotlib's Agg canvas (no display, no pyplot state) and written atomically, as every file
of a run directory is (`files.write_atomic`), with lora_sft's mark in their metadata: `plot --out` replaces an image
it wrote before and refuses any other file (the ownership rule, `files.check_replaceable`).
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import TrainerCallback

from lora_sft.distributed import main_only
from lora_sft.errors import UserError
from lora_sft.paths import resolved
from lora_sft.run.files import check_replaceable, mark_text, write_atomic
from lora_sft.run.rundir import MARKER, RunDir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMATS = (".png", ".svg", ".pdf")  # what `plot --out` writes, by the file's suffix
DEFAULT_OUT = "plot.png"  # `plot` without --out: in the working directory, so no run's own loss.png is replaced


def series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    """The (steps, values) of `metric` in metrics.jsonl's records: the records that hold it as a number."""
    points = [
        (r["step"], float(r[metric]))
        for r in records
        if isinstance(r.get(metric), numbers.Real) and not isinstance(r.get(metric), bool) and "step" in r
    ]
    return [s for s, _ in points], [v for _, v in points]


def metrics_in(records: list[dict]) -> list[str]:
    """The metrics metrics.jsonl holds (every numeric key but the step), in the order they first appear."""
    names: dict[str, None] = {}
    for r in records:
        for key, value in r.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                names.setdefault(key, None)
    return list(names)


def _figure() -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas: rendering needs no display
    return figure


def _step_axis(axes) -> None:
    from matplotlib.ticker import MaxNLocator

    axes.set_xlabel("step")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)


def loss_figure(records: list[dict], name: str) -> Figure:
    """loss.png: train loss and eval loss against step on the left axis, the learning rate on the right one."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.set_title(name)
    _step_axis(axes)
    axes.set_ylabel("loss")
    axes.plot(*series(records, "loss"), color="C0", marker=".", label="train loss")
    axes.plot(*series(records, "eval_loss"), color="C1", marker="o", label="eval loss")
    lr = axes.twinx()
    lr.set_ylabel("learning rate")
    lr.plot(*series(records, "learning_rate"), color="C2", linestyle="--", alpha=0.7, label="learning rate")
    lr.set_ylim(bottom=0)  # the schedule as it is: warmup from 0, decay towards 0
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lines = [*axes.get_lines(), *lr.get_lines()]
    axes.legend(lines, [str(line.get_label()) for line in lines], loc="upper right")
    return figure


def overlay_figure(runs: list[tuple[str, list[dict]]], metric: str) -> Figure:
    """`plot`: one line per run, labelled with its name: `metric` against step."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.set_title(metric)
    _step_axis(axes)
    axes.set_ylabel(metric)
    for name, records in runs:
        axes.plot(*series(records, metric), marker=".", label=name)
    axes.legend()
    return figure


def save(figure: Figure, path: Path) -> None:
    """Write the figure in the format its suffix names, atomically, marked as lora_sft's (its Creator metadata)."""
    metadata = {"Creator": mark_text("plot")}
    write_atomic(path, lambda tmp: figure.savefig(tmp, format=path.suffix.lstrip("."), metadata=metadata))


@main_only
def write_loss_plot(run_dir: RunDir) -> None:
    """RUN_DIR/loss.png from what metrics.jsonl holds now (the main process's job under a launcher)."""
    save(loss_figure(run_dir.read_metrics(), run_dir.name), run_dir.loss_plot)


class LossPlot(TrainerCallback):
    """loss.png at each checkpoint and at the end: when training ends and after the evaluation that follows it
    (`train.evaluate_after` logs its eval loss after on_train_end)."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.trained = False

    def on_save(self, args, state, control, **kwargs):
        write_loss_plot(self.run_dir)

    def on_train_end(self, args, state, control, **kwargs):
        self.trained = True
        write_loss_plot(self.run_dir)

    def on_evaluate(self, args, state, control, **kwargs):
        if self.trained:
            write_loss_plot(self.run_dir)


# ---------------------------------------------------------------- `plot`


def _out_path(out: str | None) -> Path:
    """--out, checked before anything is drawn: a file (not a folder) in a folder that exists, a known format."""
    given = out or DEFAULT_OUT
    path = resolved(given, f"--out {given}")
    if path.suffix.lower() not in FORMATS:
        raise UserError(
            f"--out {given}: cannot tell the format; give a file name ending in {', '.join(FORMATS)} (e.g. --out loss.png)"
        )
    if path.is_dir():
        raise UserError(f"--out {given}: is a folder; give a file name, e.g. --out {Path(given) / DEFAULT_OUT}")
    if not path.parent.is_dir():
        raise UserError(f"--out {given}: the folder {path.parent} does not exist; create it or write elsewhere")
    path = path.with_suffix(path.suffix.lower())
    check_replaceable(path, "plot", f"--out {given}", "give --out another file name, or move that file away")
    return path


def _labels(run_dirs: list[str], runs: list[RunDir]) -> list[str]:
    """Each run's name; runs of the same name are told apart by the path as given."""
    names = [run.name for run in runs]
    return [name if names.count(name) == 1 else given for name, given in zip(names, run_dirs)]


def plot(run_dirs: list[str], out: str | None = None, metric: str = "loss", log=print) -> Path:
    """`plot`: `metric` of each run against step, on one figure written to `out` (default ./plot.png)."""
    path = _out_path(out)
    runs = [RunDir(given) for given in run_dirs]
    problems = []
    for given, run in zip(run_dirs, runs):
        if not run.root.is_dir():
            problems.append(f"{given}: no such folder; pass the output_dir of a `train` run")
        elif not run.holds_run():
            problems.append(f"{given}: not a run directory (it has no {MARKER}); pass the output_dir of a `train` run")
    if problems:
        raise UserError(problems)
    records = [run.read_metrics() for run in runs]
    for given, held in zip(run_dirs, records):
        present = metrics_in(held)
        if metric not in present:
            listed = ", ".join(present) if present else "none yet (metrics.jsonl is empty)"
            problems.append(f"--metric {metric}: {given} has no {metric!r} in metrics.jsonl; its metrics: {listed}")
    if problems:
        raise UserError(problems)
    save(overlay_figure(list(zip(_labels(run_dirs, runs), records)), metric), path)
    log(f"wrote {path} ({metric} of {len(runs)} run{'s' if len(runs) > 1 else ''})")
    return path
