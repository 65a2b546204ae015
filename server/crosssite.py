"""Cross-site evaluation (``evaluation.cross_site``): every site's local-only model and the global model, everywhere.

For each active fold, each training site trains a model on its own fold
training patients only (the same rounds, local epochs and seeds as the
federation, through the ordinary ``train`` and ``evaluate`` messages, under
a separate run id so the site keeps its federated state apart); the round
with the best validation AUC at that site is kept, as the federation keeps
the best pooled one.  Then each model (the selected global fold model and
every local one) goes to every site, which returns the grid histogram of its
fold test patients, summed over folds (each patient is in one test set); an
external site scores all its patients with every fold model and answers
the histogram of the fold-averaged probabilities, as in the main
evaluation.  The result is a model x site matrix of AUCs with DeLong CIs, each
patient counted once.  Weights travel; patients never.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import MessageType

from common.clinical import auc_ci
from common.gridstats import ClassHistogram, auc
from common.models import ModelKind
from common.records import arrays_from_record, weights_from_record, weights_record

if TYPE_CHECKING:
    from .runner import PlanRunner

log = logging.getLogger(__name__)

GLOBAL = "global"


def local_name(site: str) -> str:
    return f"local:{site}"


def _train_local(runner: PlanRunner, kind: ModelKind, fold: int, node: int, site: str) -> np.ndarray | None:
    """Rounds at one site only; the vector of its best validation round (None if the site never answered)."""
    total = runner.cfg.train.rounds
    dtype = runner.cfg.federation.transport_dtype
    vec = runner.initial_vector(kind)
    best: tuple[float, np.ndarray] | None = None
    extra: dict[str, Any] = {
        "model": kind,
        "fold": fold,
        "total-rounds": total,
        "run-id": f"{runner.run_id}-local-{site}",
    }
    for rnd in range(1, total + 1):
        step = {**extra, "global-round": rnd, "server-round": rnd}
        replies = runner._send([node], str(MessageType.TRAIN), step, weights_record(vec, dtype))
        if not replies:
            log.warning("cross-site: %s did not train its local %s fold %d round %d", site, kind, fold, rnd)
            break
        vec = weights_from_record(replies[0].content.array_records["arrays"])
        score = -math.inf
        for r in runner._send([node], str(MessageType.EVALUATE), step, weights_record(vec, dtype)):
            a = auc(ClassHistogram.from_arrays(arrays_from_record(r.content.array_records["stats"])))
            score = a if math.isfinite(a) else -math.inf
        if best is None or score > best[0]:
            best = (score, vec)
    return None if best is None else best[1]


def cross_site_evaluation(runner: PlanRunner, kind: ModelKind) -> dict[str, Any]:
    """The model x site AUC matrix of ``kind`` for ``summary.json`` (``cross_site``)."""
    dtype = runner.cfg.federation.transport_dtype
    folds = list(runner.cfg.active_folds)
    train, external = runner._nodes("train"), runner._nodes("external")
    models: dict[str, dict[int, np.ndarray]] = {GLOBAL: {}}
    for k in folds:
        best = runner.selected.get(kind, {}).get(k)
        if best is not None:
            models[GLOBAL][k] = runner.ckpt.load(kind, k, int(best["round"]))
    for node, site in train.items():
        for k in folds:
            vec = _train_local(runner, kind, k, node, site)
            if vec is not None:
                models.setdefault(local_name(site), {})[k] = vec
    hists: dict[str, dict[str, ClassHistogram]] = {}
    for name, per_fold in models.items():
        for k, vec in sorted(per_fold.items()):
            for role, nodes in (("train", train), ("external", external)):
                if not nodes:
                    continue
                # external sites average the fold models (answering after the last fold), as the main evaluation
                extra = {"model": kind, "fold": k, "role": role, "name": name, "folds": sorted(per_fold)}
                for r in runner._send(
                    list(nodes), f"{MessageType.EVALUATE}.crosssite", extra, weights_record(vec, dtype)
                ):
                    node = r.metadata.src_node_id
                    site = runner.sites[node].site if node in runner.sites else f"node-{node}"
                    try:
                        h = ClassHistogram.from_arrays(arrays_from_record(r.content.array_records["stats"]))
                        per = hists.setdefault(name, {})
                        per[site] = per[site] + h if site in per else h
                    except (KeyError, ValueError) as exc:
                        log.warning(
                            "cross-site: %s's statistics for %s fold %d dropped: %s", site, name, k, exc
                        )
    sites = sorted({s.site for s in runner.sites.values()})
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
        "folds": folds,
        "models": list(models),
        "sites": sites,
        "roles": {s.site: s.role for s in runner.sites.values()},
        "matrix": matrix,
    }
