"""The metric each GLUE task reports (Wang et al. 2019, Table 1): accuracy; F1 of the positive class (MRPC, QQP, with
accuracy); Matthews correlation (CoLA); Pearson and Spearman correlation (STS-B)."""

from __future__ import annotations

import numpy as np


def accuracy(pred, label) -> float:
    return float(np.mean(np.asarray(pred) == np.asarray(label)))


def f1(pred, label) -> float:
    """F1 of class 1 (0 when nothing is predicted or present)."""
    pred, label = np.asarray(pred) == 1, np.asarray(label) == 1
    tp = float(np.sum(pred & label))
    denom = float(np.sum(pred) + np.sum(label))
    return 2 * tp / denom if denom else 0.0


def matthews(pred, label) -> float:
    """`(tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))`, 0 when a margin is empty (scikit-learn's rule)."""
    p, y = np.asarray(pred) == 1, np.asarray(label) == 1
    tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
    fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(xc ** 2) * np.sum(yc ** 2))
    return float(np.sum(xc * yc) / denom) if denom else 0.0


def _ranks(x) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's rho needs."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))


METRICS = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def score(names, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """`{metric: value}` from model outputs (`[N, classes]` logits, or `[N, 1]` for regression) and labels."""
    pred = outputs[:, 0] if outputs.shape[1] == 1 else np.argmax(outputs, axis=1)
    return {n: METRICS[n](pred, labels) for n in names}
