"""The plan with the training recipe's options on: mask channel, per-fold calibration, flip averaging."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import SiteConfig, with_sites
from common.configfile import load_config
from common.foldcalibration import IDENTITY
from server.runner import PlanRunner

from .inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")
SITES = ("centre1", "centre2", "centre3")


def test_study_plan_with_the_recipe_calibrates_each_fold(tiny_cohort: Path, tmp_path: Path) -> None:
    overrides = {
        "plan": "study",
        "run_folds": [0],
        "preprocess": {"mask_channel": True, "d3": {"crop": "bbox"}},
        "models": {"densenet2d": {"enabled": False}},
        "train": {"rounds": 1},
        "federation": {"round_timeout_s": 60.0},
        "evaluation": {"calibrate_folds": True, "tta_flip": True, "ensemble_tolerance": 0.01},
    }
    cfg = with_sites(load_config("tiny", overrides), tuple(SiteConfig(name=s) for s in SITES))
    grid = InProcessGrid({s: tiny_cohort / s for s in SITES}, tmp_path / "sites")
    summary = PlanRunner(grid, cfg, tmp_path / "run", "r1").run(expected_sites=3, wait_s=1)
    selected = summary["selection"]["densenet3d"]["0"]
    a, b = selected["platt"]
    assert a > 0 and (a, b) != IDENTITY
    assert summary["models"]["densenet3d"]["external"]["pooled"]["n"] == 40
    rows = (
        (tmp_path / "sites" / "centre2" / "r1" / "predictions" / "densenet3d_fold0.csv")
        .read_text()
        .splitlines()
    )
    assert len(rows) == 1 + 20


def test_a_guarded_fold_is_left_out_of_the_external_average(
    tiny_cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard acts at selection (server/training.py): a flagged fold never reaches the external sites."""
    import server.training

    verdicts = iter([None, "inverted on validation (forced)"])  # the real rule flags by AUC: force fold 1
    monkeypatch.setattr(server.training, "selection_problem", lambda val_auc: next(verdicts))
    overrides = {
        "plan": "study",
        "run_folds": [0, 1],
        "models": {"densenet2d": {"enabled": False}},
        "train": {"rounds": 1},
        "federation": {"round_timeout_s": 60.0},
    }
    cfg = with_sites(load_config("tiny", overrides), tuple(SiteConfig(name=s) for s in SITES))
    grid = InProcessGrid({s: tiny_cohort / s for s in SITES}, tmp_path / "sites")
    summary = PlanRunner(grid, cfg, tmp_path / "run", "g1").run(expected_sites=3, wait_s=1)
    selection = summary["selection"]["densenet3d"]
    assert "guard" not in selection["0"] and selection["1"]["guard"] == "inverted on validation (forced)"
    predictions = tmp_path / "sites" / "centre2" / "g1" / "predictions"
    assert (predictions / "densenet3d_fold0.csv").is_file()
    assert not (predictions / "densenet3d_fold1.csv").exists()  # never sent to the external site
    assert summary["models"]["densenet3d"]["external"]["pooled"]["n"] == 40  # still every external patient
    assert (tmp_path / "sites" / "centre1" / "g1" / "predictions" / "densenet3d_fold1.csv").is_file()
