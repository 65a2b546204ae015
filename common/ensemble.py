"""Weighted-average ensembles of probabilities and their federated weight search.

The paper's ensembles average the members' probabilities with weights given
only in its (unavailable) supplement, so the weights are searched here: every
weight vector on a simplex grid is a candidate, each site sends one
:class:`~common.gridstats.ClassHistogram` per candidate
(:func:`candidate_histograms`), and the server keeps the candidate with the
largest pooled AUC (:func:`best_weights`).  Also here: reader-study maths from
aggregate statistics (:func:`mean_absolute_error_from_hist`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.gridstats import ClassHistogram, ScoreGrid, auc

__all__ = [
    "ENSEMBLES",
    "best_weights",
    "candidate_histograms",
    "combine",
    "mean_absolute_error_from_hist",
    "select_weights",
    "shrink_to_best_member",
    "simplex_grid",
]

# The paper's three ensembles: name -> member scores, in weight order.
ENSEMBLES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "ensemble_2d3d": ("densenet2d", "densenet3d"),
        "ensemble_3d_radiologist": ("densenet3d", "radiologist"),
        "ensemble_2d3d_radiologist": ("densenet2d", "densenet3d", "radiologist"),
    }
)

# AUCs closer than this are a tie (candidates' AUCs are ratios of integer
# counts summed in different orders, so equal rationals differ by ~1e-16).
_AUC_TIE = 1e-12


def simplex_grid(k: int, step: float) -> NDArray[np.float64]:
    """All weight vectors of ``k`` non-negative multiples of ``step`` summing to 1.

    There are ``C(1/step + k - 1, k - 1)`` of them, vertices included (231 for
    k = 3, step 0.05).  Rows are sorted in descending lexicographic order, so
    row 0 is ``(1, 0, ..., 0)``; :func:`select_weights` breaks exact ties by
    this order last.
    """
    if k < 1:
        raise ValueError(f"an ensemble needs k >= 1 members, got {k}")
    if not (math.isfinite(step) and 0.0 < step <= 1.0):
        raise ValueError(f"weight step must lie in (0, 1], got {step!r}")
    m = round(1.0 / step)
    if abs(1.0 / step - m) > 1e-9:
        raise ValueError(f"weight step {step!r} must divide 1 (e.g. 0.05, 0.1, 0.25)")
    # Stars and bars: k - 1 bars among m + k - 1 slots.
    combos = list(itertools.combinations(range(m + k - 1), k - 1))
    bars = np.array(combos, dtype=np.int64).reshape(len(combos), k - 1)
    edges = np.column_stack([np.full(len(bars), -1), bars, np.full(len(bars), m + k - 1)])
    parts = np.diff(edges, axis=1) - 1
    order = np.lexsort(parts.T[::-1])[::-1]
    return parts[order].astype(np.float64) / m


def _check_weights(weights: ArrayLike, k: int) -> NDArray[np.float64]:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (k,):
        raise ValueError(f"weights must have shape ({k},) for {k} members, got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or abs(w.sum() - 1.0) > 1e-9:
        raise ValueError(f"weights must be non-negative and sum to 1, got {w.tolist()}")
    return w


def combine(probs: ArrayLike, weights: ArrayLike) -> NDArray[np.float64]:
    """Weighted average of the members' probabilities: ``(n, k) @ (k,) -> (n,)``, in [0, 1]."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(
            f"member probabilities must be an (n patients, k members) array, got shape {p.shape}"
        )
    bad = np.argwhere(~(np.isfinite(p) & (p >= 0.0) & (p <= 1.0)))
    if bad.size:
        i, j = (int(v) for v in bad[0])
        raise ValueError(f"probability of member {j} at position {i} is {p[i, j]!r}; must lie in [0, 1]")
    w = _check_weights(weights, p.shape[1])
    # Rounding can push an average of equal probabilities a hair outside [0, 1].
    return np.clip(p @ w, 0.0, 1.0)


def candidate_histograms(
    y: ArrayLike, probs: ArrayLike, weights: ArrayLike, grid: ScoreGrid
) -> list[ClassHistogram]:
    """Run at a site: one histogram of the ensemble score per candidate weight row."""
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    return [ClassHistogram.from_scores(y, combine(probs, row), grid) for row in w]


