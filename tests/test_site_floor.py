"""A hospital's own limits: its privacy floor, its output folder and its site folder bound what a server can ask."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app as client_app
from client.floor import PrivacyFloor, PrivacyFloorViolation, load_floor
from client.requestcheck import RequestRejected, check_request, request_problems
from client.site import RunIdRejected, SiteContext, SiteRunner, run_folder
from common.config import SiteConfig, to_dict, with_sites
from common.configfile import load_config
from common.protocol import TRAIN, CrossSiteRequest, Header, PredictRequest, TrainRequest
from common.records import config_record
from common.sitedata import MANIFEST, SiteDataError, confined_path, iter_cases
from common.validation import validate_site
from server.runner import PlanRunner

from .inprocess import InProcessGrid


# -- privacy floor ------------------------------------------------------------------------------
def test_the_floor_refuses_each_weaker_request_and_says_why() -> None:
    floor = PrivacyFloor(require_dp=True, max_epsilon=8, min_cell_count=5, min_stats_noise=0.5, max_bins=200)
    weak = load_config("tiny")
    problems = floor.violations(weak)
    assert len(problems) == 5 and any("dp.enabled" in p for p in problems)  # dp, epsilon, cells, noise, bins
    assert any("min_cell_count 0 is below this site's 5" in p for p in problems)
    with pytest.raises(
        PrivacyFloorViolation, match=r"privacy floor: .*grid_bins 1000 is above this site's 200"
    ):
        floor.check(weak)
    strong = load_config(
        "tiny",
        {
            "dp": {"enabled": True, "target_epsilon": 4.0},
            "models": {"densenet3d": {"norm": "group"}, "densenet2d": {"norm": "group"}},
            "evaluation": {"min_cell_count": 5, "stats_noise": 0.5, "grid_bins": 200},
        },
    )
    floor.check(strong)  # meets every rule
    with pytest.raises(
        PrivacyFloorViolation, match=r"^privacy floor: evaluation.grid_bins 200 is above this site's 100$"
    ):
        PrivacyFloor(max_bins=100).check(strong)
    with pytest.raises(PrivacyFloorViolation, match="500-bin"):
        floor.check(strong, bins=500)
    with pytest.raises(PrivacyFloorViolation, match="DeLong"):
        floor.check(strong, step="delong")
    PrivacyFloor().check(weak)  # the default floor asks nothing: the default run is unchanged


def test_the_floor_comes_from_the_site_folder_and_the_node_config_the_stricter_winning(
    tmp_path: Path,
) -> None:
    assert load_floor(tmp_path) == PrivacyFloor()
    (tmp_path / "privacy.yaml").write_text("min_cell_count: 3\nmax_bins: 500\n")
    floor = load_floor(
        tmp_path, {"privacy-min-cell-count": 5, "privacy-max-bins": 2000, "privacy-require-dp": "true"}
    )
    assert floor == PrivacyFloor(require_dp=True, min_cell_count=5, max_bins=500)
    (tmp_path / "privacy.yaml").write_text("min_cells: 3\n")
    with pytest.raises(ValueError, match="unknown privacy floor key 'min_cells'"):
        load_floor(tmp_path)


@pytest.mark.usefixtures("task_identity")
def test_a_site_refuses_a_run_below_its_floor_and_the_server_records_why(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    site = tmp_path / "centre1"
    shutil.copytree(tiny_cohort / "centre1", site)
    (site / "privacy.yaml").write_text("min_cell_count: 5\n")
    cfg = with_sites(load_config("tiny"), (SiteConfig(name="centre1"),))
    grid = InProcessGrid({"centre1": site}, tmp_path / "out")
    runner = PlanRunner(grid, cfg, tmp_path / "run", "floor")
    assert runner.discover(expected=1, wait_s=1) == {}
    assert "evaluation.min_cell_count 0 is below this site's 5" in runner.unavailable["centre1"]
    assert not (tmp_path / "out" / "centre1" / "cache").exists()  # refused before touching the data


# -- run ids ------------------------------------------------------------------------------------
@pytest.mark.parametrize("run_id", ["../../x", "/tmp/x", "..", ".", "a/b", "", "run id", "x\x00"])
def test_a_server_sent_run_id_that_is_a_path_is_refused(run_id: str, tmp_path: Path) -> None:
    with pytest.raises(RunIdRejected, match="run id"):
        run_folder(tmp_path, run_id)


def test_a_run_id_through_a_symlink_out_of_the_output_folder_is_refused(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "escape").symlink_to(elsewhere)
    with pytest.raises(RunIdRejected, match="outside"):
        run_folder(out, "escape")
    assert run_folder(out, "run-2026.12_01") == out / "run-2026.12_01"


def _site_reply(msg: Message, data_dir: Path, out: Path) -> ConfigRecord:
    """The status record of site ``centre1``'s ClientApp's reply to ``msg``."""
    node = {"site": "centre1", "data-dir": str(data_dir), "out-dir": str(out)}
    reply = client_app(msg, Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={}))
    return reply.content.config_records["status"]


@pytest.mark.usefixtures("task_identity")
def test_the_client_app_refuses_a_path_run_id_and_writes_nothing_outside(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "site-out"
    cfg = load_config("tiny")
    for run_id in ("../../escaped", str(tmp_path / "abs")):
        msg = Message(
            RecordDict({"config": config_record({"experiment": to_dict(cfg), "run-id": run_id})}),
            dst_node_id=1,
            message_type="query.siteinfo",
        )
        status = _site_reply(msg, tiny_cohort / "centre1", out)
        assert isinstance(status, ConfigRecord) and status["state"] == "unavailable"
        assert "run id" in str(status["reason"])
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "abs").exists()
    with pytest.raises(RunIdRejected):
        SiteRunner(SiteContext("centre1", tiny_cohort / "centre1", out), cfg, "../x")


# -- manifest paths -----------------------------------------------------------------------------
def _site_with(tmp_path: Path, tiny_cohort: Path, image: str) -> tuple[Path, str]:
    site = tmp_path / "site"
    shutil.copytree(tiny_cohort / "centre1", site)
    lines = (site / MANIFEST).read_text().splitlines()
    header = lines[0].split(",")
    row = lines[1].split(",")
    pid = row[header.index("patient_id")]
    row[header.index("image")] = image
    lines[1] = ",".join(row)
    (site / MANIFEST).write_text("\n".join(lines) + "\n")
    return site, pid


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_manifest_paths_outside_the_site_folder_are_refused_naming_the_patient(
    kind: str, tiny_cohort: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "secret.nii.gz"
    first = next(iter_cases(tiny_cohort / "centre1"))
    shutil.copy(first.image, outside)
    if kind == "dotdot":
        path = "../secret.nii.gz"
    elif kind == "absolute":
        path = str(outside)
    else:
        path = "images/link.nii.gz"
    site, pid = _site_with(tmp_path, tiny_cohort, path)
    if kind == "symlink":
        (site / "images" / "link.nii.gz").symlink_to(outside)
    with pytest.raises(SiteDataError, match=f"patient '{pid}'.*site folder"):
        list(iter_cases(site))
    report = validate_site(site, check_images=True)
    (problem,) = [p for p in report.errors if p.code == "path_outside_site"]
    assert problem.patient_id == pid and "image" in problem.message
    assert pid not in report.valid_ids


def test_confined_path_keeps_ordinary_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    assert confined_path(tmp_path, "images/a.nii.gz") == tmp_path / "images" / "a.nii.gz"
    with pytest.raises(SiteDataError, match=r"\.\."):
        confined_path(tmp_path, "./images/../images/a.nii.gz")


# -- a request's fields against the run config it carries ----------------------------------------
def _train(**change: Any) -> TrainRequest:
    base = TrainRequest(
        weights=np.zeros(4, np.float32), model="densenet3d", fold=0, server_round=1, global_round=1, total_rounds=2
    )
    return dataclasses.replace(base, **change)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"total_rounds": 1_000_000}, "total rounds 1000000 differ from this network's 2"),
        ({"global_round": 3}, "round 3 is outside this network's rounds 1-2"),
        ({"global_round": 0}, "round 0 is outside"),
        ({"fold": -1}, "fold -1 is not one of this run's folds [0, 1]"),
        ({"fold": 2}, "fold 2 is not one of"),
        ({"model": "__class__"}, "model '__class__' is not one this run trains (densenet3d, densenet2d)"),
        ({"model": "radiomics"}, "model 'radiomics' is not one this run trains"),
        ({"proximal_mu": 1e6}, "FedProx mu 1000000.0 is not one of [0.0] (strategy fedavg)"),
        ({"proximal_mu": float("nan")}, "FedProx mu nan"),
    ],
)
def test_a_round_request_outside_its_own_run_config_is_refused_naming_the_field(
    change: dict[str, Any], problem: str
) -> None:
    cfg = load_config("tiny")
    assert list(request_problems(_train(), cfg)) == []  # what the server sends
    with pytest.raises(RequestRejected, match=r"^train request refused: .*" + re.escape(problem)):
        check_request(_train(**change), cfg, "train")


def test_request_checks_follow_the_run_config_not_fixed_values() -> None:
    cfg = load_config(
        "tiny",
        {
            "run_folds": [1],
            "federation": {"strategy": "fedprox", "proximal_mu": 0.05},
            "models": {"densenet3d": {"rounds": 4}, "densenet2d": {"enabled": False}},
        },
    )
    ok = _train(fold=1, total_rounds=4, global_round=4, proximal_mu=0.05)
    assert list(request_problems(ok, cfg)) == []
    assert list(request_problems(dataclasses.replace(ok, proximal_mu=0.0), cfg)) == []  # evaluation, local-only
    assert [p for p in request_problems(_train(fold=0, total_rounds=4), cfg)] == [
        "fold 0 is not one of this run's folds [1]"
    ]
    assert "not one this run trains (densenet3d)" in " ".join(request_problems(_train(model="densenet2d"), cfg))
    predict = PredictRequest(weights=np.zeros(3, np.float32), model="radiomics", fold=1, round=1, role="train")
    assert list(request_problems(predict, cfg)) == []
    assert list(request_problems(dataclasses.replace(predict, role="../x"), cfg)) == [
        "role '../x' is not one of ['train', 'external']"
    ]
    assert list(request_problems(dataclasses.replace(predict, model="densenet3d", round=5), cfg)) == [
        "round 5 is outside this network's rounds 1-4"
    ]
    cross = CrossSiteRequest(
        weights=np.zeros(4, np.float32), model="densenet3d", fold=1, role="external", name="global", folds=[]
    )
    assert "folds [] must hold fold 1" in " ".join(request_problems(cross, cfg))
    assert list(request_problems(dataclasses.replace(cross, folds=[1]), cfg)) == []


@pytest.mark.usefixtures("task_identity")
def test_the_client_app_refuses_a_request_outside_its_run_config_before_reading_data(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    out = tmp_path / "site-out"
    cfg = load_config("tiny")
    header = Header(experiment=to_dict(cfg), run_id="r1")
    status = _site_reply(TRAIN.message(header, _train(total_rounds=10**9), dst=1), tiny_cohort / "centre1", out)
    assert status["state"] == "unavailable"
    assert "train request refused: total rounds 1000000000 differ from this network's 2" in str(status["reason"])
    assert not (out / "r1" / "cache").exists() and not (out / "r1" / "state").exists()
