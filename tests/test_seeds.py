"""``train.seed`` drives the training randomness; the top-level ``seed`` only the splits.

So a second ``train.seed`` retrains the same folds: the spread it gives is the
recipe's run-to-run noise, which a study needs before it believes a 0.02 change.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from common import rounds
from common.config import ExperimentConfig
from common.configfile import load_config
from server.training import initial_vector


def _cfg(seed: int, train_seed: int) -> ExperimentConfig:
    return load_config("tiny", {"seed": seed, "train": {"seed": train_seed}})


def _training_seed(cfg: ExperimentConfig, monkeypatch: pytest.MonkeyPatch) -> int:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(rounds, "train", lambda *args, **kwargs: seen.update(kwargs))
    rounds.local_round(None, None, [], "densenet3d", cfg, fold=1, rnd=2, total_rounds=3)  # type: ignore[arg-type]
    return int(seen["seed"])


def test_each_round_trains_under_train_seed_not_the_split_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _training_seed(_cfg(0, 0), monkeypatch)
    assert _training_seed(_cfg(0, 1), monkeypatch) != base
    assert _training_seed(_cfg(5, 0), monkeypatch) == base


def test_the_initial_global_model_follows_train_seed_only() -> None:
    def initial(seed: int, train_seed: int) -> np.ndarray:
        return initial_vector(_cfg(seed, train_seed), "densenet3d")

    base = initial(0, 0)
    assert np.array_equal(initial(3, 0), base)
    assert not np.array_equal(initial(0, 1), base)
