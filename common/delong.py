"""DeLong's test for two correlated AUCs and DeLong confidence intervals.

DeLong, DeLong & Clarke-Pearson (Biometrics 1988).  With ``m`` positives and
``n`` negatives, the placement value (structural component) of a positive is
``V10 = (#negatives below it + 1/2 #tied) / n`` and of a negative
``V01 = (#positives above it + 1/2 #tied) / m``; the AUC is the mean of either.
For scores ``k, l`` with ``S10[k, l]`` the sample covariance (ddof 1) of the
positives' placements and ``S01`` that of the negatives',
``Cov(AUC_k, AUC_l) = S10[k, l] / m + S01[k, l] / n`` and
``z = (AUC_1 - AUC_2) / sqrt(Var_1 + Var_2 - 2 Cov)`` with a two-sided normal p.
The CI is ``AUC +- z_{1 - alpha/2} sqrt(Var)``, clipped to [0, 1].

Two ways to compute it:

* pooled, on per-patient data (:func:`delong_pooled`, :func:`delong_ci`): the
  reference, used by the pooled baseline;
* federated, in two steps with no per-patient value leaving a site:
  1. each site sends a :class:`~common.gridstats.ClassHistogram` of each score;
     the server sums them and sends the global histograms back;
  2. each site computes its own patients' placements against the global
     histograms and returns only per-class sums (:func:`delong_step2_site`,
     :class:`PlacementSums`); the server adds them and finishes
     (:func:`delong_from_sums`).
  Ties are at grid level, so the federated result equals
  :func:`delong_pooled` on grid-quantised scores (``ScoreGrid.quantise``).

The variances come from sums of squares in the federated path: placements lie
in [0, 1] and the variances of interest are >= 1e-6, so the cancellation costs
nothing visible (the tests hold it to 1e-10 against the pooled path).

Undefined cases do not crash: a missing class gives NaN AUCs, fewer than two
patients in a class gives NaN variances; identical scores (zero variance of the
difference and equal AUCs) give z = 0 and p = 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from statistics import NormalDist
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.gridstats import ClassHistogram, ScoreGrid, auc
from common.metrics import check_labels_scores, nan_to_none

__all__ = [
    "DeLongCI",
    "DeLongResult",
    "PlacementSums",
    "delong_ci",
    "delong_from_sums",
    "delong_pooled",
    "delong_step2_site",
    "placements",
]

# Relative size below which the variance of the AUC difference counts as zero
# (two identical scores give exactly 0 pooled but ~1e-17 from sums).
_ZERO_VAR_RTOL = 1e-12
_NORMAL = NormalDist()  # the standard normal (stdlib: SciPy's import would cost the report a second)


@dataclass(frozen=True)
class DeLongCI:
    """One AUC with its DeLong variance and ``1 - alpha`` confidence interval."""

    auc: float
    var: float
    ci: tuple[float, float]
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "auc": nan_to_none(self.auc),
            "var": nan_to_none(self.var),
            "ci": [nan_to_none(self.ci[0]), nan_to_none(self.ci[1])],
            "alpha": self.alpha,
        }


@dataclass(frozen=True)
class DeLongResult:
    """Two correlated AUCs on the same patients, their (co)variances and the test of equality."""

    auc1: float
    auc2: float
    var1: float
    var2: float
    cov: float
    z: float
    p: float
    ci1: tuple[float, float]
    ci2: tuple[float, float]
    n_pos: int
    n_neg: int
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                out[f.name] = [nan_to_none(x) for x in v]
            elif isinstance(v, float):
                out[f.name] = nan_to_none(v)
            else:
                out[f.name] = v
        return out


def _ci(a: float, var: float, alpha: float) -> tuple[float, float]:
    if not (math.isfinite(a) and math.isfinite(var)) or var < 0:
        return (math.nan, math.nan)
    half = _NORMAL.inv_cdf(1.0 - alpha / 2.0) * math.sqrt(var)
    return (max(0.0, a - half), min(1.0, a + half))


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")


def _result(
    auc1: float,
    auc2: float,
    s10: NDArray[np.float64],
    s01: NDArray[np.float64],
    n_pos: int,
    n_neg: int,
    alpha: float,
) -> DeLongResult:
    """Finish from the AUCs and the 2x2 placement covariances (shared by both paths)."""
    if n_pos < 2 or n_neg < 2:
        var1 = var2 = cov = math.nan
    else:
        var1 = float(s10[0, 0] / n_pos + s01[0, 0] / n_neg)
        var2 = float(s10[1, 1] / n_pos + s01[1, 1] / n_neg)
        cov = float(s10[0, 1] / n_pos + s01[0, 1] / n_neg)
    var_diff = var1 + var2 - 2.0 * cov
    diff = auc1 - auc2
    if not (math.isfinite(var_diff) and math.isfinite(diff)):
        z = p = math.nan
    elif var_diff <= _ZERO_VAR_RTOL * max(var1 + var2, 1e-300):
        # Perfectly correlated placements: the difference is a constant.
        if abs(diff) <= 1e-12:
            z, p = 0.0, 1.0
        else:
            z, p = math.copysign(math.inf, diff), 0.0
    else:
        z = diff / math.sqrt(var_diff)
        p = math.erfc(abs(z) / math.sqrt(2.0))  # 2 x the normal upper tail, exact far out
    return DeLongResult(
        auc1=auc1,
        auc2=auc2,
        var1=var1,
        var2=var2,
        cov=cov,
        z=z,
        p=p,
        ci1=_ci(auc1, var1, alpha),
        ci2=_ci(auc2, var2, alpha),
        n_pos=n_pos,
        n_neg=n_neg,
        alpha=alpha,
    )


def placements(y: ArrayLike, s: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-patient placements ``(V10 of the positives, V01 of the negatives)`` in O(n log n).

    When a class is absent the other class's placements are undefined (NaN).
    """
    yy, ss = check_labels_scores(y, s)
    pos = ss[yy == 1]
    neg = ss[yy == 0]
    if pos.size == 0 or neg.size == 0:
        return np.full(pos.size, np.nan), np.full(neg.size, np.nan)
    neg_sorted = np.sort(neg)
    pos_sorted = np.sort(pos)
    below = np.searchsorted(neg_sorted, pos, side="left")
    tied = np.searchsorted(neg_sorted, pos, side="right") - below
    v10 = (below + 0.5 * tied) / neg.size
    above = pos.size - np.searchsorted(pos_sorted, neg, side="right")
    tied_p = np.searchsorted(pos_sorted, neg, side="right") - np.searchsorted(pos_sorted, neg, side="left")
    v01 = (above + 0.5 * tied_p) / pos.size
    return v10, v01


