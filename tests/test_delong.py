"""DeLong: pooled against brute force, federated two-step against pooled on quantised scores."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from common.delong import (
    DeLongResult,
    PlacementSums,
    delong_ci,
    delong_from_sums,
    delong_pooled,
    delong_step2_site,
)
from common.gridstats import ClassHistogram, ScoreGrid


def _cohort(rng: np.random.Generator, n: int, pos_rate: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and two correlated, informative probabilities."""
    y = (rng.random(n) < pos_rate).astype(int)
    shared = rng.normal(0, 1, n)
    s1 = 1 / (1 + np.exp(-(1.4 * y - 0.7 + 0.8 * shared + 0.6 * rng.normal(0, 1, n))))
    s2 = 1 / (1 + np.exp(-(0.9 * y - 0.45 + 0.8 * shared + 0.8 * rng.normal(0, 1, n))))
    return y, s1, s2


def _brute_force(y: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> dict[str, float]:
    """DeLong 1988 written out with the O(m n) kernel matrix and explicit loops."""
    out = {}
    pos, neg = y == 1, y == 0
    m, n = pos.sum(), neg.sum()
    comps = []
    for s in (s1, s2):
        x, z = s[pos], s[neg]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0), psi.mean()))
    (v10a, v01a, a1), (v10b, v01b, a2) = comps
    s10 = np.zeros((2, 2))
    s01 = np.zeros((2, 2))
    for i, va in enumerate((v10a, v10b)):
        for j, vb in enumerate((v10a, v10b)):
            s10[i, j] = sum((va[k] - va.mean()) * (vb[k] - vb.mean()) for k in range(m)) / (m - 1)
    for i, va in enumerate((v01a, v01b)):
        for j, vb in enumerate((v01a, v01b)):
            s01[i, j] = sum((va[k] - va.mean()) * (vb[k] - vb.mean()) for k in range(n)) / (n - 1)
    out["auc1"], out["auc2"] = a1, a2
    out["var1"] = s10[0, 0] / m + s01[0, 0] / n
    out["var2"] = s10[1, 1] / m + s01[1, 1] / n
    out["cov"] = s10[0, 1] / m + s01[0, 1] / n
    out["z"] = (a1 - a2) / math.sqrt(out["var1"] + out["var2"] - 2 * out["cov"])
    out["p"] = 2 * norm.sf(abs(out["z"]))
    return out


@pytest.mark.parametrize(("seed", "n", "decimals"), [(0, 30, 1), (1, 60, 2), (2, 45, 6)])
def test_pooled_matches_brute_force(seed: int, n: int, decimals: int) -> None:
    y, s1, s2 = _cohort(np.random.default_rng(seed), n, 0.55)
    s1, s2 = s1.round(decimals), s2.round(decimals)  # ties, heavy at 1 decimal
    r = delong_pooled(y, s1, s2)
    ref = _brute_force(y, s1, s2)
    for key, value in ref.items():
        assert getattr(r, key) == pytest.approx(value, rel=1e-10, abs=1e-14), key
    assert r.auc1 == pytest.approx(roc_auc_score(y, s1), abs=1e-12)


def test_variance_has_hanley_mcneil_magnitude() -> None:
    y, s1, _ = _cohort(np.random.default_rng(5), 400, 0.5)
    ci = delong_ci(y, s1)
    a, m, n = ci.auc, int(y.sum()), int((1 - y).sum())
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    hanley_mcneil = (a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n)
    assert ci.var == pytest.approx(hanley_mcneil, rel=0.3)
    half = norm.ppf(0.975) * math.sqrt(ci.var)
    assert ci.ci == pytest.approx((a - half, a + half), abs=1e-12)
    wide = delong_ci(y, s1, alpha=0.01)
    assert wide.ci[0] < ci.ci[0] and wide.ci[1] > ci.ci[1]


Cohort = tuple[np.ndarray, np.ndarray, np.ndarray]


def _federated(
    sites: list[Cohort], grid: ScoreGrid
) -> tuple[ClassHistogram, ClassHistogram, list[PlacementSums], DeLongResult]:
    # Step 1: sites send histograms, the server sums them and sends them back.
    h1 = ClassHistogram.aggregate(ClassHistogram.from_scores(y, s1, grid) for y, s1, _ in sites)
    h2 = ClassHistogram.aggregate(ClassHistogram.from_scores(y, s2, grid) for y, _, s2 in sites)
    # Step 2: each site returns placement sums against the global histograms.
    site_sums = [delong_step2_site(y, s1, s2, h1, h2) for y, s1, s2 in sites]
    return h1, h2, site_sums, delong_from_sums(h1, h2, PlacementSums.aggregate(site_sums))


