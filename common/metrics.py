"""Binary classification metrics on per-patient scores (pure numpy, no grid).

This is the reference definition of every number the project reports: the
federated path (``common.gridstats``) builds the same :class:`Metrics` from
summed histograms through :meth:`Metrics.from_confusion`, so both paths share
one definition of each ratio.

Conventions (the paper's):

* label 1 is malignant (positive), 0 benign;
* a score ``>= threshold`` is predicted positive;
* the confusion matrix is ``[[TN, FP], [FN, TP]]`` (rows: actual benign,
  actual malignant; columns: predicted benign, predicted malignant);
* AUC is the Mann-Whitney statistic, a tied (positive, negative) pair counts
  1/2 (equal to the trapezoidal ROC area, i.e. ``roc_auc_score``);
* an undefined ratio (0/0, e.g. precision when nothing is predicted positive,
  AUC when one class is absent) is NaN, never a crash and never a silent 0;
  :meth:`Metrics.to_dict` writes NaN as ``None`` so that JSON stays valid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

ConfusionMatrix = tuple[tuple[int, int], tuple[int, int]]

__all__ = [
    "ConfusionMatrix",
    "Metrics",
    "binary_metrics",
    "check_labels_scores",
    "confusion_at",
    "mann_whitney_auc",
    "metrics_from_confusion",
    "nan_to_none",
    "ratio",
]


def ratio(num: float, den: float) -> float:
    """``num / den``, or NaN when ``den == 0`` (an undefined rate is not 0)."""
    return float(num) / float(den) if den else math.nan


def nan_to_none(x: float | None) -> float | None:
    """JSON has no NaN: undefined values travel as ``null``."""
    return None if x is None or math.isnan(x) else float(x)


def _as_confusion(cm: ArrayLike) -> ConfusionMatrix:
    """Validate a 2x2 matrix of non-negative integer counts and freeze it."""
    arr = np.asarray(cm)
    if arr.shape != (2, 2):
        raise ValueError(f"confusion matrix must be 2x2 [[TN, FP], [FN, TP]], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
        raise ValueError(f"confusion matrix must hold non-negative integer counts, got {arr.tolist()}")
    a = arr.astype(np.int64)
    return ((int(a[0, 0]), int(a[0, 1])), (int(a[1, 0]), int(a[1, 1])))


def metrics_from_confusion(cm: ArrayLike) -> dict[str, float]:
    """Threshold metrics from ``[[TN, FP], [FN, TP]]``; 0/0 gives NaN.

    Returns precision (= PPV), recall (= sensitivity), f1, accuracy, specificity and NPV.
    F1 is computed as ``2TP / (2TP + FP + FN)``, which equals the harmonic
    mean of precision and recall whenever both are defined and stays defined
    when only one is.
    """
    (tn, fp), (fn, tp) = _as_confusion(cm)
    return {
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": ratio(tp + tn, tn + fp + fn + tp),
        "specificity": ratio(tn, tn + fp),
        "npv": ratio(tn, tn + fn),
    }


@dataclass(frozen=True)
class Metrics:
    """All reported metrics of one score on one set of patients at one threshold."""

    auc: float
    confusion_matrix: ConfusionMatrix
    precision: float
    recall: float
    sensitivity: float
    specificity: float
    f1: float
    accuracy: float
    brier: float
    n: int
    n_pos: int
    threshold: float
    ppv: float = float("nan")
    npv: float = float("nan")

    @classmethod
    def from_confusion(cls, cm: ArrayLike, auc: float, brier: float, threshold: float) -> Metrics:
        """Assemble from the sufficient parts; the single place ratios are defined."""
        frozen = _as_confusion(cm)
        ratios = metrics_from_confusion(frozen)
        (tn, fp), (fn, tp) = frozen
        return cls(
            auc=float(auc),
            confusion_matrix=frozen,
            precision=ratios["precision"],
            recall=ratios["recall"],
            sensitivity=ratios["recall"],
            specificity=ratios["specificity"],
            f1=ratios["f1"],
            accuracy=ratios["accuracy"],
            brier=float(brier),
            n=tn + fp + fn + tp,
            n_pos=fn + tp,
            threshold=float(threshold),
            ppv=ratios["precision"],
            npv=ratios["npv"],
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view; undefined (NaN) values become ``None``."""
        return {
            "auc": nan_to_none(self.auc),
            "f1": nan_to_none(self.f1),
            "precision": nan_to_none(self.precision),
            "ppv": nan_to_none(self.ppv),
            "npv": nan_to_none(self.npv),
            "recall": nan_to_none(self.recall),
            "sensitivity": nan_to_none(self.sensitivity),
            "specificity": nan_to_none(self.specificity),
            "accuracy": nan_to_none(self.accuracy),
            "brier": nan_to_none(self.brier),
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
            "n": self.n,
            "n_pos": self.n_pos,
            "threshold": self.threshold,
        }


def check_labels_scores(
    y_true: ArrayLike, y_score: ArrayLike
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Validate labels in {0, 1} and probabilities in [0, 1] of equal length.

    The error names the position of the first offending patient so that the
    caller (who knows the patient ids) can point at the case.
    """
    y = np.asarray(y_true)
    s = np.asarray(y_score, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    bad_y = np.flatnonzero((y != 0) & (y != 1))
    if bad_y.size:
        i = int(bad_y[0])
        raise ValueError(f"label at position {i} is {y[i]!r}; labels must be 0 (benign) or 1 (malignant)")
    bad_s = np.flatnonzero(~(np.isfinite(s) & (s >= 0.0) & (s <= 1.0)))
    if bad_s.size:
        i = int(bad_s[0])
        raise ValueError(f"score at position {i} is {s[i]!r}; scores must be probabilities in [0, 1]")
    return y.astype(np.int64), s


def mann_whitney_auc(y: NDArray[np.int64], s: NDArray[np.float64]) -> float:
    """P(score_pos > score_neg) + 1/2 P(tie); NaN when a class is absent.

    Grouping by distinct score value makes this the same sum the histogram
    path uses (``gridstats.auc``), with the distinct values as the "bins".
    """
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=y).astype(np.float64)
    neg = np.bincount(inverse, weights=1 - y).astype(np.float64)
    neg_below = np.cumsum(neg) - neg
    return float(np.dot(pos, neg_below + 0.5 * neg) / (n_pos * n_neg))


def confusion_at(y: NDArray[np.int64], s: NDArray[np.float64], threshold: float) -> ConfusionMatrix:
    """``[[TN, FP], [FN, TP]]`` with ``score >= threshold`` predicted positive."""
    pred = s >= threshold
    pos = y == 1
    tp = int(np.count_nonzero(pred & pos))
    fp = int(np.count_nonzero(pred & ~pos))
    fn = int(np.count_nonzero(~pred & pos))
    tn = int(np.count_nonzero(~pred & ~pos))
    return ((tn, fp), (fn, tp))


def binary_metrics(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> Metrics:
    """Every reported metric of probabilities ``y_score`` against labels ``y_true``.

    Brier is the mean squared difference between the probability and the label;
    with no patients every rate and the Brier score are NaN.
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold!r}")
    y, s = check_labels_scores(y_true, y_score)
    brier = float(np.mean((s - y) ** 2)) if y.size else math.nan
    return Metrics.from_confusion(confusion_at(y, s, threshold), mann_whitney_auc(y, s), brier, threshold)