def _sample_cov(v: NDArray[np.float64]) -> NDArray[np.float64]:
    """2x2 covariance (ddof 1) of the rows' two placements; NaN with fewer than 2 rows."""
    if v.shape[0] < 2:
        return np.full((2, 2), np.nan)
    return np.atleast_2d(np.cov(v, rowvar=False, ddof=1))


def delong_pooled(y: ArrayLike, s1: ArrayLike, s2: ArrayLike, alpha: float = 0.05) -> DeLongResult:
    """DeLong's test of AUC(s1) == AUC(s2) on the same patients (per-patient reference)."""
    _check_alpha(alpha)
    yy, ss1 = check_labels_scores(y, s1)
    _, ss2 = check_labels_scores(y, s2)
    v10_1, v01_1 = placements(yy, ss1)
    v10_2, v01_2 = placements(yy, ss2)
    n_pos, n_neg = int(v10_1.size), int(v01_1.size)
    auc1 = float(v10_1.mean()) if n_pos and n_neg else math.nan
    auc2 = float(v10_2.mean()) if n_pos and n_neg else math.nan
    s10 = _sample_cov(np.column_stack([v10_1, v10_2]))
    s01 = _sample_cov(np.column_stack([v01_1, v01_2]))
    return _result(auc1, auc2, s10, s01, n_pos, n_neg, alpha)


def delong_ci(y: ArrayLike, s: ArrayLike, alpha: float = 0.05) -> DeLongCI:
    """DeLong variance and ``1 - alpha`` CI of one AUC (per-patient reference)."""
    r = delong_pooled(y, s, s, alpha)
    return DeLongCI(auc=r.auc1, var=r.var1, ci=r.ci1, alpha=alpha)


@dataclass(frozen=True)
class PlacementSums:
    """What a site returns in DeLong step 2: counts and sums over its patients, scalars only.

    ``pos_*`` sum over the site's positives (placements V10), ``neg_*`` over its
    negatives (V01); ``v1``/``v2`` are the placements under score 1/2,
    ``v11``, ``v22``, ``v12`` their products.
    """

    n_pos: int
    n_neg: int
    pos_v1: float
    pos_v2: float
    pos_v11: float
    pos_v22: float
    pos_v12: float
    neg_v1: float
    neg_v2: float
    neg_v11: float
    neg_v22: float
    neg_v12: float

    @staticmethod
    def zeros() -> PlacementSums:
        return PlacementSums(0, 0, *([0.0] * 10))

    def __add__(self, other: PlacementSums) -> PlacementSums:
        if not isinstance(other, PlacementSums):
            return NotImplemented
        return PlacementSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __radd__(self, other: object) -> PlacementSums:
        """Let ``sum(site_sums)`` start from 0."""
        if isinstance(other, int) and other == 0:
            return self
        return NotImplemented

    @staticmethod
    def aggregate(items: Iterable[PlacementSums]) -> PlacementSums:
        """Sum of the sites' step-2 answers (typed, unlike ``sum``)."""
        total = PlacementSums.zeros()
        for s in items:
            total = total + s
        return total

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> PlacementSums:
        names = [f.name for f in fields(PlacementSums)]
        missing = [k for k in names if k not in d]
        if missing:
            raise ValueError(f"DeLong placement sums lack {missing}")
        return PlacementSums(
            int(d["n_pos"]), int(d["n_neg"]), *(float(d[k]) for k in names if not k.startswith("n_"))
        )


