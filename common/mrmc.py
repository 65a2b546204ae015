"""Obuchowski-Rockette multi-reader multi-case (MRMC) analysis with DeLong covariances.

A reader study has I modalities (here: without and with the model) and J
readers, each reading the same cases.  Pooling every (case, reader) reading
into one DeLong test counts each case J times and shrinks the variance by
about J; the Obuchowski-Rockette (OR) model instead treats readers and cases
as random: with ``theta[i, j]`` reader j's AUC under modality i and the
DeLong covariance matrix of all I*J AUCs (entry ``i * J + j``), the error
variance and covariances are averaged (Obuchowski & Rockette 1995):

* ``Var``  the mean variance,
* ``Cov1`` same reader, different modalities,
* ``Cov2`` different readers, same modality,
* ``Cov3`` different readers, different modalities,

and the random-reader random-case (RRRC) test of equal modality means is

    F = MS(T) / (MS(T:R) + J max(Cov2 - Cov3, 0)),
    df2 = (MS(T:R) + J max(Cov2 - Cov3, 0))**2 / (MS(T:R)**2 / ((I - 1)(J - 1)))

(Hillis 2007's denominator degrees of freedom).  The CI of a difference of two
modality means is ``diff +- t(df2) sqrt(2/J (MS(T:R) + J max(Cov2 - Cov3, 0)))``
and a single modality's mean gets ``sqrt(MS(R)/J + max(Cov2_i, 0))`` with
``df = (MS(R) + J max(Cov2_i, 0))**2 / (MS(R)**2 / (J - 1))``.  With one
reader only, or when readers are to be treated as fixed, the fixed-reader
random-case (FRRC) test uses ``Var - Cov1 + (J - 1)(Cov2 - Cov3)`` and
normal/chi-square reference distributions (for J = 1 it is DeLong's test).

The covariance matrix comes from the same two federated steps as
``common.delong``: per-(reader, modality) global histograms, then per-site
sums of placement values for each pair of readings (``delong_step2_site`` on
every pair; bookkeeping in ``common.readerstudy``); :func:`cov_from_pairs`
assembles it.  :func:`delong_cov` is the
per-patient reference.  Identical duplicated readers give ``MS(T:R) = 0``,
``Cov2 = Var`` and ``Cov3 = Cov1``: the standard error of the difference
equals the single reader's DeLong one (the variance does not shrink).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

from common.delong import placements
from common.metrics import check_labels_scores, nan_to_none

__all__ = ["ORResult", "cov_from_pairs", "delong_cov", "or_analysis"]


def delong_cov(y: ArrayLike, scores: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """AUCs and DeLong covariance matrix of K scores (rows of ``scores``) on the same patients."""
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    v10, v01 = [], []
    for row in s:
        yy, ss = check_labels_scores(y, row)
        a, b = placements(yy, ss)
        v10.append(a)
        v01.append(b)
    p, n = np.asarray(v10), np.asarray(v01)
    m_pos, m_neg = p.shape[1], n.shape[1]
    if m_pos < 2 or m_neg < 2:
        k = s.shape[0]
        return np.full(k, np.nan) if m_pos == 0 or m_neg == 0 else p.mean(axis=1), np.full((k, k), np.nan)
    s10 = np.atleast_2d(np.cov(p, ddof=1))
    s01 = np.atleast_2d(np.cov(n, ddof=1))
    return p.mean(axis=1), s10 / m_pos + s01 / m_neg


def cov_from_pairs(
    k: int, pairs: Mapping[tuple[int, int], tuple[float, float, float]]
) -> NDArray[np.float64]:
    """The K x K covariance matrix from pairwise DeLong results ``(a, b) -> (var_a, var_b, cov_ab)``.

    Every off-diagonal pair ``a < b`` must be present (a single score needs ``(0, 0)``);
    a variance seen in several pairs is the same number up to rounding and is averaged.
    """
    cov = np.full((k, k), np.nan)
    seen: dict[int, list[float]] = {}
    for (a, b), (va, vb, c) in pairs.items():
        if not (0 <= a < k and 0 <= b < k):
            raise ValueError(f"pair {(a, b)} outside 0..{k - 1}")
        seen.setdefault(a, []).append(va)
        seen.setdefault(b, []).append(vb)
        if a != b:
            cov[a, b] = cov[b, a] = c
    for a in range(k):
        if a not in seen:
            raise ValueError(f"no variance for score {a}")
        cov[a, a] = float(np.mean(seen[a]))
    missing = [(a, b) for a in range(k) for b in range(a + 1, k) if math.isnan(cov[a, b])]
    if missing:
        raise ValueError(f"covariance pairs missing: {missing[:5]}")
    return cov


@dataclass(frozen=True)
class ORResult:
    """One OR analysis: reader AUCs, variance components, the test and CIs of modality means."""

    modalities: tuple[str, ...]
    readers: tuple[str, ...]
    auc: NDArray[np.float64]  # (I, J)
    mean_auc: NDArray[np.float64]  # (I,)
    var: float
    cov1: float
    cov2: float
    cov3: float
    ms_t: float
    ms_tr: float
    method: str  # "RRRC" (random readers and cases) or "FRRC" (fixed readers, random cases)
    f: float
    df1: int
    df2: float
    p: float
    diff: float  # mean_auc[1] - mean_auc[0]
    se_diff: float
    ci_diff: tuple[float, float]
    se_mean: NDArray[np.float64]
    df_mean: NDArray[np.float64]
    ci_mean: NDArray[np.float64]  # (I, 2)
    n_pos: int
    n_neg: int
    alpha: float

    def to_dict(self) -> dict[str, Any]:
        def f(x: float) -> float | None:
            return nan_to_none(float(x))

        return {
            "method": self.method,
            "modalities": list(self.modalities),
            "readers": list(self.readers),
            "patients": self.n_pos + self.n_neg,
            "n_pos": self.n_pos,
            "n_neg": self.n_neg,
            "reader_auc": {
                r: {m: f(self.auc[i, j]) for i, m in enumerate(self.modalities)}
                for j, r in enumerate(self.readers)
            },
            "mean_auc": {
                m: {
                    "auc": f(self.mean_auc[i]),
                    "se": f(self.se_mean[i]),
                    "df": f(self.df_mean[i]),
                    "ci": [f(self.ci_mean[i, 0]), f(self.ci_mean[i, 1])],
                }
                for i, m in enumerate(self.modalities)
            },
            "difference": {
                "of": f"{self.modalities[1]} - {self.modalities[0]}",
                "estimate": f(self.diff),
                "se": f(self.se_diff),
                "ci": [f(self.ci_diff[0]), f(self.ci_diff[1])],
            },
            "F": f(self.f),
            "df1": self.df1,
            "df2": f(self.df2),
            "p": f(self.p),
            "components": {
                "var": f(self.var),
                "cov1": f(self.cov1),
                "cov2": f(self.cov2),
                "cov3": f(self.cov3),
                "ms_t": f(self.ms_t),
                "ms_tr": f(self.ms_tr),
            },
            "alpha": self.alpha,
        }


def _components(cov: NDArray[np.float64], n_mod: int, n_read: int) -> tuple[float, float, float, float]:
    var, c1, c2, c3 = [], [], [], []
    for a in range(n_mod * n_read):
        for b in range(n_mod * n_read):
            (ia, ja), (ib, jb) = divmod(a, n_read), divmod(b, n_read)
            if a == b:
                var.append(cov[a, b])
            elif ja == jb:
                c1.append(cov[a, b])
            elif ia == ib:
                c2.append(cov[a, b])
            else:
                c3.append(cov[a, b])

    def mean(x: list[float]) -> float:
        return float(np.mean(x)) if x else math.nan

    return mean(var), mean(c1), mean(c2), mean(c3)


def _modality_cov2(cov: NDArray[np.float64], i: int, n_read: int) -> float:
    vals = [cov[i * n_read + a, i * n_read + b] for a in range(n_read) for b in range(n_read) if a != b]
    return float(np.mean(vals)) if vals else math.nan


def or_analysis(
    auc: ArrayLike,
    cov: ArrayLike,
    *,
    modalities: Sequence[str] = ("without_ai", "with_ai"),
    readers: Sequence[str] | None = None,
    n_pos: int = 0,
    n_neg: int = 0,
    alpha: float = 0.05,
    fixed_readers: bool = False,
) -> ORResult:
    """OR analysis of ``auc[i, j]`` (modality i, reader j) with covariance ``cov[i*J + j, i'*J + j']``.

    Readers are random (RRRC) when there are at least two and ``fixed_readers`` is
    false; otherwise the fixed-reader analysis (FRRC) is returned.  The difference
    tested and reported is modality 1 minus modality 0.
    """
    theta = np.asarray(auc, dtype=np.float64)
    c = np.asarray(cov, dtype=np.float64)
    if theta.ndim != 2 or theta.shape[0] < 2:
        raise ValueError(f"need AUCs of shape (modalities >= 2, readers), got {theta.shape}")
    n_mod, n_read = theta.shape
    if c.shape != (n_mod * n_read, n_mod * n_read):
        raise ValueError(f"covariance must be {n_mod * n_read}x{n_mod * n_read}, got {c.shape}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    names = tuple(readers) if readers is not None else tuple(f"reader{j + 1}" for j in range(n_read))
    if len(names) != n_read or len(modalities) != n_mod:
        raise ValueError("reader or modality names do not match the AUC matrix")
    var, cov1, cov2, cov3 = _components(c, n_mod, n_read)
    mod_mean = theta.mean(axis=1)
    read_mean = theta.mean(axis=0)
    grand = float(theta.mean())
    ms_t = float(n_read * np.sum((mod_mean - grand) ** 2) / (n_mod - 1))
    resid = theta - mod_mean[:, None] - read_mean[None, :] + grand
    ms_tr = float(np.sum(resid**2) / ((n_mod - 1) * (n_read - 1))) if n_read > 1 else math.nan
    df1 = n_mod - 1
    diff = float(mod_mean[1] - mod_mean[0])
    random = n_read >= 2 and not fixed_readers
    if random:
        den = ms_tr + n_read * max(cov2 - cov3, 0.0)
        df2 = den**2 / (ms_tr**2 / ((n_mod - 1) * (n_read - 1))) if ms_tr > 0 else math.inf
        se_diff = math.sqrt(2.0 / n_read * den) if den >= 0 else math.nan
    else:
        den = var - cov1 + (n_read - 1) * (cov2 - cov3) if n_read > 1 else var - cov1
        df2 = math.inf
        se_diff = math.sqrt(2.0 / n_read * den) if den >= 0 else math.nan
    f_stat, p = _f_test(ms_t, den, df1, df2, diff)
    q = _quantile(1.0 - alpha / 2.0, df2)
    ci_diff = (diff - q * se_diff, diff + q * se_diff)
    se_mean = np.full(n_mod, np.nan)
    df_mean = np.full(n_mod, np.nan)
    ci_mean = np.full((n_mod, 2), np.nan)
    for i in range(n_mod):
        if random:
            ms_r = float(np.sum((theta[i] - mod_mean[i]) ** 2) / (n_read - 1))
            c2 = max(_modality_cov2(c, i, n_read), 0.0)
            se_mean[i] = math.sqrt(ms_r / n_read + c2)
            df_mean[i] = (ms_r + n_read * c2) ** 2 / (ms_r**2 / (n_read - 1)) if ms_r > 0 else math.inf
        else:
            block = c[i * n_read : (i + 1) * n_read, i * n_read : (i + 1) * n_read]
            se_mean[i] = math.sqrt(max(float(block.sum()) / n_read**2, 0.0))
            df_mean[i] = math.inf
        qi = _quantile(1.0 - alpha / 2.0, float(df_mean[i]))
        ci_mean[i] = (mod_mean[i] - qi * se_mean[i], mod_mean[i] + qi * se_mean[i])
    return ORResult(
        modalities=tuple(modalities),
        readers=names,
        auc=theta,
        mean_auc=mod_mean,
        var=var,
        cov1=cov1,
        cov2=cov2,
        cov3=cov3,
        ms_t=ms_t,
        ms_tr=ms_tr,
        method="RRRC" if random else "FRRC",
        f=f_stat,
        df1=df1,
        df2=df2,
        p=p,
        diff=diff,
        se_diff=se_diff,
        ci_diff=ci_diff,
        se_mean=se_mean,
        df_mean=df_mean,
        ci_mean=ci_mean,
        n_pos=n_pos,
        n_neg=n_neg,
        alpha=alpha,
    )


def _quantile(q: float, df: float) -> float:
    if not math.isfinite(df):
        return float(stats.norm.ppf(q))
    return float(stats.t.ppf(q, df))


def _f_test(ms_t: float, den: float, df1: int, df2: float, diff: float) -> tuple[float, float]:
    """F statistic and p; a zero denominator gives F = inf and p = 0 unless the modalities are equal."""
    if not (math.isfinite(ms_t) and math.isfinite(den)):
        return math.nan, math.nan
    if den <= 1e-15:
        return (0.0, 1.0) if abs(diff) <= 1e-12 and ms_t <= 1e-15 else (math.inf, 0.0)
    f_stat = ms_t / den
    if math.isfinite(df2):
        return f_stat, float(stats.f.sf(f_stat, df1, df2))
    return f_stat, float(stats.chi2.sf(f_stat * df1, df1))
