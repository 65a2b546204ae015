"""Pooled and local-only baselines, through the same engine, folds and metrics.

*Pooled* trains on all training sites' patients centrally (the ceiling a
federation tries to reach); *local-only* trains each site alone.  Both use
each site's own patient-level folds (the same function and seed as the
federated client), so fold ``k`` of the pool is the union of the sites'
folds ``k``, and the epoch budget equals the federation's
``rounds x local_epochs``.  The radiomics baseline runs beside them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import radiomics
from common.config import ExperimentConfig
from common.dataset import preprocess_site
from common.device import for_config
from common.engine import predict, set_threads
from common.foldcalibration import IDENTITY, apply_platt, fit_platt
from common.gridstats import ClassHistogram, ScoreGrid
from common.metrics import binary_metrics
from common.models import ModelKind, build_model
from common.seeding import seed_everything
from common.selection import fit_select
from common.sitearrays import SiteArrays
from common.splits import Fold, fivefold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    name: str
    role: str
    arrays: SiteArrays
    folds: tuple[Fold, ...]


def load_sites(cfg: ExperimentConfig, cache_dir: Path) -> list[SiteData]:
    """Preprocess (cached) every configured site and build its folds exactly as a client does."""
    out = []
    for s in cfg.sites:
        arrays = preprocess_site(Path(s.data_dir), cfg.preprocess, cache_dir, site=s.name)
        folds = fivefold(list(arrays.patient_ids), list(arrays.labels), folds=cfg.folds, val_fraction=cfg.val_fraction, seed=cfg.seed)
        out.append(SiteData(s.name, s.role, arrays, folds))
    return out


def _fold_indices(sites: Sequence[SiteData], pooled: SiteArrays, k: int) -> dict[str, list[int]]:
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for sd in sites:
        fold = sd.folds[k]
        for split in parts:
            ids = [f"{sd.name}/{p}" for p in getattr(fold, split)]
            parts[split] += [int(i) for i in pooled.indices_of(ids)]
    return parts


def _prefixed(sd: SiteData) -> SiteArrays:
    """Site arrays with ``site/patient`` ids, so pools never collide on patient ids."""
    import dataclasses

    return dataclasses.replace(sd.arrays, patient_ids=tuple(f"{sd.name}/{p}" for p in sd.arrays.patient_ids))


def evaluate_setting(
    cfg: ExperimentConfig,
    train_sites: Sequence[SiteData],
    external: Sequence[SiteData],
    models: Sequence[str],
    test_scores: dict[str, list[tuple[np.ndarray, np.ndarray]]] | None = None,
) -> dict[str, Any]:
    """Fivefold training on ``train_sites`` pooled; internal test per fold and pooled; external averaged.

    ``test_scores``, when given, receives every model's (labels, probabilities) of the
    internal test patients, so local-only models can be scored over all sites at once.
    """
    pool = SiteArrays.concat([_prefixed(s) for s in train_sites], site="+".join(s.name for s in train_sites))
    ext = SiteArrays.concat([_prefixed(s) for s in external], site="external") if external else None
    thr = cfg.evaluation.fixed_threshold
    result: dict[str, Any] = {}
    for name in models:
        # a network's own rounds and selection window, as in the federation (radiomics has neither)
        mcfg = cfg if name == "radiomics" else cfg.for_model(name)
        epochs = mcfg.train.rounds * mcfg.train.local_epochs
        first_epoch = (mcfg.evaluation.select_from_round - 1) * mcfg.train.local_epochs + 1  # the round's first epoch
        y_all, p_all, fold_metrics, val_metrics, selection, p_raw = [], [], [], [], [], []
        ext_probs = []
        for k in cfg.active_folds:
            idx = _fold_indices(train_sites, pool, k)
            if name == "radiomics":
                lr = radiomics.fit(pool, idx["train"], seed=cfg.seed)
                p_test = radiomics.predict(lr, pool, idx["test"])
                if ext is not None:
                    ext_probs.append(radiomics.predict(lr, ext, range(len(ext))))
            else:
                kind: ModelKind = name  # type: ignore[assignment]
                seed_everything(cfg.train.seed)
                model = build_model(kind, getattr(cfg.models, kind), mask_channel=cfg.preprocess.mask_channel)
                sel = fit_select(model, pool, idx["train"], idx["val"], kind, mcfg, epochs=epochs, seed=cfg.train.seed + k, desc=f"{pool.site} {kind} f{k}", first_epoch=first_epoch)
                model.load_state_dict(sel.state)
                y_val = pool.labels[idx["val"]]
                p_val = predict(model, pool, idx["val"], kind, cfg)
                val_metrics.append(binary_metrics(y_val, p_val, thr).to_dict())
                # as the federation: Platt scaling on the fold's validation scores (same grid)
                platt = fit_platt(ClassHistogram.from_scores(y_val, p_val, ScoreGrid(cfg.evaluation.grid_bins))) if cfg.evaluation.calibrate_folds else IDENTITY
                selection.append({"fold": k, "best_epoch": sel.best_epoch, "val_aucs": [None if math.isnan(a) else round(a, 4) for a in sel.val_aucs], "seconds": round(sel.seconds, 1), "platt": list(platt)})
                log.info("%s %s fold %d: best epoch %d, val AUCs %s", pool.site, kind, k, sel.best_epoch, [None if math.isnan(a) else round(a, 3) for a in sel.val_aucs])
                p_raw.append(predict(model, pool, idx["test"], kind, cfg))
                p_test = apply_platt(p_raw[-1], platt)
                if ext is not None:
                    ext_probs.append(apply_platt(predict(model, ext, range(len(ext)), kind, cfg), platt))
            y_test = pool.labels[idx["test"]]
            fold_metrics.append(binary_metrics(y_test, p_test, thr).to_dict())
            y_all.append(y_test)
            p_all.append(p_test)
        aucs = [m["auc"] for m in fold_metrics if m["auc"] is not None]
        entry: dict[str, Any] = {
            "internal": {
                "pooled": binary_metrics(np.concatenate(y_all), np.concatenate(p_all), thr).to_dict(),
                "folds": fold_metrics,
                "fold_mean_auc": float(np.mean(aucs)) if aucs else None,
            }
        }
        if ext is not None and ext_probs:
            entry["external"] = {"pooled": binary_metrics(ext.labels, np.mean(ext_probs, axis=0), thr).to_dict()}
        if cfg.evaluation.calibrate_folds and p_raw:
            raw = binary_metrics(np.concatenate(y_all), np.concatenate(p_raw), thr).auc
            entry["internal"]["pooled_auc_uncalibrated"] = None if np.isnan(raw) else float(raw)
        if selection:
            entry["selection"] = selection
            entry["validation"] = {"folds": val_metrics}  # each fold's selected model on its validation split
        result[name] = entry
        if test_scores is not None:
            test_scores.setdefault(name, []).append((np.concatenate(y_all), np.concatenate(p_all)))
    return result


def run_baselines(cfg: ExperimentConfig, cache_dir: Path, *, pooled: bool = True, local: bool = True, models: Sequence[str] | None = None) -> dict[str, Any]:
    """The pooled and/or local-only baselines of ``cfg`` (sites and roles already resolved)."""
    set_threads(max(cfg.train.threads, 1) if cfg.train.threads > 0 else 0)
    device = for_config(cfg).describe()  # the engine's device, checked before any preprocessing
    sites = load_sites(cfg, cache_dir)
    train_sites = [s for s in sites if s.role == "train"]
    external = [s for s in sites if s.role == "external"]
    if models is None:
        models = list(cfg.networks)
        if cfg.models.radiomics:
            models = [*models, "radiomics"]
    out: dict[str, Any] = {"device": device}
    if pooled:
        out["pooled"] = evaluate_setting(cfg, train_sites, external, models)
    if local:
        scores: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        out["local"] = {s.name: evaluate_setting(cfg, [s], external, models, scores) for s in train_sites}
        # each site's own models on its own test patients, scored over all sites: the figure
        # comparable with the federated and pooled internal AUC (the mean of per-site AUCs is not)
        out["local_pooled"] = {
            name: {"internal": {"pooled": binary_metrics(
                np.concatenate([y for y, _ in parts]), np.concatenate([p for _, p in parts]), cfg.evaluation.fixed_threshold
            ).to_dict()}}
            for name, parts in scores.items()
        }
        for name in models:
            aucs = [out["local"][s.name][name]["internal"]["pooled"]["auc"] for s in train_sites]
            aucs = [a for a in aucs if a is not None]
            out.setdefault("local_mean", {})[name] = {"internal_auc": float(np.mean(aucs)) if aucs else None}
    return out
