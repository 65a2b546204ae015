"""The server's plan against the real ClientApp in process: roles, selection, dropout, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import SiteConfig, with_sites
from common.configfile import load_config
from common.splits import load_splits
from server.runner import PlanRunner

from .inprocess import InProcessGrid, Interrupted

pytestmark = pytest.mark.usefixtures("task_identity")
SITES = ("centre1", "centre2", "centre3")


@pytest.fixture(scope="module")
def sites_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared site output folder: the preprocessing cache is reused across tests (runs differ by id)."""
    return tmp_path_factory.mktemp("plan-sites")


def _cfg(plan: str, **train: int):  # type: ignore[no-untyped-def]
    overrides = {
        "plan": plan,
        "run_folds": [0],
        "models": {"densenet2d": {"enabled": False}},
        "train": {"rounds": 2, **train},
        "federation": {"round_timeout_s": 60.0},
    }
    cfg = load_config("tiny", overrides)
    return with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))


def test_study_plan_trains_at_centre1_and_tests_externally(cohort: dict[str, Path], sites_out: Path, tmp_path: Path) -> None:
    grid = InProcessGrid(cohort, sites_out)
    summary = PlanRunner(grid, _cfg("study"), tmp_path / "run", "r1").run(expected_sites=3, wait_s=1)
    assert grid.calls[("centre1", "train")] == 2
    for ext in ("centre2", "centre3"):
        assert grid.calls[(ext, "train")] == 0 and grid.calls[(ext, "evaluate")] == 0
        assert grid.calls[(ext, "evaluate.predict")] == 2  # the 3D model and the radiomics model, fold 0
        rows = (sites_out / ext / "r1" / "predictions" / "densenet3d_fold0.csv").read_text().splitlines()
        assert len(rows) == 1 + 20 and all(",external," in r for r in rows[1:])
    assert summary["sites"]["centre1"]["role"] == "train" and summary["sites"]["centre2"]["role"] == "external"
    assert summary["models"]["densenet3d"]["external"]["pooled"]["n"] == 40
    assert summary["models"]["radiomics"]["external"]["pooled"]["n"] == 40
    assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] == 10  # centre1's fold-0 test patients
    assert "densenet3d" in summary["models"]["ensemble_3d_radiologist"]["weights"]


def test_selected_round_is_the_best_pooled_validation_auc(cohort: dict[str, Path], sites_out: Path, tmp_path: Path) -> None:
    grid = InProcessGrid(cohort, sites_out)
    summary = PlanRunner(grid, _cfg("federated", rounds=3), tmp_path / "run", "r2").run(expected_sites=3, wait_s=1)
    rounds = summary["rounds"]["densenet3d/fold0"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    n_val = sum(len(load_splits(sites_out / s / "r2" / "splits.json")[1][0].val) for s in SITES)
    assert all(r["val_n"] == n_val for r in rounds)  # validation patients pooled over the three sites
    aucs = [r["val_auc"] if r["val_auc"] is not None else -1 for r in rounds]
    chosen = summary["selection"]["densenet3d"]["0"]["round"]
    assert aucs[chosen - 1] == max(aucs) and chosen == aucs.index(max(aucs)) + 1


def test_a_site_that_never_answers_is_left_out_and_recorded(cohort: dict[str, Path], sites_out: Path, tmp_path: Path) -> None:
    grid = InProcessGrid(cohort, sites_out, silent=["centre3"])
    summary = PlanRunner(grid, _cfg("federated"), tmp_path / "run", "r3").run(expected_sites=3, wait_s=1)
    for r in summary["rounds"]["densenet3d/fold0"]:
        assert sorted(r["trained"]) == ["centre1", "centre2"] and r["missing"] == ["centre3"]
    assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] == 20


def test_a_site_back_under_a_new_node_id_takes_its_place_again(cohort: dict[str, Path], sites_out: Path, tmp_path: Path) -> None:
    # centre3's SuperNode restarts after round 1 and, with no enrolled key, gets a new node id
    grid = InProcessGrid(cohort, sites_out, reconnect_after_train={"centre3": 3})
    summary = PlanRunner(grid, _cfg("federated"), tmp_path / "run", "r6").run(expected_sites=3, wait_s=1)
    assert grid.calls[("centre3", "query.siteinfo")] == 2  # asked who it is once more
    assert [sorted(r["trained"]) for r in summary["rounds"]["densenet3d/fold0"]] == [list(SITES)] * 2
    assert sorted(summary["sites"]) == list(SITES)
    assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] == 30  # and it predicted


def test_server_restart_resumes_from_the_last_finished_round(cohort: dict[str, Path], sites_out: Path, tmp_path: Path) -> None:
    cfg = _cfg("federated", rounds=3)
    run_dir = tmp_path / "run"
    first = InProcessGrid(cohort, sites_out, fail_after_train=6)  # dies as round 3 starts
    with pytest.raises(Interrupted):
        PlanRunner(first, cfg, run_dir, "r4").run(expected_sites=3, wait_s=1)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "densenet3d_fold0").glob("round*.npz")) == ["round1.npz", "round2.npz"]
    second = InProcessGrid(cohort, sites_out)
    summary = PlanRunner(second, cfg, run_dir, "r4").run(expected_sites=3, wait_s=1)
    assert sum(v for (_, t), v in second.calls.items() if t == "train") == 3  # round 3 only, one message per site
    # rounds 1-2 are reported from their checkpoints, not retrained
    assert [r["round"] for r in summary["rounds"]["densenet3d/fold0"]] == [1, 2, 3]
    assert summary["resumed"] == {"densenet3d/fold0": 2}
    assert json.loads((run_dir / "checkpoints" / "densenet3d_fold0" / "selected.json").read_text())["round"] in (1, 2, 3)


def test_leave_one_centre_out_runs_one_pass_per_held_out_site(cohort: dict[str, Path], sites_out: Path, tmp_path: Path) -> None:
    grid = InProcessGrid(cohort, sites_out)
    summary = PlanRunner(grid, _cfg("loco", rounds=1), tmp_path / "run", "r5").run(expected_sites=3, wait_s=1)
    assert sorted(summary["passes"]) == list(SITES)
    for held_out, p in summary["passes"].items():
        assert p["sites"][held_out]["role"] == "external"
        assert sorted(s for s, v in p["sites"].items() if v["role"] == "train") == sorted(set(SITES) - {held_out})
        assert p["models"]["densenet3d"]["external"]["pooled"]["n"] == 20
    assert grid.calls[("centre1", "train")] == 2  # trains in the two passes where it is not held out


def test_sites_report_their_device_and_a_missing_gpu_is_their_reason(
    cohort: dict[str, Path], sites_out: Path, tmp_path: Path
) -> None:
    import dataclasses

    import torch

    cfg = _cfg("federated")
    runner = PlanRunner(InProcessGrid(cohort, sites_out), cfg, tmp_path / "run", "dev1")
    runner.discover(3, 1)
    here = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert sorted(runner.devices) == list(SITES) and {d["device"] for d in runner.devices.values()} == {here}
    if torch.cuda.is_available():
        return
    cuda = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, device="cuda"))
    runner = PlanRunner(InProcessGrid(cohort, sites_out), cuda, tmp_path / "run2", "dev2")
    assert runner.discover(3, 1) == {}
    assert all("train.device: cuda requested but no CUDA device" in runner.unavailable[s] for s in SITES)
