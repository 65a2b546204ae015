"""Calibration from grid histograms against per-patient computations (scikit-learn, scipy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats
from sklearn.linear_model import LogisticRegression

from common.calibration import bin_scores, calibration, hosmer_lemeshow
from common.gridstats import ClassHistogram, ScoreGrid

GRID = ScoreGrid(10000)


def _patients(rng: np.random.Generator, n: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    """Miscalibrated probabilities (true slope 0.6, offset +0.4); ``tied``: only 9 distinct values."""
    lp = rng.normal(0.0, 1.6, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(0.4 + 0.6 * lp)))).astype(int)
    s = 1 / (1 + np.exp(-lp))
    if tied:
        s = np.round(s * 8) / 8 * 0.9 + 0.05
    return y, s


def _sites(y: np.ndarray, s: np.ndarray) -> ClassHistogram:
    """Three sites' histograms summed (one holding a single class, one empty), as the server does."""
    neg_only = np.flatnonzero(y == 0)[:7]
    rest = np.setdiff1d(np.arange(y.size), neg_only)
    parts = [neg_only, rest[: rest.size // 2], rest[rest.size // 2 :], np.array([], dtype=int)]
    return ClassHistogram.aggregate(ClassHistogram.from_scores(y[p], s[p], GRID) for p in parts)


def _per_patient_x(h: ClassHistogram, s: np.ndarray) -> np.ndarray:
    """Each patient's score replaced by its bin's score (the fit's definition), as a logit."""
    q = np.clip(bin_scores(h)[GRID.index(s)], 1e-6, 1 - 1e-6)
    return np.log(q / (1 - q))


@pytest.mark.parametrize("tied", [False, True])
def test_slope_and_intercepts_equal_per_patient_logistic_regression(tied: bool) -> None:
    rng = np.random.default_rng(1 + tied)
    y, s = _patients(rng, 600, tied)
    h = _sites(y, s)
    cal = calibration(h, 10)
    x = _per_patient_x(h, s)
    lr = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(x[:, None], y)
    assert cal.slope == pytest.approx(float(lr.coef_[0, 0]), abs=1e-6)
    assert cal.intercept_2p == pytest.approx(float(lr.intercept_[0]), abs=1e-6)
    # calibration-in-the-large: the root of the offset model's score equation
    a = optimize.brentq(lambda a: float(np.sum(y - 1 / (1 + np.exp(-(a + x))))), -10, 10, xtol=1e-14)
    assert cal.intercept == pytest.approx(a, abs=1e-8)
    assert cal.brier == pytest.approx(float(np.mean((s - y) ** 2)), abs=1e-12)
    assert cal.n == y.size
    # the simulated miscalibration is found
    assert 0.4 < cal.slope < 0.85 and cal.intercept > 0.1
    if not tied:  # continuous scores: few bins hold two patients, so the raw-score fit is within the grid
        x_raw = np.log(s / (1 - s))
        raw = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10000).fit(x_raw[:, None], y)
        assert cal.slope == pytest.approx(float(raw.coef_[0, 0]), abs=1e-4)


def _hl_reference(y: np.ndarray, s: np.ndarray, groups: int) -> tuple[float, int]:
    """Per patient: sort, cut by rank (tied scores take the rank of their first), the textbook sum."""
    order = np.argsort(s, kind="stable")
    ys, ss = y[order], s[order]
    _, first = np.unique(ss, return_index=True)
    rank_first = first[np.searchsorted(np.unique(ss), ss)]
    g = rank_first * groups // y.size
    stat = 0.0
    used = 0
    for k in range(groups):
        sel = g == k
        if not sel.any():
            continue
        used += 1
        o, e, n = ys[sel].sum(), ss[sel].sum(), sel.sum()
        stat += (o - e) ** 2 / (e * (1 - e / n))
    return stat, used


@pytest.mark.parametrize("tied", [False, True])
def test_hosmer_lemeshow_equals_the_per_patient_statistic(tied: bool) -> None:
    rng = np.random.default_rng(5 + tied)
    y, s = _patients(rng, 500, tied)
    if not tied:
        s = GRID.index(s) / GRID.bins + 0.5 / GRID.bins  # one score per bin: grid order is score order
    hl = hosmer_lemeshow(_sites(y, s), 10)
    stat, used = _hl_reference(y, s, 10)
    assert hl["groups"] == used
    assert hl["statistic"] == pytest.approx(stat, rel=1e-9)
    assert hl["df"] == used - 2
    assert hl["p"] == pytest.approx(float(stats.chi2.sf(stat, used - 2)), rel=1e-9)
    if tied:
        assert used < 10  # 9 distinct values cannot make 10 groups


def test_well_calibrated_scores_look_calibrated() -> None:
    rng = np.random.default_rng(11)
    p = rng.uniform(0.02, 0.98, 4000)
    y = (rng.random(p.size) < p).astype(int)
    cal = calibration(ClassHistogram.from_scores(y, p, GRID), 10)
    assert abs(cal.slope - 1) < 0.15 and abs(cal.intercept) < 0.1
    assert cal.hl_p > 0.01


def test_one_class_empty_and_separated_sites_give_nan_not_errors() -> None:
    empty = ClassHistogram.zeros(GRID.bins)
    one = ClassHistogram.from_scores(np.zeros(5, int), np.linspace(0.1, 0.5, 5), GRID)
    separated = ClassHistogram.from_scores(
        np.array([0, 0, 0, 1, 1, 1]), np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), GRID
    )
    for h in (empty, one, separated):
        c = calibration(h, 10)
        assert math.isnan(c.slope)
        d = c.to_dict()
        assert d["slope"] is None
    assert math.isnan(calibration(empty, 10).brier)
    assert calibration(one, 10).intercept is not None and math.isnan(calibration(one, 10).intercept)
    # counts-only histograms (no sums): Hosmer-Lemeshow needs the sums and says so with NaN
    counts_only = ClassHistogram.from_arrays(
        _sites(*_patients(np.random.default_rng(0), 100, False)).to_arrays(False)
    )
    assert math.isnan(hosmer_lemeshow(counts_only, 10)["statistic"])
