"""Metrics: the ones lora_sft ships load offline; any other name goes to `evaluate.load` (the hub)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SHIPPED = Path(__file__).parent / "metrics"


def load_metric(name: str):
    import evaluate

    local = SHIPPED / name / f"{name}.py"
    return evaluate.load(str(local) if local.is_file() else name)


def classification_metrics():
    """A Trainer `compute_metrics` for classification: accuracy and macro F1."""
    accuracy, f1 = load_metric("accuracy"), load_metric("f1")

    def compute(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        guesses = np.argmax(logits, axis=-1)
        return accuracy.compute(predictions=guesses, references=pred.label_ids) | f1.compute(predictions=guesses, references=pred.label_ids, average="macro")

    return compute
