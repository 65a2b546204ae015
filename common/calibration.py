"""Calibration of a probability from its grid histogram: recalibration slope/intercept, Hosmer-Lemeshow, Brier.

The per-bin counts of each class are the sufficient statistics of a logistic
regression of the label on a function of the bin's score, so the fit below is
exact on the score grid: it equals the per-patient fit in which each patient's
score is replaced by its bin's score, taken as the mean score of the bin's
patients (both classes; the histogram carries the sums) or, when sums were
not sent, the bin's midpoint.  On the default 10,000-bin grid a bin rarely
holds two different scores, so this is the per-patient fit in practice.

* **slope** (the calibration slope): ``b`` of ``logit P(y=1) = a + b logit(p)``;
  1 is ideal, < 1 means overconfident predictions;
* **intercept** (calibration-in-the-large): ``a`` of ``logit P(y=1) = a + logit(p)``
  (slope fixed at 1, the usual definition); 0 is ideal, > 0 means the risk is
  underestimated on average;
* **Hosmer-Lemeshow**: the patients sorted by score are cut into ``groups``
  groups of about equal size (a grid bin is never split, so tied scores stay
  together and there can be fewer groups); ``sum (O - E)^2 / (E (1 - E/n))``
  over groups, compared with chi-square on ``groups - 2`` degrees of freedom;
  expected counts are the exact sums of the predicted probabilities.

Scores are clipped to ``[1e-6, 1 - 1e-6]`` before the logit.  Undefined cases
(no patients, one class only, classes perfectly separated by the score, so the
maximum-likelihood slope is infinite) give NaN, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats
from scipy.special import expit

from common.gridstats import ClassHistogram, ScoreGrid, brier
from common.metrics import nan_to_none

__all__ = ["Calibration", "bin_scores", "calibration", "hosmer_lemeshow", "logistic_recalibration"]

EPS = 1e-6
_MAX_ITER = 100
_MAX_COEF = 30.0  # |coefficient| beyond this: the data are (quasi-)separated, the MLE does not exist


def bin_scores(h: ClassHistogram) -> NDArray[np.float64]:
    """Each bin's score: the mean score of its patients, or its midpoint where unknown or empty."""
    count = (h.neg + h.pos).astype(np.float64)
    total = h.neg_sum + h.pos_sum
    mid = ScoreGrid(h.bins).midpoints()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where((count > 0) & np.isfinite(total), total / np.maximum(count, 1.0), mid)
    return np.asarray(mean, dtype=np.float64)


def _logit(p: NDArray[np.float64]) -> NDArray[np.float64]:
    q = np.clip(p, EPS, 1.0 - EPS)
    return np.asarray(np.log(q / (1.0 - q)), dtype=np.float64)


def _grouped(h: ClassHistogram) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """Occupied bins only: (logit score, patients, positives)."""
    n = (h.neg + h.pos).astype(np.float64)
    keep = n > 0
    return _logit(bin_scores(h))[keep], n[keep], h.pos.astype(np.float64)[keep]


def logistic_recalibration(h: ClassHistogram) -> tuple[float, float]:
    """``(a, b)`` of ``logit P(y=1) = a + b logit(p)`` by Newton-Raphson (IRLS) on the bins; NaN if undefined."""
    x, n, k = _grouped(h)
    if n.sum() == 0 or k.sum() == 0 or k.sum() == n.sum() or np.unique(x).size < 2:
        return math.nan, math.nan
    design = np.column_stack([np.ones_like(x), x])
    beta = np.zeros(2)
    beta[0] = math.log(k.sum() / (n.sum() - k.sum()))
    for _ in range(_MAX_ITER):
        mu = expit(design @ beta)
        grad = design.T @ (k - n * mu)
        hess = design.T @ (design * (n * mu * (1.0 - mu))[:, None])
        try:
            step = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            return math.nan, math.nan
        beta = beta + step
        if not np.all(np.isfinite(beta)) or np.any(np.abs(beta) > _MAX_COEF):
            return math.nan, math.nan
        if np.max(np.abs(step)) < 1e-12:
            return float(beta[0]), float(beta[1])
    return math.nan, math.nan


