"""Ensemble weights: simplex grid, federated search equals pooled search, MAE from histograms."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
from scipy.special import comb
from sklearn.metrics import roc_auc_score

from common.ensemble import (
    ENSEMBLES,
    best_weights,
    candidate_histograms,
    combine,
    mean_absolute_error_from_hist,
    select_weights,
    simplex_grid,
)
from common.gridstats import ClassHistogram, ScoreGrid, auc, auc_bound

GRID = ScoreGrid(10000)


@pytest.mark.parametrize(("k", "step"), [(1, 0.1), (2, 0.05), (3, 0.05), (3, 0.1), (4, 0.25)])
def test_simplex_grid_size_and_rows(k: int, step: float) -> None:
    w = simplex_grid(k, step)
    m = round(1 / step)
    assert w.shape == (comb(m + k - 1, k - 1, exact=True), k)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    np.testing.assert_allclose(w * m, np.round(w * m), atol=1e-9)  # multiples of step
    assert len({tuple(r) for r in np.round(w * m).astype(int)}) == len(w)  # no duplicates
    assert np.array_equal(w[0], np.eye(k)[0])
    for vertex in np.eye(k):
        assert any(np.array_equal(r, vertex) for r in w)


def test_simplex_grid_rejects_bad_step() -> None:
    with pytest.raises(ValueError, match="must divide 1"):
        simplex_grid(3, 0.3)
    with pytest.raises(ValueError, match="k >= 1"):
        simplex_grid(0, 0.1)


def test_combine_is_the_weighted_average() -> None:
    p = np.array([[0.2, 0.8, 0.95], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(combine(p, [0.5, 0.25, 0.25]), [0.1 + 0.2 + 0.2375, 1.0])
    assert combine(p, [1 / 3] * 3).max() <= 1.0
    with pytest.raises(ValueError, match="sum to 1"):
        combine(p, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="member 1 at position 0"):
        combine([[0.2, 1.3, 0.1]], [0.5, 0.25, 0.25])


def test_ensembles_name_known_members() -> None:
    assert set(ENSEMBLES) == {"ensemble_2d3d", "ensemble_3d_radiologist", "ensemble_2d3d_radiologist"}
    assert {m for members in ENSEMBLES.values() for m in members} == {
        "densenet2d",
        "densenet3d",
        "radiologist",
    }
    with pytest.raises(TypeError):
        ENSEMBLES["other"] = ("x",)  # type: ignore[index]


def _site(rng: np.random.Generator, n: int, pos_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (n, 3) member probabilities: 2D (weak), 3D (good), radiologist (9-point, coarse)."""
    y = (rng.random(n) < pos_rate).astype(int)
    d2 = 1 / (1 + np.exp(-rng.normal(0.4 * y - 0.2, 1.0)))
    d3 = 1 / (1 + np.exp(-rng.normal(1.5 * y - 0.75, 1.0)))
    mapping = np.array([0.05, 0.15, 0.25, 0.40, 0.60, 0.75, 0.85, 0.95])
    rad = mapping[np.clip(np.round(rng.normal(3.5 + 1.6 * y, 1.5)), 0, 7).astype(int)]
    return y, np.column_stack([d2, d3, rad])