def _check_pair(h1: ClassHistogram, h2: ClassHistogram) -> None:
    if (h1.n_pos, h1.n_neg) != (h2.n_pos, h2.n_neg):
        raise ValueError(
            f"the two global histograms describe different patients: "
            f"{h1.n_pos}/{h1.n_neg} vs {h2.n_pos}/{h2.n_neg} positives/negatives"
        )


def _site_placements(
    yy: NDArray[np.int64], ss: NDArray[np.float64], h: ClassHistogram, which: str
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """The site's patients' placements against the global histogram ``h``."""
    idx = ScoreGrid(h.bins).index(ss)
    is_pos = yy == 1
    own = np.where(is_pos, h.pos[idx], h.neg[idx])
    if np.any(own == 0):
        i = int(np.flatnonzero(own == 0)[0])
        raise ValueError(
            f"{which}: the patient at position {i} falls in bin {idx[i]}, which the global histogram "
            "holds empty for its class; scores or labels changed since step 1, or the histogram is not global"
        )
    if h.n_pos == 0 or h.n_neg == 0:
        return np.full(int(is_pos.sum()), np.nan), np.full(int((~is_pos).sum()), np.nan)
    neg = h.neg.astype(np.float64)
    pos = h.pos.astype(np.float64)
    neg_below_half = (np.cumsum(neg) - neg + 0.5 * neg) / h.n_neg
    pos_above_half = (np.cumsum(pos[::-1])[::-1] - pos + 0.5 * pos) / h.n_pos
    return neg_below_half[idx[is_pos]], pos_above_half[idx[~is_pos]]


def delong_step2_site(
    y: ArrayLike, s1: ArrayLike, s2: ArrayLike, global_h1: ClassHistogram, global_h2: ClassHistogram
) -> PlacementSums:
    """Run at a site: sums of its patients' placements against the global histograms.

    For a single AUC's CI pass the same score (and histogram) twice.
    """
    _check_pair(global_h1, global_h2)
    yy, ss1 = check_labels_scores(y, s1)
    _, ss2 = check_labels_scores(y, s2)
    p1, n1 = _site_placements(yy, ss1, global_h1, "score 1")
    p2, n2 = _site_placements(yy, ss2, global_h2, "score 2")
    return PlacementSums(
        n_pos=int(p1.size),
        n_neg=int(n1.size),
        pos_v1=float(p1.sum()),
        pos_v2=float(p2.sum()),
        pos_v11=float(np.dot(p1, p1)),
        pos_v22=float(np.dot(p2, p2)),
        pos_v12=float(np.dot(p1, p2)),
        neg_v1=float(n1.sum()),
        neg_v2=float(n2.sum()),
        neg_v11=float(np.dot(n1, n1)),
        neg_v22=float(np.dot(n2, n2)),
        neg_v12=float(np.dot(n1, n2)),
    )


def _cov_from_sums(n: int, s1: float, s2: float, s11: float, s22: float, s12: float) -> NDArray[np.float64]:
    if n < 2:
        return np.full((2, 2), np.nan)
    m1, m2 = s1 / n, s2 / n
    c11 = (s11 - n * m1 * m1) / (n - 1)
    c22 = (s22 - n * m2 * m2) / (n - 1)
    c12 = (s12 - n * m1 * m2) / (n - 1)
    return np.array([[c11, c12], [c12, c22]])


def delong_from_sums(
    global_h1: ClassHistogram, global_h2: ClassHistogram, sums: PlacementSums, alpha: float = 0.05
) -> DeLongResult:
    """Server side of step 2: the DeLong test from the summed placement sums."""
    _check_alpha(alpha)
    _check_pair(global_h1, global_h2)
    if (sums.n_pos, sums.n_neg) != (global_h1.n_pos, global_h1.n_neg):
        raise ValueError(
            f"step-2 sums cover {sums.n_pos}/{sums.n_neg} positives/negatives but the global histograms "
            f"{global_h1.n_pos}/{global_h1.n_neg}: a site is missing from step 2 or its data changed"
        )
    s10 = _cov_from_sums(sums.n_pos, sums.pos_v1, sums.pos_v2, sums.pos_v11, sums.pos_v22, sums.pos_v12)
    s01 = _cov_from_sums(sums.n_neg, sums.neg_v1, sums.neg_v2, sums.neg_v11, sums.neg_v22, sums.neg_v12)
    return _result(auc(global_h1), auc(global_h2), s10, s01, sums.n_pos, sums.n_neg, alpha)
