"""The radiomics model of the plan: a federated logistic regression on the handcrafted features.

One shot per fold, no rounds: the training sites send their features' sums
and sums of squares (``FEATSTATS``), the server standardises with the pooled
moments, each site fits on its own training patients (``RADIOMICS``) and the
fits are averaged weighted by patients.  The model is checkpointed like a
fold's DenseNet and every site predicts with it, so the evaluation treats it
as one more model.  Kept apart from ``server.training``: nothing here is a
Flower round.
"""

from __future__ import annotations

import logging

import numpy as np

from common.protocol import (
    FEATSTATS,
    PREDICT,
    RADIOMICS,
    ROLE_TRAIN,
    ROLES,
    FeatstatsReply,
    FoldRequest,
    PredictRequest,
    RadiomicsRequest,
)
from common.radiomics import FederatedLogit

from .checkpoints import CheckpointStore
from .messenger import Messenger
from .registry import SiteRegistry

log = logging.getLogger(__name__)


class RadiomicsTrainer:
    """Fits, checkpoints and distributes the federated radiomics model of each fold."""

    def __init__(self, messenger: Messenger, registry: SiteRegistry, ckpt: CheckpointStore) -> None:
        self.messenger = messenger
        self.registry = registry
        self.ckpt = ckpt

    def fit_fold(self, fold: int) -> None:
        """One-shot federated logistic regression on the handcrafted features, then prediction."""
        nodes = list(self.registry.nodes(ROLE_TRAIN))
        parts = [a.body for a in self.messenger.send(nodes, FEATSTATS, FoldRequest(fold=fold))]
        if not parts:
            log.warning("radiomics fold %d: no site returned feature statistics", fold)
            return
        moments: FeatstatsReply = parts[0]
        for m in parts[1:]:
            moments = moments + m
        mean, std = FederatedLogit.moments_to_mean_std(float(moments.n[0]), moments.sum, moments.sumsq)
        fits = [
            a.body
            for a in self.messenger.send(nodes, RADIOMICS, RadiomicsRequest(fold=fold, mean=mean, std=std))
        ]
        if not fits:
            log.warning("radiomics fold %d: no site returned a model", fold)
            return
        avg = np.average(
            np.stack([f.params for f in fits]), axis=0, weights=[float(f.num_examples) for f in fits]
        )
        full = FederatedLogit.from_params(avg, mean, std).pack_full()
        self.ckpt.save("radiomics", fold, 1, full.astype(np.float32), {"val_auc": None})
        for role in ROLES:
            targets = list(self.registry.nodes(role))
            if targets:
                req = PredictRequest(weights=full, model="radiomics", fold=fold, round=1, role=role)
                self.messenger.send(targets, PREDICT, req)