def _pooled_search(y: np.ndarray, probs: np.ndarray, weights: np.ndarray, grid: ScoreGrid | None) -> int:
    """Per-patient reference search: AUC of each candidate on the pooled patients."""
    aucs = []
    for w in weights:
        s = combine(probs, w)
        aucs.append(roc_auc_score(y, grid.quantise(s) if grid else s))
    return select_weights(np.array(aucs), weights)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_federated_search_picks_pooled_weights(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sites = [_site(rng, 40, 0.3), _site(rng, 150, 0.75), _site(rng, 25, 0.6)]
    weights = simplex_grid(3, 0.05)
    per_site = [candidate_histograms(y, p, weights, GRID) for y, p in sites]
    summed = [ClassHistogram.aggregate(hs) for hs in zip(*per_site, strict=True)]
    index, best_auc = best_weights(summed, weights)

    y = np.concatenate([s[0] for s in sites])
    probs = np.concatenate([s[1] for s in sites])
    # Same candidates scored on the pooled, grid-quantised ensemble scores: the same choice.
    assert index == _pooled_search(y, probs, weights, GRID)
    assert best_auc == pytest.approx(
        roc_auc_score(y, GRID.quantise(combine(probs, weights[index]))), abs=1e-12
    )
    # Against the unquantised scores the choice is optimal up to the grid bound.
    exact = np.array([roc_auc_score(y, combine(probs, w)) for w in weights])
    assert exact[index] >= exact.max() - 2 * max(auc_bound(h) for h in summed) - 1e-12
    assert not np.array_equal(weights[index], np.eye(3)[0])  # the weak 2D model alone is not chosen


def test_ties_go_to_the_most_even_weights_then_lowest_index() -> None:
    w = simplex_grid(3, 0.5)  # (1,0,0) (.5,.5,0) (.5,0,.5) (0,1,0) (0,.5,.5) (0,0,1)
    assert select_weights([0.9, 0.8, 0.8, 0.9, 0.7, 0.6], w) == 0
    assert select_weights([0.9, 0.9, 0.8, 0.9, 0.7, 0.6], w) == 1  # even beats the vertices
    assert select_weights([0.7, 0.9, 0.9 + 1e-14, 0.8, 0.7, 0.6], w) == 1  # within 1e-12: a tie
    assert select_weights([0.7, 0.9, 0.9 + 1e-9, 0.8, 0.7, 0.6], w) == 2
    assert select_weights([np.nan] * 6, w) == 1  # no information: the most even
    y = np.array([0, 0, 1, 1])
    same = ClassHistogram.from_scores(y, [0.1, 0.2, 0.3, 0.4], GRID)
    assert best_weights([same] * 6, w) == (1, 1.0)
    with pytest.raises(ValueError, match="6 weight rows"):
        best_weights([same], w)


def test_best_weights_with_one_class_does_not_crash() -> None:
    w = simplex_grid(2, 0.5)
    hs = candidate_histograms([0, 0], [[0.1, 0.3], [0.2, 0.9]], w, GRID)
    index, value = best_weights(hs, w)
    assert index == 1 and math.isnan(value)


def test_mean_absolute_error_is_exact() -> None:
    rng = np.random.default_rng(9)
    sites = [_site(rng, n, r) for n, r in ((40, 0.3), (150, 0.75), (25, 0.6))]
    hist = ClassHistogram.aggregate(ClassHistogram.from_scores(y, p[:, 2], GRID) for y, p in sites)
    y = np.concatenate([s[0] for s in sites])
    p = np.concatenate([s[1][:, 2] for s in sites])
    assert mean_absolute_error_from_hist(hist) == pytest.approx(np.mean(np.abs(p - y)), rel=1e-13)
    assert math.isnan(mean_absolute_error_from_hist(ClassHistogram.zeros(10)))


def test_radiologist_scores_keep_their_order_on_the_grid() -> None:
    # The 9-point mapping's probabilities are distinct bins, so the grid AUC of the reader is exact.
    mapping = [0.05, 0.15, 0.25, 0.40, 0.60, 0.75, 0.85, 0.95]
    bins = GRID.index(mapping)
    assert all(a < b for a, b in pairwise(bins))
    y = np.array([0, 1] * 8)
    s = np.repeat(mapping, 2)[np.random.default_rng(0).permutation(16)]
    h = ClassHistogram.from_scores(y, s, GRID)
    assert auc(h) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_shrinkage_prefers_the_best_member_unless_a_blend_gains_more_than_the_tolerance() -> None:
    from common.ensemble import shrink_to_best_member

    w = simplex_grid(2, 0.25)  # (1, 0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0, 1)
    aucs = [0.80, 0.83, 0.835, 0.82, 0.70]
    assert select_weights(aucs, w) == 2  # the unregularised maximum
    assert shrink_to_best_member(aucs, w, 0.01) == 1  # within 0.01 of it, most weight on member 0
    assert shrink_to_best_member(aucs, w, 0.05) == 0  # the best member alone
    assert shrink_to_best_member(aucs, w, 0.0) == 2
    # never below the best member on validation, whatever the tolerance
    rng = np.random.default_rng(0)
    w3 = simplex_grid(3, 0.1)
    vertices = [i for i in range(len(w3)) if w3[i].max() == 1.0]
    for _ in range(200):
        a = rng.uniform(0.5, 0.9, len(w3))
        for tol in (0.0, 0.005, 0.02, 0.1):
            assert a[shrink_to_best_member(a, w3, tol)] >= max(a[v] for v in vertices)
