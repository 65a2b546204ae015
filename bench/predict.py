"""What predicting new patients with the full ensemble costs on CPU: ``flower-client predict``, timed.

The full ensemble is every fold model of both networks (3D and 2D
DenseNet121, probabilities averaged over folds) and the radiologist's
score, fused with the fitted weights, as ``flower-client predict`` applies
it from a model bundle, with its Grad-CAM overlay.  The bundle is exported
(``server.bundle.export_bundle``) from the latest finished ``make simulate``
run when there is one; otherwise from a run folder holding the quick
preset's fold models at their initial weights (timing only: the cost does
not depend on the weights, and the report says which was used).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

BIN = Path(sys.executable).parent


def timing_run(run_dir: Path) -> Path:
    """A run folder with the quick preset's fold models at initialisation and equal ensemble weights."""
    from common.config import NETWORKS, to_dict
    from common.configfile import load_config
    from common.ensemble import ENSEMBLES
    from server.checkpoints import CheckpointStore
    from server.training import initial_vector

    cfg = load_config("quick")
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    store = CheckpointStore(run_dir / "checkpoints", cfg.digest())
    for kind in NETWORKS:
        vector = initial_vector(cfg, kind)
        for fold in cfg.active_folds:
            store.save(kind, fold, 1, vector, {"val_auc": None})
            store.select_best(kind, fold)
    models = {
        name: {"weights": {m: 1 / len(members) for m in members}} for name, members in ENSEMBLES.items()
    }
    summary = {"plan": cfg.plan, "config": cfg.name, "config_digest": cfg.digest(), "models": models}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def bundle_for(run_dir: Path | None, work: Path, bundles: Path) -> tuple[Path, str]:
    """The bundle to time and what it holds; exported once and kept in ``bundles`` (not part of the timing)."""
    from common.bundle import BundleError
    from common.configfile import load_config
    from server.bundle import export_bundle

    bundles.mkdir(parents=True, exist_ok=True)
    if run_dir is not None:
        path = bundles / f"{run_dir.name}.zip"
        try:
            if not path.is_file():
                export_bundle(run_dir, path, bundles / "signing.key")
            return path, f"selected fold models of {run_dir.name}"
        except BundleError as exc:
            why = f"untrained fold models ({run_dir.name} cannot be bundled: {exc})"
    else:
        why = "untrained fold models (no finished make simulate run)"
    path = bundles / f"untrained-quick-{load_config('quick').digest()}.zip"
    if not path.is_file():
        export_bundle(timing_run(work / "timing-run"), path, bundles / "signing.key")
    return path, why


def time_prediction(run_dir: Path | None, work: Path, patients_dir: Path, bundles: Path) -> dict[str, Any]:
    """Run ``flower-client predict --site patients_dir`` with the bundle of ``run_dir`` (or a timing run)."""
    bundle, source = bundle_for(run_dir, work, bundles)
    out = work / "predictions"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        str(BIN / "flower-client"),
        "predict",
        "--bundle",
        str(bundle),
        "--trusted-key",
        str(bundle.parent / "signing.key.pub"),
        "--site",
        str(patients_dir),
        "--out",
        str(out),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    with (out / "predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    seconds = [float(r["seconds"]) for r in rows if r["seconds"]]
    answered = sorted({r["answered_by"] for r in rows if r["answered_by"]})
    return {
        "tool": "flower-client predict (heatmaps on, the default)",
        "models": source,
        "answered_by": answered,
        "patients": len(seconds),
        "threads": os.cpu_count() or 1,
        "per_patient_s": sum(seconds) / max(len(seconds), 1),
        "first_patient_s": seconds[0] if seconds else None,
        "command_wall_s": wall,
        "startup_s": wall - sum(seconds),
        "bundle_mb": bundle.stat().st_size / 1e6,
    }
