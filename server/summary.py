"""The run's ``summary.json`` and pooled statistics: what the report and the bundle read.

Aggregate figures only: pooled metrics per score and subset, the selected
rounds, who took part in each round, the privacy budget spent, the bytes each
site sent and received.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.atomicfile import write_atomic
from common.clinical import clinical_summary
from common.config import ExperimentConfig
from common.environment import environment
from common.gridstats import ClassHistogram, pooled_metrics
from common.protocol import histograms_to_arrays

from .meteredgrid import MeteredGrid
from .registry import SiteRegistry
from .runfiles import SUMMARY_NAME

log = logging.getLogger(__name__)



class SummaryWriter:
    """Builds and writes a run folder's summary and statistics."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir

    @property
    def path(self) -> Path:
        return self.run_dir / SUMMARY_NAME

    def write(self, summary: dict[str, Any]) -> Path:
        # atomically: the launching command starts on the report when this file appears
        write_atomic(self.path, json.dumps(summary, indent=2))
        log.info("summary written to %s", self.path)
        return self.path

    def privacy(self, participation: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        """Epsilon spent per site (the last value reported in each model/fold), when DP is on."""
        if not self.cfg.dp.enabled:
            return {"enabled": False}
        per: dict[str, dict[str, float]] = {}
        for key, logs in participation.items():
            for rlog in logs:
                for site, eps in rlog.get("epsilon", {}).items():
                    per.setdefault(site, {})[key] = eps
        return {
            "enabled": True,
            "delta": self.cfg.dp.delta,
            "target_epsilon": self.cfg.dp.target_epsilon or None,
            "noise_multiplier": None if self.cfg.dp.target_epsilon else self.cfg.dp.noise_multiplier,
            "max_grad_norm": self.cfg.dp.max_grad_norm,
            "epsilon": per,
            "max_epsilon": {site: max(v.values()) for site, v in per.items()},
        }

    def clinical(
        self,
        final: dict[str, dict[str, ClassHistogram]],
        site_hists: dict[str, dict[str, dict[str, ClassHistogram]]],
    ) -> dict[str, Any]:
        """Operating thresholds, calibration and per-centre results (``common.clinical``) for the summary."""
        ev = self.cfg.evaluation
        return clinical_summary(final, site_hists, ev.threshold, ev.calibration_bins)

    def save_statistics(self, final: dict[str, dict[str, ClassHistogram]]) -> Path:
        """Pooled grid statistics (never per patient) for the report: ``stats/final.npz``."""
        path = self.run_dir / "stats" / "final.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = histograms_to_arrays(
            {(score, subset): h for score, subsets in final.items() for subset, h in subsets.items()}
        )
        np.savez_compressed(path, **flat)  # type: ignore[arg-type]
        return path

    def models(
        self,
        final: dict[str, dict[str, ClassHistogram]],
        fitted: dict[str, dict[str, Any]],
        thresholds: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        """Pooled metrics per score: internal (per fold, pooled over folds) and external.

        ``thresholds``: each score's operating threshold chosen on validation (else the fixed one).
        """
        models: dict[str, Any] = {}
        for score, subsets in final.items():
            thr = (thresholds or {}).get(score, self.cfg.evaluation.fixed_threshold)
            folds = sorted((s for s in subsets if s.startswith("fold")), key=lambda s: int(s[4:]))
            entry: dict[str, Any] = {}
            if folds:
                pooled = ClassHistogram.aggregate(subsets[s] for s in folds)
                fold_m = [pooled_metrics(subsets[s], thr).to_dict() for s in folds]
                aucs = [m["auc"] for m in fold_m if m["auc"] is not None]
                entry["internal"] = {
                    "pooled": pooled_metrics(pooled, thr).to_dict(),
                    "folds": fold_m,
                    "fold_mean_auc": float(np.mean(aucs)) if aucs else None,
                }
            if "external" in subsets:
                entry["external"] = {"pooled": pooled_metrics(subsets["external"], thr).to_dict()}
            if score in fitted:
                entry["weights"] = dict(zip(fitted[score]["members"], fitted[score]["weights"], strict=True))
                entry["val_auc"] = fitted[score]["val_auc"]
            models[score] = entry
        return models

    def summary(
        self,
        final: dict[str, dict[str, ClassHistogram]],
        fitted: dict[str, dict[str, Any]],
        seconds: float,
        *,
        registry: SiteRegistry,
        selected: dict[str, dict[int, dict[str, Any]]],
        participation: dict[str, list[dict[str, Any]]],
        grid: MeteredGrid,
        thresholds: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        sites = registry.sites
        return {
            "plan": self.cfg.plan,
            "config": self.cfg.name,
            "config_digest": self.cfg.digest(),
            "seed": self.cfg.seed,
            "train_seed": self.cfg.train.seed,
            "environment": {
                "server": environment(),
                "sites": {s.site: s.environment for s in sorted(sites.values(), key=lambda s: s.site)},
            },
            "sites": {
                s.site: {"role": s.role, "patients": s.patients, "benign": s.benign, "malignant": s.malignant}
                for s in sites.values()
            },
            "unavailable_sites": registry.unavailable,
            "devices": {s.site: s.device for s in sorted(sites.values(), key=lambda s: s.site)},
            "models": self.models(final, fitted, thresholds),
            "selection": {k: {str(f): v for f, v in d.items()} for k, d in selected.items()},
            "rounds": participation,
            "privacy": self.privacy(participation),
            "communication": {
                s.site: {
                    "bytes_sent": int(grid.received.get(n, 0)),
                    "bytes_received": int(grid.sent.get(n, 0)),
                    "by_message_type": grid.traffic(n),
                }
                for n, s in sites.items()
            },
            "wall_seconds": round(seconds, 1),
        }
