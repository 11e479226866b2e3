"""What `train` prints while it runs, and the summary it ends with.

In a terminal one progress bar (step / total, loss, learning rate, trained tokens/s, peak memory, ETA); anywhere
else (CI, nohup, a log file) one plain line every `train.logging_steps`:

    step 30/100  loss 0.5755  lr 7.9e-04  612 trained tok/s  1.3 GB  eta 0:34

and each evaluation as a line of its own (`eval step 30  loss 0.1234  accuracy 0.9500`). `Progress` replaces
Trainer's tqdm bar and its printed log dicts (train.build_trainer removes those callbacks); metrics.jsonl is
train.RunLog's, unchanged. The main process alone prints under a launcher: the others get a silent `log`.
`summary_lines` is the end-of-run table from summary.json and the path of every file of the run directory.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

from lora_sft.console import amount
from lora_sft.run import checkpoint
from lora_sft.run.records import Summary
from lora_sft.run.rundir import RunDir


def peak_memory_mb() -> tuple[float, str]:
    """This process's peak memory in MiB, and what was measured: CUDA's allocated peak, else the peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"  # ru_maxrss is KiB on Linux


def gigabytes(mb: float) -> str:
    return f"{mb / 1024:.1f} GB"


def clock(seconds: float) -> str:
    """0:34, 12:05, 1:02:03."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress(TrainerCallback):
    """The training's progress as a bar (`terminal`) or as plain lines through `log`, from Trainer's public hooks.

    `counts`: the trainer's token counters (CountingTrainer.counts); `eval_metrics`: Trainer's eval dict to the
    metrics summary.json reports (train's rule: no `eval_` prefix, no timings)."""

    def __init__(
        self,
        log: Callable[[str], object],
        counts: Callable[[], dict[str, int]],
        eval_metrics: Callable[[dict], dict],
        terminal: bool = False,
    ):
        self.log, self.counts, self.eval_metrics, self.terminal = log, counts, eval_metrics, terminal
        self.bar = None
        self.started = time.perf_counter()
        self.first_step = 0  # where this train() call began: a resumed run's rate and ETA count its own steps
        self.first_tokens = 0
        self.last_eval = ""

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()
        self.first_step, self.first_tokens = state.global_step, self.counts()["tokens_trained"]
        if self.terminal:
            from tqdm.std import tqdm  # type: ignore[import-untyped]  # no stubs installed (types-tqdm)

            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, unit="step", dynamic_ncols=True, file=sys.stdout
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "loss" in logs:
            fields = self.fields(args, state, logs)
            if self.bar is not None:
                self.bar.set_postfix_str("  ".join(fields[1:-1]), refresh=True)  # the bar shows the step and ETA
            else:
                self.log("  ".join(fields))
        elif any(k.startswith("eval_") for k in logs):
            metrics = self.eval_metrics({k: v for k, v in logs.items() if k.startswith("eval_")})
            line = f"eval step {state.global_step}  " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            if line != self.last_eval:  # the last step's evaluation (eval_steps) measured again after training
                self.say(line)
            self.last_eval = line

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def fields(self, args, state, logs: dict) -> list[str]:
        """step, loss, lr, trained tokens/s, peak memory, ETA: what a line (or the bar) shows."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        done = state.global_step - self.first_step
        # each process counts its own batches: the main one's count times the processes (summary.json has the total)
        rate = (self.counts()["tokens_trained"] - self.first_tokens) * args.world_size / elapsed
        eta = (state.max_steps - state.global_step) * elapsed / done if done else 0.0
        lr = logs.get("learning_rate")
        return [
            f"step {state.global_step}/{state.max_steps}",
            f"loss {float(logs['loss']):.4f}",
            f"lr {float(lr):.1e}" if lr is not None else "lr -",
            f"{rate:,.0f} trained tok/s",
            gigabytes(peak_memory_mb()[0]),
            f"eta {clock(eta)}",
        ]

    def say(self, line: str) -> None:
        """A line of its own: above the bar while one is drawn."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            self.log(line)


# ---------------------------------------------------------------- the end of a run


def summary_lines(summary: Summary, run_dir: RunDir) -> list[str]:
    """The finished run as a small table (summary.json's numbers), then the path of every file it wrote."""
    rows = [
        ("time", f"{clock(summary.wall_time_s)} (training {clock(summary.train_time_s)})"),
        (
            "steps",
            f"{summary.steps}"
            + (f" ({amount(round(summary.epochs, 2), 'epoch')})" if summary.epochs is not None else ""),
        ),
        ("tokens", f"{summary.tokens_seen:,} seen, {summary.tokens_trained:,} trained"),
        ("seen tokens/s", f"{summary.tokens_per_second:,.0f}"),  # the progress lines' rate counts trained tokens
        ("peak memory", f"{gigabytes(summary.peak_memory_mb)} ({summary.peak_memory_kind.replace('_', ' ')})"),
    ]
    if summary.train_loss is not None:
        rows.append(("train loss", f"{summary.train_loss:.4f} (last logged; mean {summary.train_loss_mean:.4f})"))
    before, after = summary.eval_before or {}, summary.eval or {}
    for name in dict.fromkeys([*before, *after]):
        if isinstance(before.get(name), float | int) or isinstance(after.get(name), float | int):
            rows.append((f"eval {name}", f"{_metric(before.get(name))} → {_metric(after.get(name))}"))
    if (evaluation := summary.evaluation) is not None:  # the eval section: what the Trainer's eval does not measure
        for name, value in evaluation.fine_tuned.items():
            if name not in after and isinstance(value, float | int):
                was = (evaluation.base or {}).get(name)
                rows.append((f"held-out {name}", f"{_metric(was) + ' → ' if was is not None else ''}{_metric(value)}"))
    if summary.skipped_steps:
        rows.append(("skipped steps", ", ".join(map(str, summary.skipped_steps))))
    if stop := summary.early_stopping:
        rows.append(("early stopping", f"best {stop.metric} {stop.best_metric} at step {stop.best_step}"))
    files = _artifacts(run_dir)
    width = max(len(label) for label, _ in rows + files)
    return [
        "summary",
        *(f"  {label:<{width}}  {value}" for label, value in rows),
        "files",
        *(f"  {label:<{width}}  {path}" for label, path in files),
    ]


def _metric(value) -> str:
    return f"{value:.4f}" if isinstance(value, float | int) else "-"


LABELS = {"card": "model card", "eval_report": "eval report"}


def _artifacts(run_dir: RunDir) -> list[tuple[str, str]]:
    """Every file and folder of the run directory that exists, as RunDir names it (a path RunDir gains is listed
    too); checkpoints one by one."""
    out: list[tuple[str, str]] = []
    for name, path in vars(run_dir).items():
        if not isinstance(path, Path) or path in (run_dir.root, run_dir.marker) or not path.exists():
            continue
        label = LABELS.get(name, name.replace("_", " "))
        if path == run_dir.checkpoints:
            out += [(label, f"{p}/") for p in checkpoint.checkpoints(path)]
        else:
            out.append((label, f"{path}/" if path.is_dir() else str(path)))
    return out
