"""Macro F1 as an `evaluate` module, shipped so that it loads with no hub.

Each class present in the references or predictions gets F1 = 2PR/(P+R) (0 where undefined);
`average="macro"` is their unweighted mean, `average=None` the list per class id.
"""

import datasets
import evaluate
import numpy as np


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="F1 per class, macro-averaged by default.",
            citation="",
            inputs_description="predictions, references: lists of class ids; average: 'macro' or None",
            features=datasets.Features(predictions=datasets.Value("int64"), references=datasets.Value("int64")),
        )

    def _compute(self, predictions, references, average="macro"):
        pred, ref = np.asarray(predictions), np.asarray(references)
        classes = np.union1d(pred, ref)
        scores = []
        for c in classes:
            tp = np.sum((pred == c) & (ref == c))
            denom = np.sum(pred == c) + np.sum(ref == c)
            scores.append(float(2 * tp / denom) if denom else 0.0)
        return {"f1": float(np.mean(scores)) if average == "macro" else scores}
