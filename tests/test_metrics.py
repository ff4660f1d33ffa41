"""GLUE metrics against hand-computed values, edge cases, and scipy/scikit-learn when they are installed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dsformer.harness.metrics import METRICS, compute

# (metric, predictions, labels, expected), each expected value worked out by hand
CASES = [
    ("accuracy", [1, 0, 1, 1], [1, 0, 0, 1], 0.75),
    ("accuracy", [0, 0, 0], [1, 1, 1], 0.0),
    ("accuracy", [2, 1, 0], [2, 1, 0], 1.0),  # three classes
    # tp=2 fp=1 fn=0: 2*2 / (2*2 + 1 + 0)
    ("f1", [1, 0, 1, 1], [1, 0, 0, 1], 0.8),
    # tp=1 fp=1 fn=1: 2 / 4
    ("f1", [1, 1, 0, 0], [1, 0, 1, 0], 0.5),
    ("f1", [0, 0, 0, 0], [1, 0, 1, 0], 0.0),  # no positive prediction
    ("f1", [1, 1], [0, 0], 0.0),  # no positive label
    ("f1", [1.0, 0.0, 1.0], [1, 0, 1], 1.0),  # float predictions, int labels
    # tp=2 tn=1 fp=1 fn=0: (2*1 - 1*0) / sqrt(3*2*2*1)
    ("matthews", [1, 0, 1, 1], [1, 0, 0, 1], 2 / math.sqrt(12)),
    ("matthews", [1, 0, 1, 0], [1, 0, 1, 0], 1.0),
    ("matthews", [0, 1, 0, 1], [1, 0, 1, 0], -1.0),
    ("matthews", [1, 1, 1, 1], [1, 0, 1, 0], 0.0),  # constant predictions
    ("matthews", [0, 0, 0, 0], [1, 0, 1, 0], 0.0),
    ("matthews", [1, 0, 1, 0], [1, 1, 1, 1], 0.0),  # constant labels
    ("pearson", [1, 2, 3], [2, 4, 6], 1.0),
    ("pearson", [1, 2, 3], [3, 2, 1], -1.0),
    # centered (-1, 0, 1) and (-1/3, -1/3, 2/3): 1 / sqrt(2 * 2/3)
    ("pearson", [1, 2, 3], [0, 0, 1], 1 / math.sqrt(4 / 3)),
    ("pearson", [2, 2, 2], [1, 2, 3], 0.0),  # constant predictions
    ("spearman", [1, 2, 3, 4], [1, 4, 9, 16], 1.0),  # monotone, not linear
    ("spearman", [4, 3, 2, 1], [1, 4, 9, 16], -1.0),
    # ties share their average rank: ranks (0, 1.5, 1.5, 3) against (0, 1, 2, 3) -> 4.5 / sqrt(4.5 * 5)
    ("spearman", [1, 2, 2, 3], [1, 2, 3, 4], 4.5 / math.sqrt(22.5)),
    # ranks (3, 1, 1, 1) against (3, 1, 2, 0): centered products sum to 3, norms 3 and 5
    ("spearman", [0.5, 0.1, 0.1, 0.1], [3.0, 1.0, 2.0, 0.0], 3 / math.sqrt(15)),
    ("spearman", [7, 7, 7], [1, 2, 3], 0.0),  # constant predictions
]


@pytest.mark.parametrize(("name", "pred", "gold", "expected"), CASES)
def test_metric_values(name: str, pred: list, gold: list, expected: float) -> None:
    assert METRICS[name](np.asarray(pred), np.asarray(gold)) == pytest.approx(expected, abs=1e-12)
    assert compute([name], pred, gold) == {name: round(expected, 6)}


def test_compute_docstring_example_and_rounding() -> None:
    assert compute(("accuracy", "f1"), [1, 0, 1, 1], [1, 0, 0, 1]) == {"accuracy": 0.75, "f1": 0.8}
    value = compute(["matthews"], [1, 0, 1, 1], [1, 0, 0, 1])["matthews"]
    assert value == 0.57735  # 2/sqrt(12) = 0.5773502..., rounded to 6 places
    assert compute([], [1], [1]) == {}


@pytest.mark.parametrize(
    ("pred", "gold"),
    [([1, 0], [1, 0, 1]), ([1, 0, 1], [1]), ([], []), ([], [1]), ([[1, 0]], [1, 0])],
    ids=["short-pred", "short-gold", "empty", "empty-pred", "shape"],
)
def test_compute_rejects_mismatched_or_empty(pred: list, gold: list) -> None:
    with pytest.raises(ValueError, match="as many predictions as labels"):
        compute(["accuracy"], pred, gold)


def test_metrics_are_symmetric_where_they_should_be() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(size=50)
    for name in ("pearson", "spearman"):
        assert METRICS[name](a, b) == pytest.approx(METRICS[name](b, a), abs=1e-12)
        assert METRICS[name](a, a) == pytest.approx(1.0, abs=1e-12)
    pa, pb = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert METRICS["matthews"](pa, pb) == pytest.approx(METRICS["matthews"](pb, pa), abs=1e-12)


def _random_cases(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pred, gold = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    scores = rng.integers(0, 6, 200).astype(float)  # many ties
    return pred, gold, scores, scores + rng.normal(size=200)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_scikit_learn(seed: int) -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    pred, gold, _, _ = _random_cases(seed)
    assert METRICS["accuracy"](pred, gold) == pytest.approx(metrics.accuracy_score(gold, pred))
    assert METRICS["f1"](pred, gold) == pytest.approx(metrics.f1_score(gold, pred))
    assert METRICS["matthews"](pred, gold) == pytest.approx(metrics.matthews_corrcoef(gold, pred))
    assert METRICS["matthews"](np.ones(10), np.arange(10) % 2) == metrics.matthews_corrcoef(
        np.arange(10) % 2, np.ones(10)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_scipy(seed: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    _, _, scores, noisy = _random_cases(seed)
    assert METRICS["pearson"](noisy, scores) == pytest.approx(stats.pearsonr(noisy, scores)[0])
    assert METRICS["spearman"](noisy, scores) == pytest.approx(stats.spearmanr(noisy, scores)[0])
    rounded = np.round(noisy)  # ties on both sides
    assert METRICS["spearman"](rounded, scores) == pytest.approx(stats.spearmanr(rounded, scores)[0])
