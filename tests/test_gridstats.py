"""Federated metrics from summed grid histograms equal the metrics of the pooled patients."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from sklearn import calibration as skc
from sklearn import metrics as skm

from common.disclosure import add_noise, suppress_small_cells
from common.gridstats import (
    ClassHistogram,
    ScoreGrid,
    auc,
    auc_bound,
    brier,
    calibration_curve,
    confusion_matrix,
    net_benefit,
    pooled_metrics,
    roc_curve,
)
from common.metrics import binary_metrics

GRID = ScoreGrid(10000)
# Thresholds that are themselves patients' scores below (edge cases of ">=").
EXACT_SCORES = (0.0, 0.0029, 0.05, 0.07, 0.29, 0.5, 0.75, 1.0)
THRESHOLDS = (0.0, 0.0029, 0.05, 0.07, 0.1, 0.29, 0.3, 0.5, 0.75, 0.9, 0.99)

Site = tuple[np.ndarray, np.ndarray]


def _site(rng: np.random.Generator, n: int, pos_rate: float) -> Site:
    y = (rng.random(n) < pos_rate).astype(int)
    s = 1.0 / (1.0 + np.exp(-rng.normal(1.2 * y - 0.6, 1.0)))
    return y, s


@pytest.fixture(scope="module")
def sites() -> list[Site]:
    """Three unequal sites (40 pts 30% malignant, 150 pts 75%, 25 pts 60%), some scores on grid edges."""
    rng = np.random.default_rng(2024)
    out = [_site(rng, 40, 0.30), _site(rng, 150, 0.75), _site(rng, 25, 0.60)]
    y, s = out[1]
    s[: 2 * len(EXACT_SCORES)] = np.repeat(EXACT_SCORES, 2)  # each on a benign and a malignant patient
    y[: 2 * len(EXACT_SCORES)] = np.tile([0, 1], len(EXACT_SCORES))
    return out


def _pool(sites: list[Site]) -> Site:
    return np.concatenate([y for y, _ in sites]), np.concatenate([s for _, s in sites])


def _federate(sites: list[Site], grid: ScoreGrid = GRID) -> ClassHistogram:
    return ClassHistogram.aggregate(ClassHistogram.from_scores(y, s, grid) for y, s in sites)


def test_index_uses_exact_edges() -> None:
    # floor(s * bins) misplaces 573 of the 10000 edges (0.0029 * 10000 = 28.999...); the bin must
    # agree with s >= edge, as it does when compared with the edges themselves.
    assert math.floor(0.0029 * 10000) == 28 and math.floor(0.29 * 100) == 28
    assert GRID.index([0.0029, 0.0, 1.0, 0.99995, 0.5]).tolist() == [29, 0, 9999, 9999, 5000]
    assert ScoreGrid(100).index([0.29, 0.57, 0.58]).tolist() == [29, 57, 58]
    assert GRID.threshold_index(0.0029) == 29
    assert GRID.threshold_index(0.1 + 0.2) == 3000  # 0.30000000000000004 snaps to the edge
    mids = GRID.midpoints()
    assert np.array_equal(GRID.index(mids), np.arange(GRID.bins))


def test_threshold_must_lie_on_grid() -> None:
    h = ClassHistogram.from_scores([0, 1], [0.2, 0.8], ScoreGrid(100))
    with pytest.raises(ValueError, match="not on the 100-bin score grid"):
        confusion_matrix(h, 0.505)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\)"):
        pooled_metrics(h, 1.0)
    with pytest.raises(ValueError, match="score at position 1"):
        ClassHistogram.from_scores([0, 1], [0.2, 1.2], ScoreGrid(100))


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_threshold_metrics_and_brier_are_exact(sites: list[Site], threshold: float) -> None:
    y, s = _pool(sites)
    fed = pooled_metrics(_federate(sites), threshold)
    ref = binary_metrics(y, s, threshold)
    pred = (s >= threshold).astype(int)
    assert np.array_equal(np.array(fed.confusion_matrix), skm.confusion_matrix(y, pred, labels=[0, 1]))
    for key in ("precision", "recall", "sensitivity", "specificity", "f1", "accuracy"):
        assert getattr(fed, key) == getattr(ref, key) or (
            math.isnan(getattr(fed, key)) and math.isnan(getattr(ref, key))
        ), key
    assert fed.f1 == pytest.approx(skm.f1_score(y, pred, zero_division=np.nan), abs=1e-12, nan_ok=True)
    assert fed.brier == pytest.approx(skm.brier_score_loss(y, s), rel=1e-12)
    assert (fed.n, fed.n_pos) == (len(y), int(y.sum()))


@pytest.mark.parametrize("bins", [20, 100, 10000])
def test_auc_within_stated_bound(sites: list[Site], bins: int) -> None:
    y, s = _pool(sites)
    h = _federate(sites, ScoreGrid(bins))
    exact = skm.roc_auc_score(y, s)
    assert abs(auc(h) - exact) <= auc_bound(h) + 1e-15
    if bins == 20:
        assert auc(h) != exact  # coarse enough for the grid to matter, so the bound is exercised


@pytest.mark.parametrize("bins", [20, 10000])
def test_auc_exact_on_prequantised_scores(sites: list[Site], bins: int) -> None:
    grid = ScoreGrid(bins)
    quantised = [(y, grid.quantise(s)) for y, s in sites]
    y, sq = _pool(quantised)
    h = _federate(quantised, grid)
    assert np.array_equal(h.pos, _federate(sites, grid).pos)  # quantising keeps every bin
    assert auc(h) == pytest.approx(skm.roc_auc_score(y, sq), abs=1e-12)


def test_auc_bound_is_attained() -> None:
    # Every positive just above every negative, all in one bin: exact AUC 1, grid AUC 1/2.
    h = ClassHistogram.from_scores([0, 0, 1, 1], [0.50, 0.501, 0.502, 0.503], ScoreGrid(10))
    assert auc(h) == 0.5 and auc_bound(h) == 0.5
    assert skm.roc_auc_score([0, 0, 1, 1], [0.50, 0.501, 0.502, 0.503]) - auc(h) == auc_bound(h)


def test_roc_curve_matches_sklearn_on_lower_edges(sites: list[Site]) -> None:
    y, s = _pool(sites)
    h = _federate(sites)
    lower = GRID.edges()[GRID.index(s)]
    fpr, tpr, thr = roc_curve(h)
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(y, lower, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-15)
    np.testing.assert_array_equal(thr[1:], ref_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc(h), abs=1e-12)


def test_calibration_bins_match_sklearn(sites: list[Site]) -> None:
    # scikit-learn puts a score on a coarse boundary in the lower bin, the grid in the upper;
    # move such scores off the boundaries, as the documented condition requires.
    moved = [
        (y, np.where(np.isclose(s * 10, np.round(s * 10)), np.clip(s + 1e-4, 0, 0.9999), s)) for y, s in sites
    ]
    y, s = _pool(moved)
    mean_pred, observed, counts = calibration_curve(_federate(moved), n_bins=10)
    ref_true, ref_pred = skc.calibration_curve(y, s, n_bins=10, strategy="uniform")
    full = counts > 0
    np.testing.assert_allclose(mean_pred[full], ref_pred, rtol=1e-12)
    np.testing.assert_allclose(observed[full], ref_true, rtol=1e-12)
    assert counts.sum() == len(y)
    assert np.isnan(mean_pred[~full]).all()
    with pytest.raises(ValueError, match="must divide"):
        calibration_curve(_federate(moved), n_bins=7)


def _dcurves_net_benefit(y: np.ndarray, risk: np.ndarray, pt: float) -> float:
    """dcurves' definition on per-patient data: risk >= pt is treated."""
    treated = risk >= pt
    n = len(y)
    tp = np.sum(treated & (y == 1))
    fp = np.sum(treated & (y == 0))
    return tp / n - fp / n * pt / (1 - pt)


