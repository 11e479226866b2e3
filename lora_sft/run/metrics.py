"""Metrics by `evaluate` name: the ones lora_sft ships (lora_sft/metrics/) load offline, any other name goes to
`evaluate.load` (the hub); the classification metrics the Trainer computes at each evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHIPPED = Path(__file__).parents[1] / "metrics"


def load_metric(name: str, where: str = "eval.metrics"):
    """A metric by `evaluate` name: the copy lora_sft ships, else from the hub (refused while it is off)."""
    import evaluate

    from lora_sft.errors import UserError

    if problem := metric_problem(name, where):
        raise UserError(problem)
    local = SHIPPED / name / f"{name}.py"
    return evaluate.load(str(local) if local.is_file() else name)


def metric_problem(name: str, where: str) -> str | None:
    """Why `name` cannot be loaded here, known without loading it: not shipped, and the hub is off."""
    import difflib
    import os

    from lora_sft.compat import offline_variable

    shipped = sorted(p.name for p in SHIPPED.iterdir() if (p / f"{p.name}.py").is_file())
    if name in shipped:
        return None
    variable = offline_variable() or (
        "HF_EVALUATE_OFFLINE"
        if os.environ.get("HF_EVALUATE_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        else None
    )
    if variable is None:
        return None  # evaluate fetches it from the hub when it is used
    close = difflib.get_close_matches(name, shipped, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{where}: metric {name!r} does not ship with lora_sft and {variable} is set, so it cannot be fetched from the hub ({hint}shipped: {', '.join(shipped)})"


def classification_metrics():
    """A Trainer `compute_metrics` for classification: accuracy and macro F1."""
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        guesses = np.argmax(logits, axis=-1)
        return accuracy.compute(predictions=guesses, references=pred.label_ids) | f1.compute(
            predictions=guesses, references=pred.label_ids, average="macro"
        )

    return compute
