"""A whole plan in process: the summary's clinical statistics against the patients the test can see.

The sites' per-patient predictions stay in their folders (simulation); the
test reads them and recomputes every new figure of ``summary.json``
per patient: per-centre AUCs with DeLong CIs, the operating threshold chosen
on validation, calibration, and the multi-reader (Obuchowski-Rockette) analysis.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.supercore.task_identity import TaskIdentity

from common.calibration import calibration
from common.config import SiteConfig, with_sites
from common.configfile import load_config
from common.delong import delong_ci
from common.gridstats import ClassHistogram, ScoreGrid
from common.metrics import binary_metrics
from common.mrmc import delong_cov, or_analysis
from common.report import render_report
from common.sitedata import read_reader_study, score_to_probability
from server.runner import PlanRunner

from .inprocess import InProcessGrid

SITES = ("centre1", "centre2", "centre3")


@pytest.fixture(scope="module")
def run(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = load_config(
        "tiny",
        {
            "plan": "study",
            "run_folds": [0, 1],
            "models": {"densenet2d": {"enabled": False}},
            "train": {"rounds": 1},
            "federation": {"round_timeout_s": 60.0},
            "evaluation": {"threshold": "youden", "calibration_bins": 5, "cross_site": True},
        },
    )
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    out = tmp_path_factory.mktemp("clinical-run")
    grid = InProcessGrid({s: tiny_cohort / s for s in SITES}, out / "sites")
    with pytest.MonkeyPatch.context() as mp:  # what conftest's task_identity sets, for the whole module
        for key in ("_run_id", "_node_id", "_task_id"):
            mp.setattr(TaskIdentity, key, 1)
        summary = PlanRunner(grid, cfg, out / "run", "c1").run(expected_sites=3, wait_s=1)
    return {
        "summary": summary,
        "cfg": cfg,
        "sites": out / "sites",
        "run": out / "run",
        "cohort": tiny_cohort,
        "grid": grid,
    }


def _predictions(run: dict[str, Any], site: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One site's labels and 3D probabilities: test/val patients of both folds, or external (fold mean)."""
    per_fold = []
    for k in (0, 1):
        with (run["sites"] / site / "c1" / "predictions" / f"densenet3d_fold{k}.csv").open() as fh:
            rows = [r for r in csv.DictReader(fh) if r["split"] == split]
        per_fold.append(
            (
                [r["patient_id"] for r in rows],
                [int(r["label"]) for r in rows],
                [float(r["probability"]) for r in rows],
            )
        )
    if split == "external":
        assert per_fold[0][0] == per_fold[1][0]
        return np.array(per_fold[0][1]), np.mean([f[2] for f in per_fold], axis=0)
    return np.array(per_fold[0][1] + per_fold[1][1]), np.array(per_fold[0][2] + per_fold[1][2])


def _q(s: np.ndarray, bins: int) -> np.ndarray:
    return ScoreGrid(bins).index(s) / bins


def test_per_centre_aucs_and_cis_equal_each_sites_patients(run: dict[str, Any]) -> None:
    s, bins = run["summary"], run["cfg"].evaluation.grid_bins
    thr = s["thresholds"]["densenet3d"]["threshold"]
    for site, split, subset in (
        ("centre1", "test", "internal"),
        ("centre2", "external", "external"),
        ("centre3", "external", "external"),
    ):
        y, p = _predictions(run, site, split)
        got = s["centres"][site]["densenet3d"][subset]
        ref = delong_ci(y, _q(p, bins))
        assert got["auc"] == pytest.approx(ref.auc, abs=1e-12)
        assert got["auc_ci"] == pytest.approx(list(ref.ci), abs=1e-9)
        m = binary_metrics(y, p, thr)
        for key in ("sensitivity", "specificity", "ppv", "npv"):
            assert got[key] == pytest.approx(getattr(m, key), abs=1e-12) or (
                got[key] is None and np.isnan(getattr(m, key))
            )
        assert got["n"] == y.size
    assert "radiologist" in s["centres"]["centre2"] and "ensemble_3d_radiologist" in s["centres"]["centre2"]


def test_threshold_is_chosen_on_validation_and_applied_to_the_tests(run: dict[str, Any]) -> None:
    s, bins = run["summary"], run["cfg"].evaluation.grid_bins
    y, p = _predictions(run, "centre1", "val")
    t = s["thresholds"]["densenet3d"]
    assert t["rule"] == "youden" and t["basis"]["n"] == y.size
    pq = _q(p, bins)
    best = max(
        binary_metrics(y, pq, float(c)).sensitivity + binary_metrics(y, pq, float(c)).specificity - 1
        for c in np.unique(pq)
        if 0 < c < 1
    )
    chosen = binary_metrics(y, pq, t["threshold"])
    assert chosen.sensitivity + chosen.specificity - 1 == pytest.approx(best, abs=1e-12)
    ext = [_predictions(run, site, "external") for site in ("centre2", "centre3")]
    ye, pe = np.concatenate([e[0] for e in ext]), np.concatenate([e[1] for e in ext])
    pooled = s["models"]["densenet3d"]["external"]["pooled"]
    assert pooled["threshold"] == t["threshold"]
    ref = binary_metrics(ye, pe, t["threshold"])
    assert pooled["confusion_matrix"] == [list(r) for r in ref.confusion_matrix]
    assert pooled["npv"] == pytest.approx(ref.npv) and pooled["ppv"] == pytest.approx(ref.precision)