def test_net_benefit_matches_per_patient_formula(sites: list[Site]) -> None:
    y, s = _pool(sites)
    nb = net_benefit(_federate(sites), THRESHOLDS)
    for i, pt in enumerate(THRESHOLDS):
        assert nb["model"][i] == pytest.approx(_dcurves_net_benefit(y, s, pt), abs=1e-14), pt
        assert nb["treat_all"][i] == pytest.approx(_dcurves_net_benefit(y, np.ones_like(s), pt), abs=1e-14)
    assert np.all(nb["treat_none"] == 0)
    # Thresholds equal to patients' scores must count those patients as treated.
    i = THRESHOLDS.index(0.29)
    assert nb["model"][i] != pytest.approx(_dcurves_net_benefit(y, s, np.nextafter(0.29, 1)), abs=1e-14)


def test_arrays_round_trip_and_have_grid_length(sites: list[Site]) -> None:
    h = _federate(sites)
    arrays = h.to_arrays()
    assert set(arrays) == {"neg", "pos", "neg_sum", "pos_sum", "neg_sq", "pos_sq"}
    assert all(a.shape == (GRID.bins,) for a in arrays.values())
    back = ClassHistogram.from_arrays(arrays)
    assert pooled_metrics(back) == pooled_metrics(h)
    counts_only = ClassHistogram.from_arrays(h.to_arrays(include_sums=False))
    assert auc(counts_only) == auc(h) and math.isnan(brier(counts_only))
    with pytest.raises(ValueError, match="lacks"):
        ClassHistogram.from_arrays({"neg": arrays["neg"]})


