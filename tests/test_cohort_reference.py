"""Cohort reference figures belong only to runs on the synthetic cohort they describe."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import yaml

from common.config import ConfigError, SiteConfig, with_sites
from common.configfile import load_config
from simulation.cli import _experiment, cohort_reference, cohort_sites


def _write(tmp_path: Path, data: dict) -> str:  # type: ignore[type-arg]
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"base": "tiny", **data}))
    return str(path)


def test_a_run_on_hospital_folders_carries_no_cohort_reference(tiny_cohort: Path, tmp_path: Path) -> None:
    hospitals = tmp_path / "hospitals"
    for name in ("centre1", "centre2", "centre3"):
        shutil.copytree(tiny_cohort / name, hospitals / name)
    never = tmp_path / "never-generated"
    cfg_path = _write(
        tmp_path,
        {
            "cohort": {"synthetic": False, "dir": str(never)},
            "sites": [{"name": n, "data_dir": str(hospitals / n)} for n in ("centre1", "centre2", "centre3")],
        },
    )
    cfg, cohort_dir = _experiment(argparse.Namespace(config=cfg_path))
    assert cohort_dir is None and not never.exists()  # no synthetic cohort generated for a hospital run
    assert cohort_reference(cfg, cohort_dir) is None
    # even handed the synthetic cohort's folder, a non-synthetic run takes none of its figures
    assert cohort_reference(cfg, tiny_cohort) is None


def test_synthetic_false_without_sites_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sites"):
        _experiment(argparse.Namespace(config=_write(tmp_path, {"cohort": {"synthetic": False}})))


def test_a_synthetic_run_carries_exactly_its_own_cohorts_reference(tiny_cohort: Path) -> None:
    info = json.loads((tiny_cohort / "cohort.json").read_text())
    cfg = with_sites(load_config("tiny", {"cohort": {"dir": str(tiny_cohort)}}), cohort_sites(tiny_cohort))
    ref = cohort_reference(cfg, tiny_cohort)
    assert ref is not None
    for key in ("oracle_auc", "radiologist_auc", "handcrafted_lr_auc"):
        assert ref[key] == info[key]
    assert (ref["scale"], ref["seed"]) == (info["scale"], info["seed"])


def test_sites_outside_the_synthetic_cohort_get_no_reference(tiny_cohort: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    shutil.copytree(tiny_cohort / "centre1", other)
    sites = (*cohort_sites(tiny_cohort)[1:], SiteConfig(name="centre1", data_dir=str(other)))
    cfg = with_sites(load_config("tiny", {"cohort": {"dir": str(tiny_cohort)}}), sites)
    assert cohort_reference(cfg, tiny_cohort) is None
