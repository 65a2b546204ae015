"""Cross-site evaluation (``evaluation.cross_site``): every site's local-only model and the global model, everywhere.

For each active fold, each training site trains a model on its own fold
training patients only (the same rounds, local epochs and seeds as the
federation, through the ordinary ``train`` messages, each validating the
previous round's model as in the federation, and one ``evaluate`` for the
last; under a separate run id ``<run-id>-local-<site>`` so the site keeps its federated
state apart); the round with the best validation AUC at that site is kept, as
the federation keeps the best pooled one.  Then each model (the selected
global fold model and every local one) goes to every site in an
``evaluate.crosssite`` message; a training site answers the histogram of its
fold test patients (the server sums the folds: each patient is in one test
set), an external site scores all its patients with every fold model and
answers the histogram of the fold-averaged probabilities after the last
fold, as in the main evaluation.  The result is a model x site matrix of AUCs
with DeLong CIs, each patient counted once.  Weights travel; patients never.
Every reply goes through the messenger's checks.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from common.clinical import auc_ci
from common.config import ExperimentConfig, validated_round
from common.gridstats import ClassHistogram, auc
from common.protocol import (
    CROSSSITE,
    EVALUATE,
    ROLE_EXTERNAL,
    ROLE_TRAIN,
    TRAIN,
    CrossSiteRequest,
    EvaluateRequest,
    TrainRequest,
)
from common.replycheck import check_params

from .checkpoints import CheckpointStore
from .messenger import Messenger
from .registry import SiteRegistry
from .training import FoldTrainer, initial_vector

if TYPE_CHECKING:  # a name for annotations only: importing common.models would load torch and MONAI
    from common.models import ModelKind

log = logging.getLogger(__name__)

GLOBAL = "global"


def _keep(
    best: tuple[float, np.ndarray] | None, val: ClassHistogram | None, vec: np.ndarray
) -> tuple[float, np.ndarray]:
    """The better of the best model so far and ``vec`` (validation AUC; the earlier one on ties)."""
    value = auc(val) if val is not None else math.nan
    score = value if math.isfinite(value) else -math.inf
    return (score, vec) if best is None or score > best[0] else best


def local_name(site: str) -> str:
    """The row of a site's local-only model in the matrix."""
    return f"local:{site}"


class CrossSiteEvaluation:
    """The model x site AUC matrix of one model kind, for ``summary.json`` (``cross_site``)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        messenger: Messenger,
        registry: SiteRegistry,
        ckpt: CheckpointStore,
        trainer: FoldTrainer,
    ) -> None:
        self.cfg = cfg
        self.messenger = messenger
        self.registry = registry
        self.ckpt = ckpt
        self.trainer = trainer

    def _local_messenger(self, site: str) -> Messenger:
        """A messenger whose requests carry the site's local-only run id (its state kept apart)."""
        header = dataclasses.replace(
            self.messenger.header, run_id=f"{self.messenger.header.run_id}-local-{site}"
        )
        local = Messenger(
            self.messenger.grid, self.registry, header, self.messenger.timeout, self.messenger.checks
        )
        local.rejected = self.messenger.rejected  # rejections land in the run's record
        return local

    def train_local(self, kind: ModelKind, fold: int, node: int, site: str) -> np.ndarray | None:
        """Rounds at one site only; the vector of its best validation round (None if the site never answered)."""
        total = self.cfg.for_model(kind).train.rounds
        dtype = self.cfg.federation.transport_dtype
        vec = initial_vector(self.cfg, kind)
        size = vec.size
        messenger = self._local_messenger(site)
        best: tuple[float, np.ndarray] | None = None

        def whole_model(body: Any) -> None:  # a local model is used as sent: the codec's size, finite
            check_params(body.weights, size, "local model weights")

        pending: tuple[int, np.ndarray] | None = None  # the latest local model, not yet validated
        for rnd in range(1, total + 1):  # one exchange per round: it validates the previous round's model
            check = pending is not None and validated_round(self.cfg.for_model(kind), pending[0])  # if that one competes
            req = TrainRequest(
                weights=vec,
                model=kind,
                fold=fold,
                server_round=rnd,
                global_round=rnd,
                total_rounds=total,
                validate=check,
            )
            trained = messenger.send([node], TRAIN, req, dtype=dtype, validate=whole_model)
            if not trained:
                log.warning(
                    "cross-site: %s did not train its local %s fold %d round %d", site, kind, fold, rnd
                )
                break
            if pending is not None and check:
                best = _keep(best, trained[0].body.validation, pending[1])
            vec = np.asarray(trained[0].body.weights, dtype=np.float32)
            pending = (rnd, vec)
        if pending is not None:  # the last model trained: validated on its own
            rnd, last = pending
            last_req = EvaluateRequest(
                weights=last, model=kind, fold=fold, server_round=rnd, global_round=rnd, total_rounds=total
            )
            answers = messenger.send([node], EVALUATE, last_req, dtype=dtype)
            best = _keep(best, answers[0].body.histogram if answers else None, last)
        return None if best is None else best[1]

    def models(
        self, kind: ModelKind, selected: dict[int, dict[str, Any]]
    ) -> dict[str, dict[int, np.ndarray]]:
        """The selected global fold models and every training site's local-only ones."""
        folds = list(self.cfg.active_folds)
        models: dict[str, dict[int, np.ndarray]] = {GLOBAL: {}}
        for k in folds:
            if k in selected:
                models[GLOBAL][k] = self.ckpt.load(kind, k, int(selected[k]["round"]))
        for node, site in self.registry.nodes(ROLE_TRAIN).items():
            for k in folds:
                vec = self.train_local(kind, k, node, site)
                if vec is not None:
                    models.setdefault(local_name(site), {})[k] = vec
        return models

    def run(self, kind: ModelKind, selected: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Train the local models, evaluate every model at every site, return the matrix."""
        dtype = self.cfg.federation.transport_dtype
        models = self.models(kind, selected)
        hists: dict[str, dict[str, ClassHistogram]] = {}
        for name, per_fold in models.items():
            for k, vec in sorted(per_fold.items()):
                for role in (ROLE_TRAIN, ROLE_EXTERNAL):
                    nodes = list(self.registry.nodes(role))
                    if not nodes:
                        continue
                    req = CrossSiteRequest(
                        weights=vec, model=kind, fold=k, role=role, name=name, folds=sorted(per_fold)
                    )
                    for a in self.messenger.send(nodes, CROSSSITE, req, dtype=dtype):
                        per = hists.setdefault(name, {})
                        per[a.site] = per[a.site] + a.body.histogram if a.site in per else a.body.histogram
        sites = sorted({s.site for s in self.registry.sites.values()})
        matrix: dict[str, dict[str, Any]] = {}
        for name in models:
            row: dict[str, Any] = {}
            for site in sites:
                found = hists.get(name, {}).get(site)
                if found is None:
                    continue
                ci = auc_ci(found).to_dict()
                row[site] = {"auc": ci["auc"], "auc_ci": ci["ci"], "n": found.n, "n_pos": found.n_pos}
            matrix[name] = row
        log.info("cross-site evaluation of %s: %d models x %d sites", kind, len(models), len(sites))
        return {
            "model": kind,
            "folds": list(self.cfg.active_folds),
            "models": list(models),
            "sites": sites,
            "roles": {s.site: s.role for s in self.registry.sites.values()},
            "matrix": matrix,
        }
