"""Guards around the training loop and the evaluations before and after it: Ctrl-C / SIGTERM, a
non-finite loss or gradient, CUDA out of memory.

Each ends the run with a `RunError` (one line, no traceback) that says what happened, at which step,
where the last good checkpoint is and what to do next. Nothing here changes what a healthy step does.
In training a signal is acted on at the end of the step (a checkpoint is saved first); in an evaluation,
which saves nothing, it stops the run at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from lora_sft.distributed import agreed_signal, every_rank, world
from lora_sft.errors import RunError
from lora_sft.run.checkpoint import checkpoints

if TYPE_CHECKING:
    from lora_sft.settings import RunSettings


def _command(settings: RunSettings, flag: str) -> str:
    source = settings.recipe._source
    overrides = "".join(f" {o}" for o in source.overrides.values()) if source else ""
    return f"python -m lora_sft train {source.file if source else 'RECIPE'}{overrides} {flag}"


def _last_good(folder: Path) -> str:
    found = checkpoints(folder)
    return str(found[-1]) if found else "none yet"


def _next(settings: RunSettings, folder: Path, then: str = "") -> str:
    """How to go on: resume from the last checkpoint, or start again when none was saved (--resume would be refused)."""
    if checkpoints(folder):
        return f"{then}continue with: {_command(settings, '--resume')}"
    return f"no checkpoint was saved yet, so start again with: {_command(settings, '--overwrite')}"


class _Stopped(BaseException):
    """Raised by the signal handler during an evaluation (a BaseException: no `except Exception` swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class Guard(TrainerCallback):
    """Stops (or skips a step) on a non-finite loss or gradient; saves and stops after a signal."""

    def __init__(self, settings: RunSettings, checkpoint_dir: Path, log=print):
        self.settings, self.folder, self.log = settings, checkpoint_dir, log
        self.signal: int | None = None  # set by the handler, acted on at the end of the step
        self.during: str | None = (
            None  # an evaluation running now ("the evaluation after training"): a signal stops it at once
        )
        self.bad: str | None = None  # what was non-finite in the current step
        self.skipped: list[int] = []  # steps skipped under on_nonfinite: skip

    # -- signals: the handler only records; the step finishes, then on_step_end saves and stops
    @contextmanager
    def signals(self, during: str | None = None):
        """Handle SIGINT / SIGTERM in the block: in training (`during` None) at the end of the step; in an
        evaluation (`during` names it) at once, with the RunError that says where the run stands."""
        if threading.current_thread() is not threading.main_thread():
            yield  # only the main thread may install handlers
            return
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.during = during
        try:
            yield
        except _Stopped as e:
            raise every_rank(
                RunError(
                    f"{signal.Signals(e.signum).name}: stopped during {during}, checkpoint {_last_good(self.folder)}; {_next(self.settings, self.folder)}",
                    code=128 + e.signum,
                )
            ) from None
        finally:
            self.during = None
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame):
        if self.during is not None:
            if world().main:  # under a launcher every process gets the signal; one says so
                print(f"{signal.Signals(signum).name}: stopping {self.during}", file=sys.stderr, flush=True)
            raise _Stopped(signum)  # an evaluation saves nothing: nothing to finish first
        if self.signal is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once
        self.signal = signum
        if not world().main:
            return
        print(
            f"{signal.Signals(signum).name}: finishing this step and saving a checkpoint (again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def on_step_end(self, args, state, control, **kwargs):
        if args.world_size > 1:  # a launcher forwards a signal to every rank, which may see it at different steps:
            agreed = agreed_signal(self.signal)  # every rank asks (a collective), then all stop after the same step
            self.signal = self.signal or agreed or None
        if self.signal is not None:
            control.should_save = True
            control.should_training_stop = True

    def interrupted(self, state) -> RunError | None:
        """After trainer.train(): the error to exit with if a signal cut the run short (not if it came after the last step)."""
        if self.signal is None or state.global_step >= state.max_steps:
            return None
        return every_rank(
            RunError(
                f"{signal.Signals(self.signal).name}: stopped after step {state.global_step}, checkpoint {_last_good(self.folder)}; {_next(self.settings, self.folder)}",
                code=128 + self.signal,  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
            )
        )

    # -- non-finite loss or gradient, checked before the optimizer can write it into the adapter
    def check_loss(self, loss: torch.Tensor) -> None:
        if self.bad is None and not torch.isfinite(loss).all():
            self.bad = f"the loss is {loss.item()}"

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        bad, self.bad = self.bad, None
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if bad is None and grads and not torch.isfinite(torch.stack([g.detach().float().norm() for g in grads]).sum()):
            bad = "a gradient is not finite"
        if bad is None:
            return
        step = state.global_step + 1
        if self.settings.train.on_nonfinite == "skip":
            for p in model.parameters():
                p.grad = None  # the optimizer leaves parameters without a gradient untouched
            self.skipped.append(step)
            self.log(
                f"warning: step {step}: {bad}; step skipped ({self.settings.where('train', 'on_nonfinite')} is skip)"
            )
            return
        # the gradients are averaged over the processes before this check: every process stops here the same way
        raise every_rank(
            RunError(
                f"step {step}: {bad}; stopped before the optimizer step, last good checkpoint: {_last_good(self.folder)}; "
                f"try a lower train.lr (now {self.settings.train.lr:g}), keep train.max_grad_norm above 0, check the data near this step, "
                f"or set train.on_nonfinite: skip; {_next(self.settings, self.folder, then='then ')}"
            )
        )


@contextmanager
def out_of_memory(settings: RunSettings, trainer, folder: Path, during: str | None = None):
    """Turn CUDA's out-of-memory error into the options that lower memory, with their values."""
    try:
        yield
    except torch.OutOfMemoryError as e:  # torch.cuda.OutOfMemoryError is the same class
        raise RunError(
            oom_message(settings, trainer.state.global_step, _last_good(folder), _next(settings, folder), during)
        ) from e


@contextmanager
def guarded(settings: RunSettings, trainer, during: str | None = None):
    """The guards around a stretch of the run: the training loop (`during` None), or an evaluation (`during`
    names it, for the messages): signals and CUDA out of memory. The trainer carries its `Guard`."""
    guard = trainer.guard
    with guard.signals(during), out_of_memory(settings, trainer, guard.folder, during):
        yield


def oom_message(
    settings: RunSettings, step: int, last_good: str, next_step: str | None = None, during: str | None = None
) -> str:
    t, d = settings.train, settings.data
    options = []
    if t.micro_batch_size > 1:
        half = t.micro_batch_size // 2
        options.append(
            f"train.micro_batch_size={half} train.grad_accum={t.grad_accum * t.micro_batch_size // half} (same effective batch)"
        )
    if not t.gradient_checkpointing and during is None:  # an evaluation keeps no activations for a backward pass
        options.append("train.gradient_checkpointing=true")
    options.append(f"data.max_length={max(8, d.max_length // 2)} (now {d.max_length})")
    if settings.quant.mode not in ("nf4", "fp4"):
        options.append("quant.mode=nf4")
    next_step = next_step or f"continue with: {_command(settings, '--resume')}"
    where = f"at step {step + 1}" if during is None else f"during {during}" + (f" (after step {step})" if step else "")
    return f"out of GPU memory {where}; try {'; '.join(options)}; last good checkpoint: {last_good}; {next_step}"
