"""Per-fold Platt scaling from grid histograms, against a direct per-patient fit."""

from __future__ import annotations

import numpy as np
import pytest

from common.foldcalibration import IDENTITY, apply_platt, fit_platt, fit_platt_weighted, logit
from common.gridstats import ClassHistogram, ScoreGrid, auc


def _scores(rng: np.random.Generator, n: int, shift: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    z = rng.normal(0.0, 1.0, n) + 1.5 * y
    return y, 1.0 / (1.0 + np.exp(-(scale * z + shift)))


def test_histogram_fit_equals_the_per_patient_fit() -> None:
    rng = np.random.default_rng(0)
    y, p = _scores(rng, 400, -1.0, 0.4)
    h = ClassHistogram.from_scores(y, p, ScoreGrid(100000))
    targets = np.where(y == 1, (y.sum() + 1) / (y.sum() + 2), 1 / ((1 - y).sum() + 2))
    direct = fit_platt_weighted(logit(p), targets, np.ones_like(p))
    assert np.allclose(fit_platt(h), direct, atol=2e-3)


def test_two_folds_on_different_scales_pool_like_their_mean() -> None:
    """Folds with the same ranking quality but shifted scales: calibration restores the pooled AUC."""
    rng = np.random.default_rng(1)
    grid = ScoreGrid(10000)
    pooled_raw, pooled_cal, per_fold = [], [], []
    for shift, scale in ((-2.0, 0.5), (2.0, 1.5)):
        yv, pv = _scores(rng, 300, shift, scale)
        yt, pt = _scores(rng, 300, shift, scale)
        params = fit_platt(ClassHistogram.from_scores(yv, pv, grid))
        cal = apply_platt(pt, params)
        # monotone: the fold's own ranking is kept (up to which scores share a grid bin)
        assert np.array_equal(np.argsort(cal, kind="stable"), np.argsort(pt, kind="stable"))
        per_fold.append(auc(ClassHistogram.from_scores(yt, pt, grid)))
        pooled_raw.append((yt, pt))
        pooled_cal.append((yt, cal))
    y = np.concatenate([a for a, _ in pooled_raw])
    raw = auc(ClassHistogram.from_scores(y, np.concatenate([b for _, b in pooled_raw]), grid))
    cal = auc(ClassHistogram.from_scores(y, np.concatenate([b for _, b in pooled_cal]), grid))
    assert raw < np.mean(per_fold) - 0.05  # the problem
    assert abs(cal - np.mean(per_fold)) < 0.02  # fixed


def test_degenerate_folds_get_the_identity() -> None:
    grid = ScoreGrid(1000)
    assert fit_platt(ClassHistogram.from_scores([1, 1, 1], [0.2, 0.5, 0.9], grid)) == IDENTITY
    inverted = ClassHistogram.from_scores([0, 0, 0, 1, 1, 1], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], grid)
    assert fit_platt(inverted) == IDENTITY
    assert np.array_equal(apply_platt([0.0, 0.3, 1.0], IDENTITY), [0.0, 0.3, 1.0])


def test_hostile_calibration_parameters_are_refused() -> None:
    from common.foldcalibration import check_platt

    assert check_platt(None) == IDENTITY
    assert check_platt([1.5, -0.2]) == (1.5, -0.2)
    for bad in ([-1.0, 0.0], [0.0, 0.0], [1.0], [1.0, float("nan")], "1,0", [True, 0.0], [1.0, 2.0, 3.0]):
        with pytest.raises(ValueError, match="calibration"):
            check_platt(bad)


@pytest.mark.usefixtures("task_identity")
def test_a_folds_calibration_travels_as_a_predict_request_field_and_a_hostile_one_is_refused() -> None:
    import json

    from common.protocol import CONFIG, PREDICT, Header, PredictRequest, ProtocolError

    header = Header(experiment={"name": "t"}, run_id="r")
    w = np.zeros(4, dtype=np.float32)
    plain = PredictRequest(weights=w, model="densenet3d", fold=0, round=2, role="train")
    assert PREDICT.read_request(PREDICT.message(header, plain, dst=1))[1].platt is None  # absent: none
    req = PredictRequest(weights=w, model="densenet3d", fold=0, round=2, role="train", platt=(1.5, -0.25))
    msg = PREDICT.message(header, req, dst=1)
    assert PREDICT.read_request(msg)[1].platt == (1.5, -0.25)
    for bad in ([-1.5, 0.0], [1.0, float("inf")], "x", [1.0]):  # an inverting or malformed map
        msg.content.config_records[CONFIG]["platt"] = json.dumps(bad)
        with pytest.raises(ProtocolError, match="calibration"):
            PREDICT.read_request(msg)
