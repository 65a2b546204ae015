"""Export a finished run as a model bundle (``flower-server bundle RUN_DIR --out FILE``).

Reads what the plan wrote in the run folder: ``config.yaml`` (the config
the run was trained under; its digest must match the checkpoints and the
summary), ``checkpoints/<model>_fold<k>/selected.json`` and the selected
round's packed vector, and ``summary.json`` (ensemble weights, pooled
metrics).  The format itself is ``common.bundle``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.bundle import BundleError, EnsembleSpec, FoldModel, write_bundle
from common.config import ConfigError, ExperimentConfig
from common.configfile import load_config
from common.ensemble import ENSEMBLES
from common.foldcalibration import IDENTITY
from common.models import build_model
from common.records import ModelCodec
from common.signing import SigningKeyError, create_signing_key, load_private_key

from .checkpoints import CheckpointError, CheckpointStore
from .foldguard import selection_problem

log = logging.getLogger(__name__)


def export_bundle(run_dir: Path, out: Path, signing_key: Path) -> Path:
    """Write the bundle of the finished run in ``run_dir`` to ``out``, signed; raises ``BundleError``.

    ``signing_key``: the coordinating site's Ed25519 private key (PEM); a
    missing file is created (mode 0600) with its public key next to it
    (``<key>.pub``), which the hospitals need to verify the bundle.
    """
    run_dir = Path(run_dir)
    key = _signing_key(Path(signing_key))
    cfg = _run_config(run_dir)
    summary = _summary(run_dir)
    _check_bundleable(run_dir, cfg, summary)
    models = _fold_models(run_dir, cfg)
    scores = summary.get("models", {})
    metrics = {
        name: {
            subset: {k: v for k, v in part.items() if k != "folds"}
            for subset, part in entry.items()
            if subset in ("internal", "external")
        }
        for name, entry in scores.items()
    }
    source = {
        "run": run_dir.resolve().name,
        "plan": summary.get("plan"),
        "config_digest": cfg.digest(),
        "sites": summary.get("sites", {}),
    }
    # The bundle travels to other hospitals: the training sites' folders stay out of it.
    portable = dataclasses.replace(cfg, sites=(), external_sites=())
    thresholds = {k: float(v["threshold"]) for k, v in (summary.get("thresholds") or {}).items()}
    ensembles = _ensembles(scores)
    path = write_bundle(
        out,
        config=portable,
        models=models,
        ensembles=ensembles,
        metrics=metrics,
        source=source,
        signing_key=key,
        thresholds=thresholds,
    )
    log.info(
        "bundle of %s written to %s (%d fold models, %d ensembles)",
        run_dir,
        path,
        len(models),
        len(ensembles),
    )
    return path


def _check_bundleable(run_dir: Path, cfg: ExperimentConfig, summary: dict[str, Any]) -> None:
    """Refuse a run that has no one complete model set, or whose folder mixes two runs."""
    if summary.get("plan") == "loco":
        raise BundleError(
            f"{run_dir}: a leave-one-centre-out run holds one model set per held-out site; "
            "bundle a federated or study run"
        )
    if cfg.federation.strategy == "fedbn":
        raise BundleError(
            f"{run_dir}: trained with FedBN, so the global model has no normalisation layers "
            "(each site kept its own): there is no complete model to bundle"
        )
    if summary.get("config_digest") != cfg.digest():
        raise BundleError(
            f"{run_dir}: summary.json was written under config {summary.get('config_digest')}, "
            f"config.yaml is {cfg.digest()}: the folder mixes two runs"
        )


def _fold_models(run_dir: Path, cfg: ExperimentConfig) -> list[tuple[FoldModel, dict[str, np.ndarray]]]:
    """Each enabled network's selected model of every fold, with its calibration and guard flag."""
    store = CheckpointStore(run_dir / "checkpoints", cfg.digest())
    models = []
    for kind in cfg.networks:
        model_cfg = getattr(cfg.models, kind)
        codec = ModelCodec.for_state_dict(
            build_model(
                kind,
                dataclasses.replace(model_cfg, pretrained=False),
                mask_channel=cfg.preprocess.mask_channel,
            ).state_dict()
        )
        for fold in cfg.active_folds:
            selected = store.finished(kind, fold)
            if selected is None:
                raise BundleError(
                    f"{run_dir}: {kind} fold {fold} has no selected round (the run did not finish it)"
                )
            try:
                vector = store.load(kind, fold, int(selected["round"]))
            except (CheckpointError, OSError) as exc:
                raise BundleError(f"{run_dir}: {kind} fold {fold}: {exc}") from exc
            tensors = {k: v.numpy() for k, v in codec.unpack(vector).items()}
            val_auc = selected.get("val_auc")
            platt = store.meta(kind, fold, int(selected["round"])).get("platt")
            fm = FoldModel(
                kind,
                fold,
                int(selected["round"]),
                None if val_auc is None else float(val_auc),
                f"models/{kind}_fold{fold}.npz",
                (float(platt[0]), float(platt[1])) if platt else IDENTITY,
                selection_problem(None if val_auc is None else float(val_auc)) or "",
            )
            models.append((fm, tensors))
    if not models:
        raise BundleError(
            f"{run_dir}: no network was trained in this run (both densenet3d and densenet2d disabled)"
        )
    return models


def _ensembles(scores: dict[str, Any]) -> list[EnsembleSpec]:
    """The ensembles whose weights the run fitted, as the summary holds them."""
    ensembles = []
    for name, members in ENSEMBLES.items():
        entry = scores.get(name, {})
        if "weights" in entry:
            weights = tuple(float(entry["weights"][m]) for m in members)
            ensembles.append(EnsembleSpec(name, members, weights, entry.get("val_auc")))
    return ensembles


def _signing_key(path: Path) -> Ed25519PrivateKey:
    try:
        if not path.exists():
            _, public = create_signing_key(path)
            log.warning(
                "new bundle-signing key %s; give %s to the hospitals (flower-client predict --trusted-key)",
                path,
                public,
            )
        return load_private_key(path)
    except SigningKeyError as exc:
        raise BundleError(str(exc)) from exc


def _run_config(run_dir: Path) -> ExperimentConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise BundleError(f"{path}: not found: {run_dir} is not a run folder")
    try:
        return load_config(path)
    except ConfigError as exc:
        raise BundleError(str(exc)) from exc


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise BundleError(f"{path}: not found: the run has not finished (no ensemble weights or metrics yet)")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except ValueError as exc:
        raise BundleError(f"{path}: unreadable ({exc})") from exc
    return data