def test_histograms_are_immutable_and_grids_must_match(sites: list[Site]) -> None:
    h = _federate(sites)
    with pytest.raises(ValueError):
        h.pos[0] = 5
    with pytest.raises(ValueError, match="different grids"):
        _ = h + ClassHistogram.zeros(100)
    with pytest.raises(ValueError, match="non-negative integers"):
        ClassHistogram(3, np.array([1, -1, 0]), *np.zeros((5, 3)))


def test_empty_class_and_empty_site_do_not_crash(sites: list[Site]) -> None:
    only_benign = ClassHistogram.from_scores([0, 0], [0.2, 0.7], GRID)
    m = pooled_metrics(only_benign)
    assert math.isnan(m.auc) and math.isnan(auc_bound(only_benign)) and m.confusion_matrix == ((1, 1), (0, 0))
    empty = ClassHistogram.from_scores(np.array([], dtype=int), np.array([]), GRID)
    assert empty.n == 0 and math.isnan(pooled_metrics(empty).accuracy) and math.isnan(brier(empty))
    assert np.isnan(net_benefit(empty, [0.5])["model"]).all()
    h = _federate(sites)
    assert pooled_metrics(h + empty) == pooled_metrics(h)


def test_candidate_search_is_fast() -> None:
    rng = np.random.default_rng(0)
    hists = [ClassHistogram.from_scores(*_site(rng, 200, 0.6), GRID) for _ in range(231)]
    start = time.perf_counter()
    for h in hists:
        pooled_metrics(h)
    assert time.perf_counter() - start < 2.0  # O(bins) each: ~1 ms on a busy 2-core machine


