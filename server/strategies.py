"""Strategy factory: the configured Flower strategy with the plan's hooks.

FedBN is FedAvg whose codec leaves normalisation layers out of the wire
(see ``common.records.ModelCodec``), so it needs no strategy of its own.
FedMedian and FedTrimmedAvg are FedAvg with a robust aggregate.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam, FedProx, FedYogi

from common.config import FederationConfig

from .session import FoldSession
from .strategy import GuardedFedAvg


class GuardedFedProx(FedProx, GuardedFedAvg):
    """FedProx: the clients add ``mu/2 ||w - w_global||^2`` (``proximal-mu`` in the config)."""


class GuardedFedAdam(FedAdam, GuardedFedAvg):
    """FedAdam (server-side Adam on the averaged update); float buffers only travel."""


class GuardedFedYogi(FedYogi, GuardedFedAvg):
    """FedYogi (server-side Yogi on the averaged update)."""


def make_strategy(cfg: FederationConfig, session: FoldSession) -> GuardedFedAvg:
    """A fresh strategy for one fold (server-optimiser state never leaks across folds)."""
    common: dict[str, Any] = {"fraction_evaluate": 1.0, "min_train_nodes": 1, "min_evaluate_nodes": 1, "min_available_nodes": 1}
    strategy: GuardedFedAvg
    if cfg.strategy == "fedprox":
        strategy = GuardedFedProx(proximal_mu=cfg.proximal_mu, **common)
    elif cfg.strategy == "fedadam":
        strategy = GuardedFedAdam(eta=cfg.server_lr, **common)
    elif cfg.strategy == "fedyogi":
        strategy = GuardedFedYogi(eta=cfg.server_lr, **common)
    else:
        strategy = GuardedFedAvg(**common)
    session.robust = {"fedmedian": "median", "fedtrimmedavg": "trimmed"}.get(cfg.strategy, "mean")
    session.trim_fraction = cfg.trim_fraction
    return strategy.bind(session)
