"""One site's local training in one federated round: the seed and schedule every caller shares.

The ClientApp (``client.site``) and the plain-loop baseline (``bench.plain``)
both train through :func:`local_round`, so the seed formula, the
learning-rate schedule across rounds and which rounds are validated
(``common.config.validated_round``, which the server reads too) exist
once: a change here changes the federated run and its baseline alike.
"""

from __future__ import annotations

from typing import Any

from .config import ExperimentConfig, validated_round
from .engine import Schedule, TrainResult, train
from .models import ModelKind
from .sitearrays import SiteArrays


def round_seed(seed: int, fold: int, rnd: int) -> int:
    """The local-training seed of round ``rnd`` (1-based, counted over the whole run) of fold ``fold``."""
    return seed * 1000 + fold * 100 + rnd


def round_schedule(rnd: int, local_epochs: int, total_rounds: int) -> Schedule:
    """Round ``rnd``'s place in the whole run's learning-rate schedule (epochs across rounds)."""
    return Schedule(start_epoch=(rnd - 1) * local_epochs, total_epochs=total_rounds * local_epochs)


def local_round(
    model: Any,
    arrays: SiteArrays,
    indices: list[int],
    kind: ModelKind,
    cfg: ExperimentConfig,
    *,
    fold: int,
    rnd: int,
    total_rounds: int,
    **kwargs: Any,
) -> TrainResult:
    """``train.local_epochs`` epochs of round ``rnd`` from the model's current (global) weights.

    BatchNorm is recalibrated only if the round's model is :func:`validated_round`:
    training mode normalises with batch statistics, and the next
    recalibration resets the running ones, so a skipped pass changes no
    later round.
    """
    le = cfg.train.local_epochs
    return train(
        model,
        arrays,
        indices,
        kind,
        cfg,
        epochs=le,
        schedule=round_schedule(rnd, le, total_rounds),
        seed=round_seed(cfg.train.seed, fold, rnd),
        recalibrate=validated_round(cfg, rnd),
        **kwargs,
    )