def select_weights(aucs: ArrayLike, weights: ArrayLike) -> int:
    """Index of the best candidate: largest AUC, then most even weights, then lowest index.

    "Most even" is the smallest sum of squared weights (closest to uniform):
    among equally good ensembles the one that relies least on a single member
    is the safer choice on small cohorts.  AUCs within 1e-12 tie.  When no AUC
    is defined (a class absent everywhere) the most even candidate is returned.
    """
    a = np.asarray(aucs, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if a.ndim != 1 or a.size == 0 or w.shape[0] != a.size:
        raise ValueError(f"need one AUC per weight row, got {a.shape} AUCs and {w.shape[0]} rows")
    finite = np.isfinite(a)
    pool = np.flatnonzero(a >= np.max(a[finite]) - _AUC_TIE) if finite.any() else np.arange(a.size)
    spread = np.sum(w[pool] ** 2, axis=1)
    pool = pool[spread <= spread.min() + 1e-12]
    return int(pool.min())


def shrink_to_best_member(aucs: ArrayLike, weights: ArrayLike, tolerance: float) -> int:
    """Regularised choice: the candidate nearest the best single member whose AUC is within ``tolerance``.

    On a small validation set the AUC-maximising weights fit noise (measured: a
    three-member ensemble lost to a two-member one on test).  Here a blend is
    preferred over the best member alone only when it is better on validation
    by more than ``tolerance``; among the candidates within ``tolerance`` of the
    maximum, the one with the most weight on the best member wins (then
    :func:`select_weights`' order).  So the chosen ensemble never scores below
    its best member on validation: either the member's vertex (weight 1 on it)
    is within ``tolerance`` of the maximum, and then it is the candidate with
    the most weight on that member, or every candidate within tolerance beats
    it.  ``tolerance=0`` is :func:`select_weights`.
    """
    a = np.asarray(aucs, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if tolerance <= 0:
        return select_weights(a, w)
    if a.ndim != 1 or a.size == 0 or w.shape[0] != a.size:
        raise ValueError(f"need one AUC per weight row, got {a.shape} AUCs and {w.shape[0]} rows")
    finite = np.isfinite(a)
    if not finite.any():
        return select_weights(a, w)
    vertices = [i for i in range(w.shape[0]) if finite[i] and np.isclose(w[i].max(), 1.0)]
    if not vertices:
        return select_weights(a, w)
    best_vertex = max(vertices, key=lambda i: (a[i], -i))
    member = int(np.argmax(w[best_vertex]))
    near = np.flatnonzero(finite & (a >= np.max(a[finite]) - tolerance))
    top = near[w[near, member] >= w[near, member].max() - 1e-12]
    masked = np.where(np.isin(np.arange(a.size), top), a, -np.inf)
    return select_weights(masked, w)


def best_weights(
    candidate_histograms: Sequence[ClassHistogram], weights: ArrayLike, tolerance: float = 0.0
) -> tuple[int, float]:
    """Server side: ``(index, pooled AUC)`` of the best candidate from summed histograms.

    ``candidate_histograms[i]`` is the (already summed over sites) histogram of
    the ensemble with weights ``weights[i]``; ties as in :func:`select_weights`,
    and with ``tolerance > 0`` shrunk toward the best member
    (:func:`shrink_to_best_member`).  Each AUC is O(bins), so ~200 candidates
    on 10000 bins take milliseconds.
    """
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if len(candidate_histograms) != w.shape[0]:
        raise ValueError(f"{len(candidate_histograms)} candidate histograms but {w.shape[0]} weight rows")
    aucs = np.array([auc(h) for h in candidate_histograms])
    i = shrink_to_best_member(aucs, w, tolerance)
    return i, float(aucs[i])


def mean_absolute_error_from_hist(h: ClassHistogram) -> float:
    """Mean ``|p - y|`` (the paper's Figure 5 quantity), exact from the per-bin sums.

    For a benign patient ``|p - 0| = p``, for a malignant one ``|p - 1| = 1 - p``,
    so the total is ``sum_neg p + n_pos - sum_pos p``.  NaN with no patients.
    """
    n = h.n
    if n == 0:
        return math.nan
    return (float(h.neg_sum.sum()) + h.n_pos - float(h.pos_sum.sum())) / n