def calibration_in_the_large(h: ClassHistogram) -> float:
    """``a`` of ``logit P(y=1) = a + logit(p)`` (slope fixed at 1); NaN if undefined."""
    x, n, k = _grouped(h)
    if n.sum() == 0 or k.sum() == 0 or k.sum() == n.sum():
        return math.nan
    a = 0.0
    for _ in range(_MAX_ITER):
        mu = expit(a + x)
        grad = float(np.sum(k - n * mu))
        hess = float(np.sum(n * mu * (1.0 - mu)))
        if hess <= 0:
            return math.nan
        step = grad / hess
        a += step
        if not math.isfinite(a) or abs(a) > _MAX_COEF:
            return math.nan
        if abs(step) < 1e-12:
            return a
    return math.nan


def risk_groups(h: ClassHistogram, groups: int) -> NDArray[np.int64]:
    """Group of every bin: ``floor(patients in lower bins * groups / n)`` (ties never split)."""
    if groups < 2:
        raise ValueError(f"Hosmer-Lemeshow needs at least 2 groups, got {groups}")
    count = (h.neg + h.pos).astype(np.int64)
    n = int(count.sum())
    before = np.cumsum(count) - count
    return (before * groups // max(n, 1)).astype(np.int64)


def hosmer_lemeshow(h: ClassHistogram, groups: int = 10) -> dict[str, float | int]:
    """Hosmer-Lemeshow statistic, degrees of freedom, p and the number of non-empty groups."""
    g = risk_groups(h, groups)
    count = (h.neg + h.pos).astype(np.float64)
    obs = np.bincount(g, weights=h.pos.astype(np.float64), minlength=groups)
    exp = np.bincount(g, weights=np.where(count > 0, h.neg_sum + h.pos_sum, 0.0), minlength=groups)
    size = np.bincount(g, weights=count, minlength=groups)
    used = size > 0
    n_groups = int(used.sum())
    df = n_groups - 2
    if h.n == 0 or df < 1 or not np.all(np.isfinite(exp[used])):
        return {"statistic": math.nan, "df": df, "p": math.nan, "groups": n_groups}
    e, o, m = exp[used], obs[used], size[used]
    var = e * (1.0 - e / m)
    if np.any(var <= 0):
        return {"statistic": math.nan, "df": df, "p": math.nan, "groups": n_groups}
    stat = float(np.sum((o - e) ** 2 / var))
    return {"statistic": stat, "df": df, "p": float(stats.chi2.sf(stat, df)), "groups": n_groups}


@dataclass(frozen=True)
class Calibration:
    """The calibration figures of one score on one set of patients."""

    slope: float
    intercept: float
    intercept_2p: float
    hl_statistic: float
    hl_df: int
    hl_p: float
    hl_groups: int
    brier: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "slope": nan_to_none(self.slope),
            "intercept": nan_to_none(self.intercept),
            "intercept_with_slope": nan_to_none(self.intercept_2p),
            "hosmer_lemeshow": {
                "statistic": nan_to_none(self.hl_statistic),
                "df": self.hl_df,
                "p": nan_to_none(self.hl_p),
                "groups": self.hl_groups,
            },
            "brier": nan_to_none(self.brier),
            "n": self.n,
        }


def calibration(h: ClassHistogram, groups: int = 10) -> Calibration:
    """Every calibration figure of a (summed) histogram; ``groups`` is ``evaluation.calibration_bins``."""
    a2, b = logistic_recalibration(h)
    hl = hosmer_lemeshow(h, groups)
    return Calibration(
        slope=b,
        intercept=calibration_in_the_large(h),
        intercept_2p=a2,
        hl_statistic=float(hl["statistic"]),
        hl_df=int(hl["df"]),
        hl_p=float(hl["p"]),
        hl_groups=int(hl["groups"]),
        brier=brier(h),
        n=h.n,
    )
