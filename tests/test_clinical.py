"""Operating points, per-centre results and their config: histogram paths against per-patient numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.clinical import auc_ci, clinical_summary, site_results
from common.config import ConfigError
from common.configfile import load_config
from common.delong import delong_ci
from common.gridstats import ClassHistogram, ScoreGrid
from common.metrics import binary_metrics
from common.threshold import ThresholdRule, parse_threshold, select_threshold

GRID = ScoreGrid(1000)


def _quantised(s: np.ndarray) -> np.ndarray:
    return GRID.index(s) / GRID.bins


def _data(rng: np.random.Generator, n: int, tied: bool) -> tuple[np.ndarray, np.ndarray]:
    y = (rng.random(n) < 0.35).astype(int)
    s = 1 / (1 + np.exp(-(1.2 * y - 0.6 + rng.normal(0, 1, n))))
    if tied:
        s = np.round(s * 6) / 6 * 0.9 + 0.05
    return y, s


@pytest.mark.parametrize("spec", ["0.3", 0.3, "youden", "sensitivity:0.9", "Specificity:0.8"])
def test_parse_threshold_accepts_the_documented_forms(spec: object) -> None:
    rule = parse_threshold(spec)
    assert rule.kind in ("fixed", "youden", "sensitivity", "specificity")


@pytest.mark.parametrize(
    "spec", [0, 1.0, -0.1, "youdn", "sensitivity:1.5", "sensitivity:", "specificity:x", True, [0.5], None]
)
def test_parse_threshold_rejects_bad_values(spec: object) -> None:
    with pytest.raises(ValueError):
        parse_threshold(spec)


def test_config_parses_the_rule_once_and_names_the_key() -> None:
    cfg = load_config("tiny", {"evaluation": {"threshold": "sensitivity:0.9"}})
    assert cfg.evaluation.threshold_rule == ThresholdRule("sensitivity", 0.9)
    assert cfg.evaluation.fixed_threshold == 0.5
    assert load_config("tiny", {"evaluation": {"threshold": 0.3}}).evaluation.fixed_threshold == 0.3
    with pytest.raises(ConfigError, match=r"evaluation\.threshold"):
        load_config("tiny", {"evaluation": {"threshold": "median"}})
    with pytest.raises(ConfigError, match="score grid"):
        load_config("tiny", {"evaluation": {"threshold": 0.12345}})
    with pytest.raises(ConfigError, match=r"evaluation\.calibration_bins"):
        load_config("tiny", {"evaluation": {"calibration_bins": 7}})  # does not divide the 1000-bin grid
    assert load_config("tiny", {"evaluation": {"cross_site": True}}).evaluation.cross_site
    with pytest.raises(ConfigError, match=r"evaluation\.cross_site"):
        load_config("tiny", {"evaluation": {"cross_site": True}, "federation": {"strategy": "fedbn"}})


def _per_patient_rates(y: np.ndarray, s: np.ndarray, t: float) -> tuple[float, float]:
    m = binary_metrics(y, s, t)
    return m.sensitivity, m.specificity


@pytest.mark.parametrize("tied", [False, True])
def test_youden_threshold_reaches_the_per_patient_maximum(tied: bool) -> None:
    y, s = _data(np.random.default_rng(2 + tied), 300, tied)
    sq = _quantised(s)
    got = select_threshold(ClassHistogram.from_scores(y, s, GRID), parse_threshold("youden"))
    # brute force over every distinct quantised score as a threshold, per patient
    best = max(sum(_per_patient_rates(y, sq, float(t))) - 1 for t in np.unique(sq) if 0 < t < 1)
    sens, spec = _per_patient_rates(y, sq, got["threshold"])
    assert sens + spec - 1 == pytest.approx(best, abs=1e-12)
    assert got["basis"]["sensitivity"] == pytest.approx(sens) and got["basis"][
        "specificity"
    ] == pytest.approx(spec)
    assert got["basis"]["n"] == 300


@pytest.mark.parametrize("tied", [False, True])
def test_sensitivity_and_specificity_targets_are_met_with_the_best_other_rate(tied: bool) -> None:
    y, s = _data(np.random.default_rng(7 + tied), 400, tied)
    sq = _quantised(s)
    h = ClassHistogram.from_scores(y, s, GRID)
    cands = [float(t) for t in np.unique(np.concatenate([sq, [0.001]])) if 0 < t < 1]
    got = select_threshold(h, parse_threshold("sensitivity:0.9"))
    sens, spec = _per_patient_rates(y, sq, got["threshold"])
    assert sens >= 0.9
    assert spec == pytest.approx(
        max(sp for se, sp in (_per_patient_rates(y, sq, t) for t in cands) if se >= 0.9)
    )
    got = select_threshold(h, parse_threshold("specificity:0.8"))
    sens, spec = _per_patient_rates(y, sq, got["threshold"])
    assert spec >= 0.8
    assert sens == pytest.approx(
        max(se for se, sp in (_per_patient_rates(y, sq, t) for t in cands) if sp >= 0.8)
    )


def test_a_rule_without_both_classes_falls_back_to_one_half_and_says_so() -> None:
    h = ClassHistogram.from_scores(np.zeros(6, int), np.linspace(0.1, 0.9, 6), GRID)
    got = select_threshold(h, parse_threshold("youden"))
    assert got["threshold"] == 0.5 and "fallback" in got["basis"]
    empty = select_threshold(ClassHistogram.zeros(GRID.bins), parse_threshold("sensitivity:0.9"))
    assert empty["threshold"] == 0.5 and empty["basis"]["n"] == 0


@pytest.mark.parametrize("tied", [False, True])
def test_auc_ci_from_one_histogram_equals_delong_on_quantised_scores(tied: bool) -> None:
    y, s = _data(np.random.default_rng(11 + tied), 250, tied)
    got = auc_ci(ClassHistogram.from_scores(y, s, GRID))
    ref = delong_ci(y, _quantised(s))
    assert got.auc == pytest.approx(ref.auc, abs=1e-12)
    assert got.var == pytest.approx(ref.var, rel=1e-9)
    assert got.ci == pytest.approx(ref.ci, abs=1e-9)


def test_site_results_equal_each_sites_per_patient_metrics_with_one_class_and_empty_sites() -> None:
    rng = np.random.default_rng(4)
    y, s = _data(rng, 180, False)
    parts = {"a": np.arange(0, 90), "b": np.arange(90, 180)}
    hists = {
        site: {
            "model": {
                "fold0": ClassHistogram.from_scores(y[i[::2]], s[i[::2]], GRID),
                "fold1": ClassHistogram.from_scores(y[i[1::2]], s[i[1::2]], GRID),
            }
        }
        for site, i in parts.items()
    }
    neg = np.flatnonzero(y == 0)[:9]
    hists["one_class"] = {"model": {"external": ClassHistogram.from_scores(y[neg], s[neg], GRID)}}
    hists["empty"] = {"model": {"external": ClassHistogram.zeros(GRID.bins)}}
    out = site_results(hists, {"model": 0.4})
    for site, i in parts.items():
        m = out[site]["model"]["internal"]
        ref = binary_metrics(y[i], _quantised(s[i]), 0.4)
        for key in ("auc", "sensitivity", "specificity", "ppv", "npv"):
            assert m[key] == pytest.approx(getattr(ref, key), abs=1e-12), key
        assert m["ppv"] == pytest.approx(ref.precision)
        assert m["auc_ci"] == pytest.approx(list(delong_ci(y[i], _quantised(s[i])).ci), abs=1e-9)
        assert m["threshold"] == 0.4 and m["n"] == i.size
    one = out["one_class"]["model"]["external"]
    assert one["auc"] is None and one["auc_ci"] == [None, None] and one["sensitivity"] is None
    assert one["specificity"] == pytest.approx(binary_metrics(y[neg], s[neg], 0.4).specificity)
    empty = out["empty"]["model"]["external"]
    assert empty["n"] == 0 and empty["auc"] is None and empty["npv"] is None


def test_clinical_summary_has_every_part_for_every_score() -> None:
    rng = np.random.default_rng(9)
    y, s = _data(rng, 200, False)
    h = lambda idx: ClassHistogram.from_scores(y[idx], s[idx], GRID)  # noqa: E731
    final = {
        "model": {
            "fold0": h(np.arange(0, 60)),
            "val0": h(np.arange(60, 120)),
            "external": h(np.arange(120, 200)),
        }
    }
    out = clinical_summary(final, {"x": final}, "youden", 10)
    assert out["threshold_rule"] == "youden" and out["calibration_bins"] == 10
    t = out["thresholds"]["model"]
    assert t["basis"]["n"] == 60  # chosen on the validation patients only
    assert set(out["calibration"]["model"]) == {"internal", "external"}
    assert out["calibration"]["model"]["internal"]["n"] == 60
    assert out["centres"]["x"]["model"]["external"]["threshold"] == t["threshold"]
    assert out["pooled_auc_ci"]["model"]["external"]["auc"] == pytest.approx(
        delong_ci(y[120:], _quantised(s[120:])).auc
    )
    assert not math.isnan(out["calibration"]["model"]["external"]["slope"])
