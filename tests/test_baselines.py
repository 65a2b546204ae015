"""Pooled and local-only baselines: same folds as the federation, every test patient scored once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.config import SiteConfig, with_sites
from common.configfile import load_config
from common.dataset import preprocess_site
from simulation.baselines import run_baselines

SITES = ("centre1", "centre2", "centre3")


def _cfg(cohort: Path, **overrides: object):  # type: ignore[no-untyped-def]
    cfg = load_config("tiny", {"models": {"densenet2d": {"enabled": False}}, **overrides})
    return with_sites(cfg, tuple(SiteConfig(name=s, data_dir=str(cohort / s)) for s in SITES))


def test_local_only_models_are_scored_over_all_sites(tiny_cohort: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_cohort)
    out = run_baselines(cfg, tmp_path / "cache", models=["radiomics"])
    sizes = {s: len(preprocess_site(tiny_cohort / s, cfg.preprocess, tmp_path / "cache", site=s).labels) for s in SITES}
    local = {s: out["local"][s]["radiomics"]["internal"]["pooled"] for s in SITES}
    assert {s: m["n"] for s, m in local.items()} == sizes  # every patient is a test patient once (all folds)
    everywhere = out["local_pooled"]["radiomics"]["internal"]["pooled"]
    assert everywhere["n"] == sum(sizes.values()) == out["pooled"]["radiomics"]["internal"]["pooled"]["n"]
    assert everywhere["n_pos"] == sum(m["n_pos"] for m in local.values())
    # one AUC over all sites' patients is not the mean of the per-site AUCs
    assert out["local_mean"]["radiomics"]["internal_auc"] == pytest.approx(np.mean([m["auc"] for m in local.values()]))


def test_deep_baseline_reports_the_selected_models_validation_figures(tiny_cohort: Path, tmp_path: Path) -> None:
    cfg = _cfg(tiny_cohort, run_folds=[0], train={"rounds": 2})
    out = run_baselines(cfg, tmp_path / "cache", local=False, models=["densenet3d"])
    entry = out["pooled"]["densenet3d"]
    (sel,) = entry["selection"]
    assert sel["best_epoch"] in (1, 2) and len(sel["val_aucs"]) == 2
    (val,) = entry["validation"]["folds"]
    assert val["auc"] == pytest.approx(max(sel["val_aucs"]), abs=1e-4)  # the kept epoch is the best one
    assert val["n"] > 0 and np.sum(val["confusion_matrix"]) == val["n"]


def test_the_pooled_baseline_trains_each_network_for_its_own_rounds(tiny_cohort: Path, tmp_path: Path) -> None:
    """As the federation (``ExperimentConfig.for_model``): epochs and the selection window per network."""
    models = {"densenet2d": {"enabled": False}, "densenet3d": {"rounds": 3, "select_from_round": 2}}
    cfg = _cfg(tiny_cohort, run_folds=[0], train={"rounds": 1}, models=models)
    out = run_baselines(cfg, tmp_path / "cache", local=False, models=["densenet3d"])
    (sel,) = out["pooled"]["densenet3d"]["selection"]
    assert len(sel["val_aucs"]) == 3 and sel["val_aucs"][0] is None  # epoch 1 does not compete
    assert sel["best_epoch"] in (2, 3)
