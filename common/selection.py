"""Centralised model selection (the study's best-validation-AUC rule) and the guard on its outputs.

The pooled and local baselines select a checkpoint here; the federated
strategy applies the same rule round by round (``server.training``).
:func:`diagnose` names the two ways a selected model fails on this task
(constant output, inverted ranking); a site logs it for every model it
validates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import ExperimentConfig
from .engine import Schedule, predict, train
from .metrics import binary_metrics
from .models import ModelKind
from .sitearrays import SiteArrays


def diagnose(probs: np.ndarray, labels: np.ndarray, *, min_std: float = 1e-3) -> list[str]:
    """Flag a model whose outputs are constant or whose ranking is inverted.

    Both failure modes were seen on this task with BatchNorm and few steps
    per epoch; they pass silently through a loss curve but not through this.
    """
    problems = []
    if probs.size and float(np.std(probs)) < min_std:
        problems.append(f"constant output: probability SD {np.std(probs):.2e} < {min_std:g}")
    if np.unique(labels).size == 2:
        auc = binary_metrics(labels, probs).auc
        if auc < 0.5:
            problems.append(f"inverted ranking: AUC {auc:.3f} < 0.5")
    return problems


@dataclass(frozen=True)
class Selection:
    """Best-validation-AUC checkpoint of a centralised training run (the study's rule)."""

    best_epoch: int
    val_aucs: tuple[float, ...]  # per epoch; NaN for an epoch that does not compete (not validated)
    state: dict[str, torch.Tensor]
    seconds: float


def fit_select(
    model: nn.Module,
    arrays: SiteArrays,
    train_idx: Sequence[int],
    val_idx: Sequence[int],
    kind: ModelKind,
    cfg: ExperimentConfig,
    *,
    epochs: int,
    seed: int,
    desc: str = "fit",
    first_epoch: int = 1,
) -> Selection:
    """Train ``epochs`` epochs, validating after each; keep the best-validation-AUC weights.

    One epoch here is one round with one local epoch in a federation: the
    same schedule, the same selection rule (only epochs ``>= first_epoch``
    compete, as ``evaluation.select_from_round``, and earlier ones are neither
    validated, their AUC NaN, nor recalibrated), so pooled and federated runs
    spend the same budget.
    """
    t0 = time.perf_counter()
    labels = arrays.labels[np.asarray(val_idx, dtype=int)]
    aucs: list[float] = []
    best_state: dict[str, torch.Tensor] = {}
    best_auc, best_epoch = -np.inf, 0
    opt_state: dict[str, Any] | None = None  # carried across epochs as a site carries it across rounds
    for e in range(epochs):
        competes = e + 1 >= min(first_epoch, epochs)
        opt_state = train(
            model,
            arrays,
            train_idx,
            kind,
            cfg,
            epochs=1,
            schedule=Schedule(e, epochs),
            seed=seed * 1000 + e,
            desc=f"{desc} e{e + 1}",
            optimizer_state=opt_state,
            recalibrate=competes,
        ).optimizer_state
        if not competes:
            aucs.append(math.nan)
            continue
        auc = binary_metrics(labels, predict(model, arrays, val_idx, kind, cfg)).auc
        auc = -1.0 if np.isnan(auc) else float(auc)
        aucs.append(auc)
        if auc > best_auc:
            best_auc, best_epoch = auc, e + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return Selection(best_epoch=best_epoch, val_aucs=tuple(aucs), state=best_state, seconds=time.perf_counter() - t0)