def test_suppress_small_cells_keeps_totals_and_releases_no_small_class_cell(sites: list[Site]) -> None:
    h = ClassHistogram.from_scores(*sites[1], GRID)
    k = 5
    s = suppress_small_cells(h, k)
    assert (s.n_neg, s.n_pos) == (h.n_neg, h.n_pos)
    for counts in (s.neg, s.pos):  # per class: no released cell stands for 1..k-1 patients of a class
        assert not np.any((counts > 0) & (counts < k))
    # sums carry nothing beyond the counts: count x the released bin's midpoint
    np.testing.assert_allclose(s.neg_sum, s.neg * GRID.midpoints())
    np.testing.assert_allclose(s.pos_sq, s.pos * GRID.midpoints() ** 2)
    assert brier(s) == pytest.approx(brier(h), abs=0.05)  # now a grid approximation
    # blocks keep their order; only pairs inside a block become ties: the change is bounded
    assert abs(auc(s) - auc(h)) <= auc_bound(s) + 1e-12
    assert suppress_small_cells(h, 1) is h
    # fewer than k patients in all: one cell at the grid's centre, both classes in it (no score located)
    tiny = suppress_small_cells(ClassHistogram.from_scores([1, 1, 0, 0], [0.2, 0.4, 0.1, 0.5], GRID), 5)
    at = GRID.index(0.5)
    assert tiny.pos[at] == 2 and tiny.neg[at] == 2 and auc(tiny) == 0.5
    lone = suppress_small_cells(ClassHistogram.from_scores([1], [0.8123], GRID), 3)
    assert lone.pos[GRID.index(0.5)] == 1 and lone.n == 1


def test_suppression_never_releases_a_lone_patients_score() -> None:
    """Finding 6: k = 3 once released a merged cell with one benign patient and its exact score in neg_sum."""
    y = [1, 1, 1, 0, 1, 1, 1, 0, 0, 0]
    s = [0.40, 0.405, 0.41, 0.4123, 0.42, 0.43, 0.44, 0.10, 0.11, 0.12]
    h = ClassHistogram.from_scores(y, s, GRID)
    r = suppress_small_cells(h, 3)
    for counts in (r.neg, r.pos):
        assert not np.any((counts > 0) & (counts < 3))
    released = np.concatenate([r.neg_sum, r.pos_sum, r.neg_sq, r.pos_sq])
    for score in s:  # no released number is a patient's score (or its square)
        assert not np.any(np.isclose(released, score, rtol=0, atol=1e-12))
        assert not np.any(np.isclose(released, score**2, rtol=0, atol=1e-12))
    assert (r.n_neg, r.n_pos) == (4, 6)
    # a class with fewer than k patients in all: one cell holds everyone
    few = suppress_small_cells(
        ClassHistogram.from_scores([0, 0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4, 0.9], GRID), 3
    )
    assert np.count_nonzero(few.neg + few.pos) == 1


def test_suppression_changes_auc_within_its_stated_bound_on_small_folds() -> None:
    """Many small sites/folds (the case where a per-class rule inflated the AUC)."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        y = rng.integers(0, 2, size=12)
        s = np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.2, size=12), 0, 1)
        h = ClassHistogram.from_scores(y, s, GRID)
        if h.n_neg and h.n_pos:
            s = suppress_small_cells(h, 4)
            assert abs(auc(s) - auc(h)) <= auc_bound(s) + 1e-12


def test_add_noise_releases_only_noisy_counts() -> None:
    grid = ScoreGrid(100)
    h = ClassHistogram.from_scores([0, 1, 1], [0.123, 0.456, 0.789], grid)
    assert add_noise(h, 0.0, np.random.default_rng(0)) is h
    noisy = add_noise(h, 1.0, np.random.default_rng(0))
    assert noisy.neg.dtype == np.int64 and (noisy.neg >= 0).all() and (noisy.pos >= 0).all()
    np.testing.assert_allclose(noisy.pos_sum, noisy.pos * grid.midpoints())
    # Expected phantom patients on B bins at scale b: B e^(-1/(2b)) / (1 - e^(-1/b)) (~96 here).
    draws = [add_noise(h, 1.0, np.random.default_rng(seed)).n - h.n for seed in range(20)]
    expected = 100 * math.exp(-0.5) / (1 - math.exp(-1.0))
    assert np.mean(draws) == pytest.approx(expected, rel=0.1)
    with pytest.raises(ValueError, match="noise scale"):
        add_noise(h, -1.0, np.random.default_rng(0))
