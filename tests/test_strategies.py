"""Every configured strategy trains a fold through the real ClientApp without NaN."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from common.config import SiteConfig, with_sites
from common.configfile import load_config
from common.models import build_model, is_norm_key
from common.records import weights_from_record, weights_record
from server.runner import PlanRunner

from .inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")
SITES = ("centre1", "centre2")


@pytest.fixture(scope="module")
def cohort(tiny_cohort: Path) -> dict[str, Path]:
    return {s: tiny_cohort / s for s in SITES}


@pytest.fixture(scope="module")
def sites_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shared site output folder: the preprocessing cache is reused across tests (runs differ by id)."""
    return tmp_path_factory.mktemp("strategy-sites")


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedyogi", "fedbn", "fedmedian", "fedtrimmedavg"])
def test_strategy_trains_two_rounds_with_finite_weights(strategy: str, cohort: dict[str, Path], sites_out: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny", {"federation": {"strategy": strategy, "server_lr": 0.001}, "train": {"rounds": 2}, "models": {"densenet2d": {"enabled": False}}})
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    grid = InProcessGrid(cohort, sites_out)
    runner = PlanRunner(grid, cfg, tmp_path / "run", f"run-{strategy}")
    runner.discover(expected=2, wait_s=1)
    best = runner.train_fold("densenet3d", 0)
    assert best["round"] in (1, 2)
    for rnd in (1, 2):
        vec = runner.ckpt.load("densenet3d", 0, rnd)
        assert np.all(np.isfinite(vec))
    logs = runner.participation["densenet3d/fold0"]
    assert [sorted(r["trained"]) for r in logs] == [list(SITES)] * 2 and all(not r["dropped"] for r in logs)
    state = build_model("densenet3d", cfg.models.densenet3d).state_dict()
    n_float = sum(v.numel() for v in state.values() if v.is_floating_point())
    n_norm = sum(v.numel() for k, v in state.items() if v.is_floating_point() and is_norm_key(k))
    if strategy == "fedbn":  # normalisation layers never travel and stay at each site
        assert vec.size == n_float - n_norm
        assert (sites_out / "centre1" / "run-fedbn" / "state" / "densenet3d_fold0_round2.pt").is_file()
    else:
        assert vec.size == n_float


class CorruptingGrid(InProcessGrid):
    """Replaces one site's training update with NaNs or a 1000x blow-up (a faulty or hostile site)."""

    def __init__(self, *args: object, bad_site: str, mode: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.bad_site, self.mode = bad_site, mode

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        replies = list(super().send_and_receive(messages, timeout=timeout))
        by_id = {m.metadata.dst_node_id: m for m in messages}
        out = []
        for r in replies:
            node = r.metadata.src_node_id
            if self.nodes[node] == self.bad_site and r.metadata.message_type == "train":
                vec = weights_from_record(r.content.array_records["arrays"])
                bad = np.full_like(vec, np.nan) if self.mode == "nan" else vec * 1000.0
                content = RecordDict({"arrays": weights_record(bad), "metrics": r.content.metric_records["metrics"], "status": r.content.config_records["status"]})
                r = Message(content, reply_to=by_id[node])
            out.append(r)
        return out


@pytest.mark.parametrize("mode", ["nan", "oversized"])
def test_a_bad_update_is_dropped_with_the_site_named_and_the_round_completes(
    mode: str, tiny_cohort: Path, sites_out: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sites = ("centre1", "centre2", "centre3")
    cfg = load_config("tiny", {"train": {"rounds": 2}, "models": {"densenet2d": {"enabled": False}}})
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in sites))
    grid = CorruptingGrid({s: tiny_cohort / s for s in sites}, sites_out, bad_site="centre2", mode=mode)
    runner = PlanRunner(grid, cfg, tmp_path / "run", f"bad-{mode}")
    runner.discover(expected=3, wait_s=1)
    with caplog.at_level(logging.WARNING):
        runner.train_fold("densenet3d", 0)
    for rlog in runner.participation["densenet3d/fold0"]:
        assert sorted(rlog["trained"]) == ["centre1", "centre3"]
        reason = rlog["dropped"]["centre2"]
        assert ("non-finite" in reason) if mode == "nan" else ("norm" in reason)
    assert np.all(np.isfinite(runner.ckpt.load("densenet3d", 0, 2)))
    assert "centre2" in caplog.text and "update dropped" in caplog.text