def test_calibration_of_every_score_and_the_configured_groups(run: dict[str, Any]) -> None:
    s, bins = run["summary"], run["cfg"].evaluation.grid_bins
    assert s["calibration_bins"] == 5
    assert set(s["calibration"]) == set(s["models"])
    ext = [_predictions(run, site, "external") for site in ("centre2", "centre3")]
    ye, pe = np.concatenate([e[0] for e in ext]), np.concatenate([e[1] for e in ext])
    ref = calibration(ClassHistogram.from_scores(ye, pe, ScoreGrid(bins)), 5).to_dict()
    got = s["calibration"]["densenet3d"]["external"]
    assert got["n"] == ye.size == ref["n"]
    assert got["brier"] == pytest.approx(float(np.mean((pe - ye) ** 2)), abs=1e-12)
    assert got["hosmer_lemeshow"]["groups"] <= 5
    for key in ("slope", "intercept"):
        assert got[key] == ref[key] or got[key] == pytest.approx(ref[key], abs=1e-9)


def test_multi_reader_analysis_equals_the_per_patient_or_analysis(run: dict[str, Any]) -> None:
    s, cfg = run["summary"], run["cfg"]
    mrmc = s["reader_study"]["mrmc"]
    mapping, bins = cfg.evaluation.score_mapping, cfg.evaluation.grid_bins
    labels: dict[str, int] = {}
    rows = []
    for site in SITES:
        with (run["cohort"] / site / "manifest.csv").open() as fh:
            labels.update({r["patient_id"]: int(r["label"]) for r in csv.DictReader(fh)})
        rows += read_reader_study(run["cohort"] / site)
    for group in ("junior", "mid", "senior", "all"):
        mine = [r for r in rows if group == "all" or r.tier == group]
        readers = sorted({r.reader for r in mine})
        cases = sorted({r.patient_id for r in mine})
        by = {(r.patient_id, r.reader): r for r in mine}
        y = np.array([labels[c] for c in cases])
        scores = [
            [score_to_probability(getattr(by[(c, rd)], f"score_{session}"), mapping) for c in cases]
            for session in ("without_ai", "with_ai")
            for rd in readers
        ]
        auc, cov = delong_cov(y, _q(np.array(scores), bins))
        ref = or_analysis(auc.reshape(2, len(readers)), cov, readers=readers)
        got = mrmc[group]
        assert got["patients"] == len(cases) == 60 and got["readers"] == readers
        assert got["method"] == "RRRC"
        assert got["p"] == pytest.approx(ref.p, rel=1e-6, abs=1e-12)
        assert got["F"] == pytest.approx(ref.f, rel=1e-6)
        assert got["df2"] == pytest.approx(ref.df2, rel=1e-6)
        assert got["difference"]["se"] == pytest.approx(ref.se_diff, rel=1e-6)
        assert got["reader_auc"][readers[0]]["with_ai"] == pytest.approx(ref.auc[1, 0], abs=1e-12)
    # the pooled-readings DeLong stays, labelled descriptive
    assert s["reader_study"]["junior"]["pooled_readings_delong"]["descriptive"] is True


def test_report_shows_forest_plot_threshold_and_table3_with_or_p(run: dict[str, Any]) -> None:
    html = render_report(run["run"]).read_text()
    folder = run["run"] / "report"
    assert (folder / "forest_centres.png").is_file() and (folder / "cross_site_heatmap.png").is_file()
    assert "Threshold rule (evaluation.threshold): youden" in html
    with (folder / "table3_reader_study.csv").open() as fh:
        t3 = list(csv.DictReader(fh))
    assert {"patients", "readers", "or_p"} <= set(t3[0])
    junior_with = next(r for r in t3 if r["tier"] == "junior" and r["session"] == "with AI")
    assert int(junior_with["patients"]) == 60 and int(junior_with["readers"]) == 2
    assert float(junior_with["or_p"]) == pytest.approx(run["summary"]["reader_study"]["mrmc"]["junior"]["p"])
    for name in ("operating_points", "calibration_stats", "centres", "table3_mrmc", "cross_site_auc"):
        assert (folder / f"{name}.csv").is_file(), name
    assert "Calibration curves" in html and "in 5 equal-width bins" in html


def test_cross_site_matrix_holds_the_global_and_the_local_models_at_every_site(run: dict[str, Any]) -> None:
    cs, bins = run["summary"]["cross_site"], run["cfg"].evaluation.grid_bins
    assert cs["model"] == "densenet3d" and cs["sites"] == list(SITES)
    assert cs["models"] == ["global", "local:centre1"]  # the study plan trains at centre1 only
    # the global model at each site: the same patients and probabilities as the run's own predictions
    # (external: the two fold models averaged, each patient once)
    for site, split in (("centre1", "test"), ("centre2", "external"), ("centre3", "external")):
        y, p = _predictions(run, site, split)
        cell = cs["matrix"]["global"][site]
        assert cell["n"] == y.size
        assert cell["auc"] == pytest.approx(delong_ci(y, _q(p, bins)).auc, abs=1e-12)
        assert cell["auc_ci"] == pytest.approx(list(delong_ci(y, _q(p, bins)).ci), abs=1e-9)
        assert cs["matrix"]["local:centre1"][site]["n"] == y.size  # each patient once
    # local-only training went to centre1 alone (two trainings: the federation's and the local one)
    grid = run["grid"]
    assert grid.calls[("centre1", "train")] == 4  # two folds, federated and local-only
    assert grid.calls[("centre2", "train")] == grid.calls[("centre3", "train")] == 0
    assert (run["sites"] / "centre1" / "c1-local-centre1" / "splits.json").is_file()


def test_every_honest_reply_passes_the_reply_checks(run: dict[str, Any]) -> None:
    """Validation subsets, per-reader histograms and cross-site replies of honest sites are all accepted."""
    assert run["summary"]["rejected_replies"] == {}
    assert run["summary"]["reader_study"]["mrmc"]
