"""GLUE's official metrics, computed with numpy (no hub download, no extra dependency), and the official
SQuAD v1.1 metric.

Example:
    >>> from dsformer.harness.metrics import compute, squad_scores
    >>> compute(("accuracy", "f1"), [1, 0, 1, 1], [1, 0, 0, 1])
    {'accuracy': 0.75, 'f1': 0.8}
    >>> squad_scores(["the Eiffel Tower", "in Paris"], [["Eiffel Tower"], ["Lyon", "Paris, France"]])
    {'exact_match': 0.5, 'f1': 0.75}
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np

from dsformer.errors import DsformerError


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean())


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    fp = float(((pred == 1) & (gold != 1)).sum())
    fn = float(((pred != 1) & (gold == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation (binary), 0 when a margin is empty (as scikit-learn returns)."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    tn = float(((pred == 0) & (gold == 0)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else float((tp * tn - fp * fn) / denom)


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    p, g = pred - pred.mean(), gold - gold.mean()
    denom = np.sqrt((p * p).sum() * (g * g).sum())
    return 0.0 if denom == 0 else float((p * g).sum() / denom)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties sharing their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    return pearson(_ranks(pred), _ranks(gold))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute(names: Sequence[str], predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Each named metric of predictions against gold labels."""
    pred, gold = np.asarray(predictions), np.asarray(labels)
    if pred.shape != gold.shape or pred.size == 0:
        raise ValueError(f"need as many predictions as labels, and at least one (got {pred.size} and {gold.size})")
    if not (np.isfinite(pred).all() and np.isfinite(gold).all()):  # a metric of NaN is no result (nor valid JSON)
        raise DsformerError("the predictions or the labels hold values that are not finite numbers")
    return {name: round(METRICS[name](pred, gold), 6) for name in names}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's normalization: lower case, punctuation dropped, then the articles a/an/the, then runs of white
    space made one space (the order of the official evaluation script)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalized texts; 0 when they share no token (an empty text included)."""
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(gold).split()
    same = sum((Counter(predicted) & Counter(wanted)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(wanted)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 of each predicted answer against the best of its gold answers, averaged over
    questions (as fractions; the official script prints them ×100)."""
    if len(predictions) != len(golds) or not predictions or any(not g for g in golds):
        raise ValueError("need one prediction per question, at least one question, and gold answers for each")
    pairs = list(zip(predictions, golds, strict=True))
    exact = sum(max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in pairs)
    f1_total = sum(max(answer_f1(p, g) for g in gs) for p, gs in pairs)
    return {"exact_match": round(exact / len(golds), 6), "f1": round(f1_total / len(golds), 6)}
