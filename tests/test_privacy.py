"""DP-SGD with real Opacus through the engine: epsilon accumulates, the budget stops training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from common.config import DPConfig
from common.configfile import load_config
from common.engine import Schedule, train
from common.models import build_model
from common.privacy import PrivacyBudgetExhausted, PrivacyLedger

from .test_engine import tiny_arrays


def _dp_cfg(dp: DPConfig):  # type: ignore[no-untyped-def]
    gn = {"arch": "small", "norm": "group", "group_norm_groups": 4}
    return load_config(
        "tiny",
        {"dp": dataclasses.asdict(dp), "models": {"densenet3d": gn, "densenet2d": gn}, "train": {"bn_recalibration": False}},
    )


def test_epsilon_is_reported_and_accumulates_across_rounds(tmp_path: Path) -> None:
    cfg = _dp_cfg(DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0))
    arrays = tiny_arrays(16)
    ledger = PrivacyLedger(tmp_path / "dp.json")
    torch.manual_seed(0)
    model = build_model("densenet3d", cfg.models.densenet3d)
    eps = []
    for rnd in range(2):
        res = train(model, arrays, range(16), "densenet3d", cfg, epochs=1, schedule=Schedule(rnd, 2), seed=rnd, privacy=ledger)
        assert res.epsilon is not None
        eps.append(res.epsilon)
    assert 0 < eps[0] < eps[1]
    assert sum(steps for _, _, steps in ledger.history()) == 2 * 2  # two rounds of two batches of 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_spent_budget_refuses_further_training(tmp_path: Path) -> None:
    cfg = _dp_cfg(DPConfig(enabled=True, target_epsilon=2.0, max_grad_norm=1.0))
    arrays = tiny_arrays(16)
    ledger = PrivacyLedger(tmp_path / "dp.json")
    model = build_model("densenet3d", cfg.models.densenet3d)
    # a budget planned for 1 epoch, then asked for more: the second epoch is refused
    first = train(model, arrays, range(16), "densenet3d", cfg, epochs=1, schedule=Schedule(0, 1), seed=0, privacy=ledger)
    assert first.epsilon is not None and first.epsilon == pytest.approx(2.0, rel=0.15)
    with pytest.raises(PrivacyBudgetExhausted, match="privacy budget spent"):
        train(model, arrays, range(16), "densenet3d", cfg, epochs=1, schedule=Schedule(1, 1), seed=1, privacy=ledger)


def test_dp_without_a_ledger_or_with_batchnorm_is_refused() -> None:
    cfg = _dp_cfg(DPConfig(enabled=True))
    with pytest.raises(ValueError, match="ledger"):
        train(build_model("densenet3d", cfg.models.densenet3d), tiny_arrays(8), range(8), "densenet3d", cfg, epochs=1, schedule=Schedule(0, 1), seed=0)
    with pytest.raises(ValueError, match="BatchNorm is not compatible"):
        load_config("tiny", {"dp": {"enabled": True}})
