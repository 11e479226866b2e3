"""Exact match as an `evaluate` module, shipped so that it loads with no hub: the share of predictions equal to their reference.

Surrounding whitespace is ignored and inner runs of whitespace count as one space; `ignore_case=True`
also ignores case.
"""

import datasets
import evaluate
import numpy as np


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Fraction of predictions that equal their reference (whitespace-normalized).",
            citation="",
            inputs_description="predictions, references: lists of strings; ignore_case: bool",
            features=datasets.Features(predictions=datasets.Value("string"), references=datasets.Value("string")),
        )

    def _compute(self, predictions, references, ignore_case=False):
        def norm(text):
            text = " ".join(text.split())
            return text.lower() if ignore_case else text

        return {
            "exact_match": float(np.mean([norm(p) == norm(r) for p, r in zip(predictions, references)]))
            if predictions
            else 0.0
        }
