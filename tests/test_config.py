"""Config parsing: presets load, bad keys and values are named, roles follow the plan."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from common.config import ConfigError, SiteConfig, to_dict, with_sites
from common.configfile import load_config
from common.configparse import from_dict


@pytest.mark.parametrize("name", ["quick", "study", "tiny"])
def test_presets_load_and_round_trip(name: str) -> None:
    cfg = load_config(name)
    assert cfg.name == name
    assert from_dict(to_dict(cfg)) == cfg
    assert len(cfg.digest()) == 16


EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "simulation" / "experiments").glob("*.yaml"))


def test_the_dp_experiments_are_found() -> None:
    assert [p.stem for p in EXPERIMENTS] == ["dp-eps2", "dp-eps8", "dp-reference"]


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_checked_in_experiments_load_and_differ_from_their_reference_only_in_dp(path: Path) -> None:
    cfg = load_config(path)
    ref = load_config(path.with_name("dp-reference.yaml"))
    assert cfg.models.densenet3d.norm == "group" and not cfg.train.bn_recalibration
    assert cfg.active_folds == ref.active_folds and cfg.train == ref.train
    assert cfg.dp.enabled == (cfg.name != "dp-reference")


def test_study_preset_has_the_papers_hyperparameters() -> None:
    cfg = load_config("study")
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.rounds, cfg.train.local_epochs) == (20, 1e-4, 50, 1)
    assert cfg.preprocess.d2.size == 224 and cfg.folds == 5 and cfg.plan == "study"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("base: quick\ntrain:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"train\.batchsize: unknown key"):
        load_config(f)


@pytest.mark.parametrize(
    ("yaml_text", "pattern"),
    [
        ("train: {lr: fast}", r"train\.lr: expected a number"),
        ("plan: everything", r"plan: 'everything' is not one of"),
        ("folds: 1", r"folds: must be at least 2"),
        ("evaluation: {score_mapping: [0.1, 0.2]}", r"score_mapping: needs 9"),
        ("dp: {enabled: true}", r"BatchNorm is not compatible with DP-SGD"),
        ("evaluation: {select_from_round: 9}", r"evaluation\.select_from_round: must be a round in 1\.\.4"),
        ("evaluation: {select_from_round: 0}", r"evaluation\.select_from_round"),
        ("models: {densenet3d: {rounds: 5, select_from_round: 6}}", r"models\.densenet3d\.select_from_round: must be a round in 1\.\.5"),
        ("models: {densenet2d: {rounds: -1}}", r"models\.densenet2d\.rounds: must be >= 0"),
        ("preprocess: {d2: {mask_outside_mm: -1}}", r"preprocess\.d2\.mask_outside_mm: must be >= 0"),
        ("preprocess: {d3: {mask_outside_mm: .nan}}", r"preprocess\.d3\.mask_outside_mm: must be >= 0"),
        (
            "preprocess: {d2: {planes: orthogonal, n_slices: 2, slice_weights: [0.5, 0.5]}}",
            r"preprocess\.d2\.n_slices: must be 3 with planes: orthogonal",
        ),
        ("preprocess: {d2: {planes: coronal}}", r"preprocess\.d2\.planes: 'coronal' is not one of"),
        ("train: {label_smoothing: 1.0}", r"train\.label_smoothing: must be in \[0, 1\)"),
        ("train: {label_smoothing: -0.1}", r"train\.label_smoothing"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, yaml_text: str, pattern: str) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("base: quick\n" + yaml_text + "\n")
    with pytest.raises(ConfigError, match=pattern):
        load_config(f)


def test_a_file_may_start_from_a_preset_that_has_its_own_base(tmp_path: Path) -> None:
    # quick-study says "base: quick"; a site's file says "base: quick-study" and changes one value
    f = tmp_path / "mine.yaml"
    f.write_text("base: quick-study\ntrain: {threads: 2}\n")
    cfg = load_config(f)
    study, quick = load_config("quick-study"), load_config("quick")
    assert cfg.plan == study.plan == "study" and quick.plan != "study"
    assert cfg.train.threads == 2 and cfg.train.lr == quick.train.lr
    assert cfg.preprocess == quick.preprocess


def test_a_cycle_of_base_presets_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import common.configfile as config_module

    monkeypatch.setattr(config_module, "preset_text", lambda name: f"base: {'b' if name == 'a' else 'a'}\n")
    f = tmp_path / "loop.yaml"
    f.write_text("base: a\n")
    with pytest.raises(ConfigError, match="cycle: a -> b -> a"):
        load_config(f)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_roles_follow_the_plan() -> None:
    sites = (SiteConfig("centre1"), SiteConfig("centre2"), SiteConfig("centre3"))
    study = with_sites(load_config("study"), sites)
    assert [s.role for s in study.sites] == ["train", "external", "external"]
    fed = with_sites(load_config("quick"), sites)
    assert [s.role for s in fed.sites] == ["train", "train", "train"]
    marked = with_sites(load_config("quick", {"external_sites": ["centre3"]}), sites)
    assert [s.role for s in marked.sites] == ["train", "train", "external"]


def test_a_network_may_have_its_own_rounds_and_selection_window() -> None:
    """``models.<kind>.rounds`` and ``select_from_round`` override the run's for that network only."""
    cfg = load_config("tiny", {"train": {"rounds": 4}, "evaluation": {"select_from_round": 3}, "models": {"densenet3d": {"rounds": 8, "select_from_round": 7}}})
    d3, d2 = cfg.for_model("densenet3d"), cfg.for_model("densenet2d")
    assert (d3.train.rounds, d3.evaluation.select_from_round) == (8, 7)
    assert d2 is cfg and (d2.train.rounds, d2.evaluation.select_from_round) == (4, 3)
    assert d3.train.lr == cfg.train.lr and d3.models == cfg.models and d3.for_model("densenet3d") == d3
    short = load_config("tiny", {"train": {"rounds": 4}, "evaluation": {"select_from_round": 3}, "models": {"densenet2d": {"rounds": 2}}})
    assert (short.for_model("densenet2d").train.rounds, short.for_model("densenet2d").evaluation.select_from_round) == (2, 2)


def test_a_removed_key_is_skipped_with_a_warning_that_says_what_replaced_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Old files, run folders and bundles carry ``train.epochs``: they still load, the same config."""
    f = tmp_path / "old.yaml"
    f.write_text("base: quick\ntrain:\n  epochs: 8\n  rounds: 8\n")
    with caplog.at_level(logging.WARNING, logger="common.configparse"):
        cfg = load_config(f)
    assert cfg == load_config("quick", {"train": {"rounds": 8}})
    assert re.search(r"train\.epochs: ignored: .*train\.rounds x train\.local_epochs", caplog.text)
    old_bundle_config = {**to_dict(cfg), "train": {**to_dict(cfg.train), "epochs": 50}}
    assert from_dict(old_bundle_config) == cfg
