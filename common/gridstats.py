"""Sufficient statistics on a fixed score grid: what a site sends instead of scores.

For each score (3D model, 2D model, radiologist, an ensemble) a site sends a
:class:`ClassHistogram`: per class, the patient count in each of ``bins``
uniform bins over [0, 1], and the per-bin sums of ``s`` and ``s**2``.  The
server adds the sites' histograms and computes pooled metrics that equal the
metrics of all patients pooled:

* exactly, for the confusion matrix (and every ratio from it) at a threshold on
  the grid, the net benefit at grid thresholds, the Brier score, the calibration
  bins (coarse bins that are unions of grid bins) and the mean absolute error;
* up to the grid for the AUC: pairs that share a bin count 1/2, so the result is
  exactly the Mann-Whitney AUC of the binned scores, and differs from the exact
  AUC by at most :func:`auc_bound`.

Every array has length ``bins`` (fixed by the configuration), never the number
of patients.  Privacy note: on a fine grid most occupied cells hold one patient,
so a histogram reveals a site's unlinked multiset of (label, score) and each
lone cell's sum reveals that score exactly; ``common.disclosure`` holds the
mitigations (each documented with what it costs).

The bin of a score is ``min(floor(s * bins), bins - 1)`` mathematically; it is
computed by comparing against the edges ``k / bins`` so that ``s >= t`` and
``bin(s) >= t * bins`` agree in floating point for every grid threshold ``t``
(``floor(0.29 * 10000)`` is 2899 in float64, the edge comparison gives 2900).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.metrics import Metrics, check_labels_scores
from common.replycheck import check_histogram_arrays

__all__ = [
    "ClassHistogram",
    "ScoreGrid",
    "auc",
    "auc_bound",
    "brier",
    "calibration_curve",
    "confusion_matrix",
    "net_benefit",
    "pooled_metrics",
    "roc_curve",
]

_COUNT_KEYS = ("neg", "pos")
_SUM_KEYS = ("neg_sum", "pos_sum", "neg_sq", "pos_sq")
# A threshold closer than this (in units of bins) to an edge is that edge:
# decimal thresholds such as 0.07 or 0.1 + 0.2 miss k / bins by ~1e-12 bins.
_EDGE_TOL = 1e-6


@dataclass(frozen=True)
class ScoreGrid:
    """``bins`` uniform bins over [0, 1]; bin ``b`` is ``[b/bins, (b+1)/bins)``, the last closed."""

    bins: int

    def __post_init__(self) -> None:
        if isinstance(self.bins, bool) or not isinstance(self.bins, int | np.integer) or self.bins < 1:
            raise ValueError(f"grid bins must be a positive integer, got {self.bins!r}")

    def edges(self) -> NDArray[np.float64]:
        """The ``bins + 1`` edges ``k / bins`` (each correctly rounded)."""
        return np.arange(self.bins + 1, dtype=np.float64) / self.bins

    def midpoints(self) -> NDArray[np.float64]:
        """Bin centres ``(k + 0.5) / bins``: the scores a quantised score stands for."""
        return (np.arange(self.bins, dtype=np.float64) + 0.5) / self.bins

    def index(self, scores: ArrayLike) -> NDArray[np.int64]:
        """Bin of each score in [0, 1] (a score of exactly 1 is in the last bin)."""
        s = np.asarray(scores, dtype=np.float64)
        bad = np.flatnonzero(~(np.isfinite(s) & (s >= 0.0) & (s <= 1.0)))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"score at position {i} is {s.flat[i]!r}; grid scores must lie in [0, 1]")
        idx = np.searchsorted(self.edges(), s, side="right") - 1
        return np.minimum(idx, self.bins - 1).astype(np.int64)

    def quantise(self, scores: ArrayLike) -> NDArray[np.float64]:
        """Replace each score by its bin midpoint (the grid's view of the score)."""
        return self.midpoints()[self.index(scores)]

    def threshold_index(self, threshold: float) -> int:
        """Edge index ``k`` with ``threshold == k / bins``; raise if off the grid.

        Only a threshold on an edge gives an exact confusion matrix from counts:
        ``s >= k / bins`` holds exactly for the patients in bins ``>= k``.  The
        threshold must lie in [0, 1) (a score of 1 shares the last bin).
        """
        t = float(threshold)
        if not (math.isfinite(t) and 0.0 <= t < 1.0):
            raise ValueError(f"threshold {threshold!r} must lie in [0, 1)")
        k = round(t * self.bins)
        if abs(t * self.bins - k) > _EDGE_TOL:
            raise ValueError(
                f"threshold {threshold!r} is not on the {self.bins}-bin score grid "
                f"(nearest edges {math.floor(t * self.bins) / self.bins} and "
                f"{math.ceil(t * self.bins) / self.bins}); choose a multiple of 1/{self.bins}"
            )
        return int(k)


def _frozen(a: ArrayLike, dtype: type, bins: int, name: str) -> NDArray[Any]:
    arr: NDArray[Any] = np.array(a, dtype=dtype, copy=True)
    if arr.shape != (bins,):
        raise ValueError(f"histogram array {name!r} must have shape ({bins},), got {arr.shape}")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class ClassHistogram:
    """One score's per-class counts and per-bin sums of ``s`` and ``s**2`` on a grid.

    ``neg``/``pos`` are patient counts per bin (benign/malignant); ``*_sum`` and
    ``*_sq`` are the per-bin sums of the scores and squared scores of those
    patients, which make the Brier score, the calibration means and the mean
    absolute error exact.  Sums are NaN when they were not sent
    (:meth:`to_arrays` with ``include_sums=False``); the metrics needing them
    are then NaN.  Arrays are read-only copies.
    """

    bins: int
    neg: NDArray[np.int64]
    pos: NDArray[np.int64]
    neg_sum: NDArray[np.float64]
    pos_sum: NDArray[np.float64]
    neg_sq: NDArray[np.float64]
    pos_sq: NDArray[np.float64]

    def __post_init__(self) -> None:
        ScoreGrid(self.bins)
        for key in _COUNT_KEYS:
            raw = np.asarray(getattr(self, key))
            if raw.size and (not np.all(np.isfinite(raw)) or np.any(raw < 0) or np.any(raw != np.round(raw))):
                raise ValueError(f"histogram counts {key!r} must be non-negative integers")
            object.__setattr__(self, key, _frozen(raw, np.int64, self.bins, key))
        for key in _SUM_KEYS:
            object.__setattr__(self, key, _frozen(getattr(self, key), np.float64, self.bins, key))

    @staticmethod
    def zeros(bins: int) -> ClassHistogram:
        """The empty histogram (a site with no patients, or the start of a sum)."""
        c = np.zeros(bins, dtype=np.int64)
        z = np.zeros(bins)
        return ClassHistogram(bins, c, c, z, z, z, z)

    @staticmethod
    def from_scores(y: ArrayLike, s: ArrayLike, grid: ScoreGrid) -> ClassHistogram:
        """Build a site's histogram from its labels and probabilities."""
        yy, ss = check_labels_scores(y, s)
        idx = grid.index(ss)
        is_pos = yy == 1
        is_neg = ~is_pos

        def per_bin(mask: NDArray[np.bool_], weights: NDArray[np.float64] | None = None) -> NDArray[Any]:
            w = None if weights is None else weights[mask]
            return np.bincount(idx[mask], weights=w, minlength=grid.bins)

        return ClassHistogram(
            bins=grid.bins,
            neg=per_bin(is_neg),
            pos=per_bin(is_pos),
            neg_sum=per_bin(is_neg, ss),
            pos_sum=per_bin(is_pos, ss),
            neg_sq=per_bin(is_neg, ss * ss),
            pos_sq=per_bin(is_pos, ss * ss),
        )

    def __add__(self, other: ClassHistogram) -> ClassHistogram:
        """Aggregate two sites (or partial sums); grids must match."""
        if not isinstance(other, ClassHistogram):
            return NotImplemented
        if other.bins != self.bins:
            raise ValueError(f"cannot add histograms on different grids ({self.bins} vs {other.bins} bins)")
        return ClassHistogram(
            self.bins, *(getattr(self, k) + getattr(other, k) for k in (*_COUNT_KEYS, *_SUM_KEYS))
        )

    def __radd__(self, other: object) -> ClassHistogram:
        """Let ``sum(histograms)`` start from 0."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    @staticmethod
    def aggregate(histograms: Iterable[ClassHistogram]) -> ClassHistogram:
        """Sum of the sites' histograms (typed, unlike ``sum``); at least one is needed for the grid."""
        items = list(histograms)
        if not items:
            raise ValueError("no histograms to aggregate (no site answered)")
        total = items[0]
        for h in items[1:]:
            total = total + h
        return total

    @property
    def n_neg(self) -> int:
        return int(self.neg.sum())

    @property
    def n_pos(self) -> int:
        return int(self.pos.sum())

    @property
    def n(self) -> int:
        return self.n_neg + self.n_pos

    def to_arrays(self, include_sums: bool = True) -> dict[str, NDArray[Any]]:
        """Flat arrays of length ``bins`` for a Flower record.

        ``include_sums=False`` sends counts only (a third of the size), enough
        for AUC, ROC, confusion matrix and net benefit; the ensemble weight
        search, which sends one histogram per candidate, needs no more.
        """
        keys = _COUNT_KEYS + (_SUM_KEYS if include_sums else ())
        return {k: np.array(getattr(self, k)) for k in keys}

    @staticmethod
    def from_arrays(
        arrays: Mapping[str, ArrayLike], *, bins: int | None = None, max_patients: int | None = None
    ) -> ClassHistogram:
        """Inverse of :meth:`to_arrays`; absent sums become NaN (metrics needing them are NaN).

        The arrays usually come from another party, so they are checked first
        (:func:`common.replycheck.check_histogram_arrays`: the grid's shape when
        ``bins`` is given, whole non-negative counts, at most ``max_patients``,
        finite sums possible for scores in [0, 1]); a bad one raises
        :class:`common.replycheck.ReplyRejected` (a ``ValueError``).
        """
        checked = check_histogram_arrays(arrays, bins=bins, max_patients=max_patients)
        n_bins = int(checked["neg"].size)
        absent = np.full(n_bins, np.nan)
        sums = [checked.get(k, absent) for k in _SUM_KEYS]
        return ClassHistogram(n_bins, checked["neg"], checked["pos"], *sums)


def _tail_counts(h: ClassHistogram) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Counts at or above each edge ``k`` (length ``bins + 1``, last entry 0)."""
    neg_ge = np.concatenate([np.cumsum(h.neg[::-1])[::-1], [0]])
    pos_ge = np.concatenate([np.cumsum(h.pos[::-1])[::-1], [0]])
    return neg_ge, pos_ge


def confusion_matrix(h: ClassHistogram, threshold: float = 0.5) -> tuple[tuple[int, int], tuple[int, int]]:
    """``[[TN, FP], [FN, TP]]`` at a grid threshold; exact (see ``ScoreGrid.threshold_index``)."""
    k = ScoreGrid(h.bins).threshold_index(threshold)
    fp = int(h.neg[k:].sum())
    tp = int(h.pos[k:].sum())
    return ((h.n_neg - fp, fp), (h.n_pos - tp, tp))


def auc(h: ClassHistogram) -> float:
    """Mann-Whitney AUC of the binned scores (pairs in one bin count 1/2); NaN if a class is empty."""
    n_pos, n_neg = h.n_pos, h.n_neg
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg = h.neg.astype(np.float64)
    neg_below = np.cumsum(neg) - neg
    return float(np.dot(h.pos.astype(np.float64), neg_below + 0.5 * neg) / (float(n_pos) * float(n_neg)))


def auc_bound(h: ClassHistogram) -> float:
    """Bound on ``|auc(h) - AUC of the unbinned scores|``.

    Binning is monotone, so a (negative, positive) pair in different bins is
    ordered the same way before and after; only a pair sharing a bin can
    change, from 0, 1/2 or 1 to 1/2.  Hence the error is at most half the
    fraction of pairs that share a bin, ``sum_b neg_b pos_b / (2 N P)``; this
    is attained when every shared pair was strictly ordered one way.
    """
    n_pos, n_neg = h.n_pos, h.n_neg
    if n_pos == 0 or n_neg == 0:
        return math.nan
    shared = float(np.dot(h.neg.astype(np.float64), h.pos.astype(np.float64)))
    return 0.5 * shared / (float(n_pos) * float(n_neg))


def brier(h: ClassHistogram) -> float:
    """Mean ``(s - y)**2`` from the per-bin sums: ``sum_neg s^2 + sum_pos (1 - 2s + s^2)``, over n."""
    n = h.n
    if n == 0:
        return math.nan
    total = float(h.neg_sq.sum()) + h.n_pos - 2.0 * float(h.pos_sum.sum()) + float(h.pos_sq.sum())
    return total / n


def pooled_metrics(h: ClassHistogram, threshold: float = 0.5) -> Metrics:
    """All reported metrics from a (summed) histogram, in O(bins)."""
    return Metrics.from_confusion(confusion_matrix(h, threshold), auc(h), brier(h), threshold)


def roc_curve(h: ClassHistogram) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """ROC points ``(fpr, tpr, thresholds)`` at the lower edge of each occupied bin, descending.

    The first point is ``(0, 0)`` at threshold ``inf``, as in scikit-learn's
    ``roc_curve(..., drop_intermediate=False)`` applied to scores quantised to
    their bins' lower edges, which this equals.  The trapezoidal area under it
    is :func:`auc`.  Rates of an empty class are NaN.
    """
    occupied = np.flatnonzero((h.neg + h.pos) > 0)[::-1]
    neg_ge, pos_ge = _tail_counts(h)
    fp = np.concatenate([[0], neg_ge[occupied]]).astype(np.float64)
    tp = np.concatenate([[0], pos_ge[occupied]]).astype(np.float64)
    fpr = fp / h.n_neg if h.n_neg else np.full(fp.shape, np.nan)
    tpr = tp / h.n_pos if h.n_pos else np.full(tp.shape, np.nan)
    thresholds = np.concatenate([[np.inf], ScoreGrid(h.bins).edges()[occupied]])
    return fpr, tpr, thresholds


def calibration_curve(
    h: ClassHistogram, n_bins: int = 10
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Reliability diagram on ``n_bins`` uniform bins: ``(mean_predicted, observed_fraction, counts)``.

    Grid bins are merged into the coarse bins, so ``bins`` must be a multiple of
    ``n_bins``.  All ``n_bins`` entries are returned (empty ones NaN with count
    0) so that sites and runs line up; scikit-learn's
    ``calibration_curve(strategy='uniform')`` returns the non-empty ones, and
    these equal them when no score sits exactly on a coarse boundary
    (scikit-learn puts a boundary score in the lower bin, the grid in the upper).
    """
    if n_bins < 1 or h.bins % n_bins:
        raise ValueError(f"calibration bins ({n_bins}) must divide the grid's {h.bins} bins")
    f = h.bins // n_bins
    counts = (h.neg + h.pos).reshape(n_bins, f).sum(axis=1)
    pos = h.pos.reshape(n_bins, f).sum(axis=1).astype(np.float64)
    sums = (h.neg_sum + h.pos_sum).reshape(n_bins, f).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.where(counts > 0, sums / counts, np.nan)
        observed = np.where(counts > 0, pos / counts, np.nan)
    return mean_predicted, observed, counts.astype(np.int64)


def net_benefit(h: ClassHistogram, thresholds: ArrayLike) -> dict[str, NDArray[np.float64]]:
    """Decision-curve net benefit at grid thresholds ``pt`` (risk ``>= pt`` is treated).

    ``NB = TP/n - FP/n * pt / (1 - pt)`` (the dcurves package's definition);
    ``treat_all`` treats everyone, ``treat_none`` is 0.  Exact for thresholds
    on the grid; others raise.  NaN when there are no patients.
    """
    pts = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    grid = ScoreGrid(h.bins)
    ks = np.array([grid.threshold_index(float(t)) for t in pts], dtype=np.int64)
    n = h.n
    neg_ge, pos_ge = _tail_counts(h)
    odds = pts / (1.0 - pts)
    if n == 0:
        nan = np.full(pts.shape, np.nan)
        return {"threshold": pts, "model": nan, "treat_all": nan.copy(), "treat_none": np.zeros(pts.shape)}
    model = pos_ge[ks] / n - neg_ge[ks] / n * odds
    treat_all = h.n_pos / n - h.n_neg / n * odds
    return {"threshold": pts, "model": model, "treat_all": treat_all, "treat_none": np.zeros(pts.shape)}
