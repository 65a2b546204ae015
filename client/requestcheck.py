"""A request's own fields must agree with the run config it carries.

The run config travels in the same message and has passed the site's floor
(``client.floor``); the network, the fold, the round counters, the FedProx
term and the role are the server's to choose only inside it.  Left unchecked,
a round count far above the run's stretches the site's learning-rate schedule
(``common.rounds.round_schedule``), a negative fold silently names another
fold, an unknown network fails deep inside model building, and an empty fold
list fails after the external predictions were computed.  So a request that
contradicts its config is refused before any data is read: the reply is
``unavailable`` with the reason, as for the floor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from common.config import ExperimentConfig
from common.protocol import ROLE_TRAIN, ROLES, CrossSiteRequest, PredictRequest, RoundRequest

RADIOMICS_MODEL = "radiomics"  # the one non-network model a prediction request may name (server.radiomicsfit)


class RequestRejected(ValueError):
    """A request whose fields contradict the run config it carries (the reason goes back to the server)."""


def check_request(body: Any, cfg: ExperimentConfig, step: str) -> None:
    """Raise :class:`RequestRejected` naming every field of ``body`` outside ``cfg``."""
    problems = list(request_problems(body, cfg))
    if problems:
        raise RequestRejected(f"{step} request refused: " + "; ".join(problems))


def request_problems(body: Any, cfg: ExperimentConfig) -> Iterator[str]:
    """Each field of a request outside what its run config allows, in words."""
    model = getattr(body, "model", None)
    if model is not None:
        allowed = cfg.networks + ((RADIOMICS_MODEL,) if isinstance(body, PredictRequest) and cfg.models.radiomics else ())
        if model not in allowed:
            yield f"model {model!r} is not one this run trains ({', '.join(allowed) or 'none'})"
            return  # the round checks below read the network's own budget
    fold = getattr(body, "fold", None)
    if fold is not None and fold not in cfg.active_folds:
        yield f"fold {fold} is not one of this run's folds {list(cfg.active_folds)}"
    role = getattr(body, "role", None)
    if role is not None and role not in ROLES:
        yield f"role {role!r} is not one of {list(ROLES)}"
    if isinstance(body, RoundRequest):
        yield from _round_problems(body, cfg)
    if isinstance(body, PredictRequest):
        yield from _predict_problems(body, cfg)
    if isinstance(body, CrossSiteRequest):
        folds = list(body.folds)
        if not folds or body.fold not in folds or any(k not in cfg.active_folds for k in folds):
            yield f"folds {folds} must hold fold {body.fold} and only this run's folds {list(cfg.active_folds)}"


def _predict_problems(req: PredictRequest, cfg: ExperimentConfig) -> Iterator[str]:
    if (req.weights is None) == (req.staged is None):
        yield "a prediction carries either the model's weights or the digest of a kept model (`staged`), not both or neither"
    if req.model == RADIOMICS_MODEL:
        if req.staged is not None:
            yield "the radiomics model is never kept at a site: its prediction carries its parameters"
        return
    rounds = cfg.for_model(req.model).train.rounds
    if not 1 <= req.round <= rounds:
        yield f"round {req.round} is outside this network's rounds 1-{rounds}"
    if req.staged is not None and req.role != ROLE_TRAIN:
        yield "only a training site keeps a fold model's predictions (from its validation)"


def _round_problems(req: RoundRequest, cfg: ExperimentConfig) -> Iterator[str]:
    rounds = cfg.for_model(req.model).train.rounds
    if req.total_rounds != rounds:
        yield f"total rounds {req.total_rounds} differ from this network's {rounds} in the run config"
    if not 1 <= req.global_round <= rounds:
        yield f"round {req.global_round} is outside this network's rounds 1-{rounds}"
    fed = cfg.federation
    allowed = (0.0, fed.proximal_mu) if fed.strategy == "fedprox" else (0.0,)  # 0: evaluation, local-only rounds
    if not math.isfinite(req.proximal_mu) or req.proximal_mu not in allowed:
        yield f"FedProx mu {req.proximal_mu} is not one of {list(allowed)} (strategy {fed.strategy})"