@pytest.mark.parametrize("bins", [10000, 50])
def test_federated_equals_pooled_on_quantised_scores(bins: int) -> None:
    rng = np.random.default_rng(11)
    sites = [_cohort(rng, 40, 0.3), _cohort(rng, 150, 0.75), _cohort(rng, 25, 0.6)]
    grid = ScoreGrid(bins)
    *_, fed = _federated(sites, grid)
    y = np.concatenate([s[0] for s in sites])
    q1 = grid.quantise(np.concatenate([s[1] for s in sites]))
    q2 = grid.quantise(np.concatenate([s[2] for s in sites]))
    ref = delong_pooled(y, q1, q2)
    for key in ("auc1", "auc2", "var1", "var2", "cov", "z", "p"):
        assert getattr(fed, key) == pytest.approx(getattr(ref, key), rel=1e-10, abs=1e-12), key
    for key in ("ci1", "ci2"):
        np.testing.assert_allclose(getattr(fed, key), getattr(ref, key), rtol=1e-10)
    assert (fed.n_pos, fed.n_neg) == (ref.n_pos, ref.n_neg) == (int(y.sum()), int(len(y) - y.sum()))
    assert 0 < fed.p < 1 and fed.z != 0


def test_placement_sums_hold_only_scalars() -> None:
    rng = np.random.default_rng(3)
    small, large = _cohort(rng, 10, 0.5), _cohort(rng, 300, 0.5)
    _, _, site_sums, _ = _federated([small, large], ScoreGrid(10000))
    for sums in site_sums:
        for f in dataclasses.fields(sums):
            value = getattr(sums, f.name)
            assert type(value) in (int, float), (f.name, type(value))
        d = sums.to_dict()
        assert len(d) == 12 and all(type(v) in (int, float) for v in d.values())
        assert PlacementSums.from_dict(d) == sums
    total = site_sums[0] + site_sums[1]
    assert sum(site_sums) == total == PlacementSums.aggregate(site_sums) == PlacementSums.zeros() + total


def test_identical_scores_give_p_one_both_ways() -> None:
    y, s1, _ = _cohort(np.random.default_rng(4), 50, 0.5)
    assert (delong_pooled(y, s1, s1).z, delong_pooled(y, s1, s1).p) == (0.0, 1.0)
    *_, fed = _federated([(y, s1, s1)], ScoreGrid(10000))
    assert (fed.z, fed.p) == (0.0, 1.0)


def test_single_class_and_empty_site_give_nan_not_crash() -> None:
    y = np.zeros(6, dtype=int)
    s = np.linspace(0.1, 0.9, 6)
    r = delong_pooled(y, s, s[::-1])
    assert math.isnan(r.auc1) and math.isnan(r.var1) and math.isnan(r.p)
    assert r.to_dict()["p"] is None and r.to_dict()["ci1"] == [None, None]
    empty = (np.array([], dtype=int), np.array([]), np.array([]))
    *_, fed = _federated([(y, s, s[::-1]), empty], ScoreGrid(100))
    assert math.isnan(fed.auc1) and math.isnan(fed.z)
    one_pos = delong_pooled([0, 0, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    assert one_pos.auc1 == 1.0 and math.isnan(one_pos.var1)


def test_inconsistent_steps_are_refused() -> None:
    rng = np.random.default_rng(8)
    a, b = _cohort(rng, 30, 0.5), _cohort(rng, 40, 0.5)
    h1, h2, site_sums, _ = _federated([a, b], ScoreGrid(10000))
    with pytest.raises(ValueError, match="a site is missing from step 2"):
        delong_from_sums(h1, h2, site_sums[0])
    changed = (a[0], np.clip(a[1] + 0.01, 0, 1), a[2])
    with pytest.raises(ValueError, match="holds empty for its class"):
        delong_step2_site(*changed, h1, h2)
    with pytest.raises(ValueError, match="different patients"):
        delong_step2_site(*a, h1, ClassHistogram.from_scores(a[0], a[2], ScoreGrid(10000)))
