"""ROUGE-1 and ROUGE-L as an `evaluate` module, shipped so that it loads with no hub (no rouge_score needed).

Texts are tokenized as rouge_score does without stemming: lower-cased, every run of characters other
than a-z and 0-9 is a separator. ROUGE-1 is the F-measure of unigram overlap (clipped counts), ROUGE-L
the F-measure of the longest common subsequence: P = LCS / len(prediction), R = LCS / len(reference),
F = 2PR / (P + R). Scores are averaged over the pairs.
"""

import re
from collections import Counter

import datasets
import evaluate
import numpy as np


def tokens(text):
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def lcs(a, b):
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def f_measure(hits, n_pred, n_ref):
    if not hits:
        return 0.0
    p, r = hits / n_pred, hits / n_ref
    return 2 * p * r / (p + r)


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE-1 and ROUGE-L F-measures (LCS-based), averaged over prediction/reference pairs.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions, references: lists of strings",
            features=datasets.Features(predictions=datasets.Value("string"), references=datasets.Value("string")),
        )

    def _compute(self, predictions, references):
        r1, rl = [], []
        for pred, ref in zip(predictions, references):
            p, r = tokens(pred), tokens(ref)
            r1.append(f_measure(sum((Counter(p) & Counter(r)).values()), len(p), len(r)))
            rl.append(f_measure(lcs(p, r), len(p), len(r)))
        return {"rouge1": float(np.mean(r1)) if r1 else 0.0, "rougeL": float(np.mean(rl)) if rl else 0.0}
