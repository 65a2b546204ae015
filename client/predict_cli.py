"""The ``flower-client predict`` command: patients in, answers printed and written out.

:class:`client.predict.Predictor` computes one patient's answer; this module
reads the patients (one pair of files or a manifest CSV), prints each answer as
a radiologist reads it, writes one JSON per patient and, for a batch, one CSV
table, and keeps going past a patient that cannot be predicted.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common.bundle import BundleError, ModelBundle, read_bundle
from common.engine import set_threads
from common.signing import load_public_key

from .predict import PatientInput, Prediction, PredictionError, Predictor, safe_name

LABELS = {"densenet3d": "3D DenseNet", "densenet2d": "2D DenseNet", "radiologist": "radiologist"}
CSV_FIELDS = (
    "patient_id",
    "probability",
    "answered_by",
    "densenet3d",
    "densenet2d",
    "radiologist_score",
    "radiologist",
    "heatmap",
    "png",
    "seconds",
    "cpu_seconds",
    "error",
)


# ---------------------------------------------------------------- batch input


def read_patient_list(path: Path) -> tuple[list[PatientInput], list[str]]:
    """Patients of a manifest CSV (the site format, or just ``patient_id,image,mask[,radiologist_score]``).

    Paths are relative to the CSV's folder; ``label`` and other columns are
    ignored.  Returns the patients and one message per unusable row (the
    other rows are still predicted).
    """
    try:
        with Path(path).open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise PredictionError(f"{path}: cannot read the patient list ({exc})") from exc
    missing = [c for c in ("patient_id", "image", "mask") if c not in header]
    if missing:
        raise PredictionError(f"{path}: missing column(s) {missing} (needs patient_id, image, mask)")
    base = Path(path).parent
    patients: list[PatientInput] = []
    problems: list[str] = []
    for line, row in enumerate(rows, start=2):
        pid, score_s = row["patient_id"], row.get("radiologist_score", "")
        if not pid:
            problems.append(f"{path}: line {line}: empty patient_id")
            continue
        try:
            score = int(score_s) if score_s else None
        except ValueError:
            problems.append(
                f"{path}: line {line}: patient {pid}: radiologist_score {score_s!r} is not an integer 1-9"
            )
            continue
        patients.append(PatientInput(pid, base / row["image"], base / row["mask"], score))
    return patients, problems


# ---------------------------------------------------------------- printing and the CLI


def describe(pred: Prediction, bundle: ModelBundle, where: str = "CPU") -> str:
    """The answer as a radiologist reads it (``where``: the device that computed it)."""
    lines = [f"patient {pred.patient_id}"]
    for kind in bundle.kinds:
        n = len(pred.fold_probabilities[kind])
        lines.append(f"  {LABELS[kind]:<28s} {pred.probabilities[kind]:.3f}   (mean of {n} fold models)")
    if pred.radiologist_score is not None:
        lines.append(
            f"  {'radiologist score ' + str(pred.radiologist_score):<28s} {pred.probabilities['radiologist']:.3f}   (score mapping)"
        )
    for spec in bundle.ensembles:
        if spec.name in pred.probabilities:
            mark = "  <- used" if spec.name == pred.answered_by else ""
            auc = "-" if spec.val_auc is None else f"{spec.val_auc:.3f}"
            lines.append(
                f"  {spec.name:<28s} {pred.probabilities[spec.name]:.3f}   ({spec.describe()}; validation AUC {auc}){mark}"
            )
    threshold = bundle.threshold_for(pred.answered_by)
    side = "malignant" if pred.probability >= threshold else "benign"
    lines.append(
        f"  probability of malignancy: {pred.probability:.3f} from {pred.answered_by} "
        f"({side} side of the operating threshold {threshold:.3f})"
    )
    if pred.heatmap is not None:
        lines.append(f"  heatmap ({pred.cam_layer}): {pred.heatmap}  key slices: {pred.png}")
    lines += [f"  {w}" for w in pred.warnings]
    lines.append(
        f"  time: {pred.seconds:.2f} s on {where} ({pred.cpu_seconds:.2f} s of CPU time, {torch.get_num_threads()} threads)"
    )
    return "\n".join(lines)


def _write_json(pred: Prediction, bundle: ModelBundle, out_dir: Path) -> Path:
    path = out_dir / f"{safe_name(pred.patient_id)}_prediction.json"
    meta = {
        "bundle": str(bundle.path),
        "bundle_files": bundle.manifest.get("files"),
        "source": bundle.manifest.get("source"),
        "threshold": bundle.threshold_for(pred.answered_by),
        "malignant": pred.probability >= bundle.threshold_for(pred.answered_by),
    }
    path.write_text(json.dumps({**pred.to_dict(), **meta}, indent=2))
    return path


def _csv_row(pid: str, pred: Prediction | None, error: str = "") -> dict[str, str]:
    if pred is None:
        return {f: "" for f in CSV_FIELDS} | {"patient_id": pid, "error": error.replace("\n", " | ")}
    p = pred.probabilities
    return {
        "patient_id": pid,
        "probability": f"{pred.probability:.6f}",
        "answered_by": pred.answered_by,
        "densenet3d": f"{p['densenet3d']:.6f}" if "densenet3d" in p else "",
        "densenet2d": f"{p['densenet2d']:.6f}" if "densenet2d" in p else "",
        "radiologist_score": "" if pred.radiologist_score is None else str(pred.radiologist_score),
        "radiologist": f"{p['radiologist']:.6f}" if "radiologist" in p else "",
        "heatmap": str(pred.heatmap) if pred.heatmap else "",
        "png": str(pred.png) if pred.png else "",
        "seconds": f"{pred.seconds:.2f}",
        "cpu_seconds": f"{pred.cpu_seconds:.2f}",
        "error": "",
    }


def _patients(args: argparse.Namespace) -> tuple[list[PatientInput], list[str]]:
    if args.manifest or args.site:
        return read_patient_list(Path(args.manifest) if args.manifest else Path(args.site) / "manifest.csv")
    if not (args.image and args.mask):
        raise PredictionError("give --image and --mask (one patient), or --manifest / --site (a batch)")
    image = Path(args.image)
    pid = args.patient_id or re.sub(r"\.nii(\.gz)?$", "", image.name)
    return [PatientInput(pid, image, Path(args.mask), args.radiologist_score)], []


def predict_cli(args: argparse.Namespace) -> int:
    """Handler of ``flower-client predict``: 0 when every patient was predicted, 1 otherwise, 2 on bad usage."""
    set_threads(args.threads)
    try:
        patients, problems = _patients(args)
        t0 = time.perf_counter()
        bundle = read_bundle(Path(args.bundle), load_public_key(Path(args.trusted_key)))
        predictor = Predictor(
            bundle,
            ensemble=args.ensemble,
            heatmap=not args.no_heatmap,
            cam_layer=args.cam_layer,
            device=getattr(args, "device", "auto"),
        )
    except (PredictionError, BundleError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = bundle.manifest.get("source", {})
    print(
        f"bundle {bundle.path} (run {src.get('run')}, plan {src.get('plan')}, sacral-fl {bundle.manifest.get('project_version')}) loaded in {time.perf_counter() - t0:.1f} s"
    )
    rows: list[dict[str, str]] = []
    done: list[Prediction] = []
    failed = list(problems)
    for patient in patients:
        try:
            pred = predictor.predict(patient, out_dir)
        except PredictionError as exc:
            failed.append(str(exc))
            rows.append(_csv_row(patient.patient_id, None, str(exc)))
            print(
                f"patient {patient.patient_id}: NOT PREDICTED\n  {str(exc).replace(chr(10), chr(10) + '  ')}",
                file=sys.stderr,
            )
            continue
        done.append(pred)
        rows.append(_csv_row(patient.patient_id, pred))
        _write_json(pred, bundle, out_dir)
        rt = predictor.runtime
        print(describe(pred, bundle, "CPU" if not rt.is_cuda else f"{rt.device} ({rt.name})"), flush=True)
    if len(patients) > 1 or args.manifest or args.site:
        table = out_dir / "predictions.csv"
        with table.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        mean = (
            f"{np.mean([p.seconds for p in done]):.2f} s per patient, {np.mean([p.cpu_seconds for p in done]):.2f} s of CPU time"
            if done
            else "-"
        )
        print(
            f"{len(done)} of {len(patients) + len(problems)} patients predicted ({mean} on "
            f"{'CPU' if not predictor.runtime.is_cuda else predictor.runtime.device}); table: {table}"
        )
    for msg in problems:
        print(f"not predicted: {msg}", file=sys.stderr)
    return 0 if not failed else 1
