"""What the libraries print around lora_sft's own lines: their progress bars and warnings; and how lora_sft's lines
write a count (`amount`). A base module (it imports nothing of lora_sft), so every stage that loads or writes a model
can quiet them without importing the run stage."""

from __future__ import annotations

import contextlib
import logging
import warnings


def amount(n: float, unit: str) -> str:
    """`1 epoch`, `2 epochs`, `0.5 epochs`, `1,200 steps`: a count and its unit, singular for exactly one."""
    return f"{n:,g} {unit}" if n == 1 else f"{n:,g} {unit}s"


@contextlib.contextmanager
def bars_on_terminal_only():
    """transformers' progress bars ("Loading weights", "Writing model shards") inside the block only when stderr is
    a terminal: in a log file or a pipe they are noise."""
    import sys

    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def quiet_libraries() -> None:
    """`train --quiet`: the libraries' warnings, log records and progress bars off as well as ours; errors still
    print (the CLI writes them to stderr itself)."""
    from transformers.utils import logging as transformers_logging

    logging.disable(logging.WARNING)  # every library logger (transformers, datasets, peft, accelerate) at once
    transformers_logging.disable_progress_bar()
    warnings.simplefilter("ignore")
