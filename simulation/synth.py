"""Synthetic multicentre sacral-CT cohort shaped like the study (Yin et al.).

``generate_cohort`` writes one site folder per centre in the format of
``common.sitedata`` (manifest, int16 HU images, uint8 tumour masks, a reader
study) plus ``latent.csv`` (the ground truth a real study never has, kept
*outside* the site folders) and, last, ``cohort.json``: a folder without
``cohort.json`` is an interrupted generation.

The cohort is meant to be hard in the ways the real task is hard:

* **Latent evidence.**  Each patient has one malignancy evidence score
  e | y ~ N(d_e (y - 1/2), 1) (``readers.EVIDENCE_SEPARATION``); its AUC is
  the *oracle* (~0.945): labels are a noisy function of e (equivalently
  P(y=1 | e) = sigmoid(d_e e + log prior odds)), so no model can be perfect.
* **Overlapping visual features.**  Six visual features each follow e
  through their own noise (``FEATURE_NOISE``), so every single feature
  overlaps between classes and a model must combine them: margin (smooth
  vs lobulated and ragged), sclerotic rim (benign), cortex (intact expanded
  neo-cortex vs breached with a spiculated periosteal reaction), soft-tissue
  extension (a mass outside the bone carrying calcified fragments), zone of
  transition (narrow vs wide moth-eaten) and matrix pattern (calcified foci
  vs septa).  Texture scales are >= 2 mm so they survive the models' ~4 mm
  input grid.
* **Shape, not first-order statistics.**  Lesion size follows e only weakly;
  matrix density, the *amount* of mineralised matrix, the density of the
  neo-cortex, spicules and of the bone left in the moth-eaten zone, and where
  the reader drew the contour (``LesionParams.contour_mm``) are nuisances
  independent of the class.  So bright bone at the margin is there in both
  classes (a smooth ring vs radiating spicules) and the four handcrafted
  features (log ROI volume, ROI mean/SD HU, 2-voxel shell HU) reach only
  ~0.8 AUC with a logistic regression (recorded in ``cohort.json``).
* **Hidden clinical information.**  Humans also read a clinical variable the
  image does not show (``simulation.readers``), so radiologist and image model
  make partly independent errors and their fusion can beat both.
* **Centre effects.**  Each centre has its own HU calibration (offset, scale),
  noise, reconstruction blur, voxel spacing and slice thickness, field of
  view, stored axis orientation (undone by ``load_nifti``), demographics and
  class balance.

Everything is a deterministic function of ``seed`` (per-centre and
per-patient ``numpy`` seed sequences keyed by the centre *name*, so a centre
generated alone is identical to the same centre generated with the others).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
import math
import multiprocessing
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from common.atomicfile import write_atomic
from common.sitedata import MANIFEST, READER_COLUMNS, READER_STUDY
from simulation import anatomy, readers
from simulation.centres import CentreSpec, CohortError, default_centres
from simulation.cohortplan import (
    FEATURE_GAIN,
    FEATURE_NOISE,
    FEATURES,
    CentrePlan,
    PatientPlan,
    plan_centre,
    sigmoid,
)
from simulation.cohortstats import HANDCRAFTED, demographics, summarise

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "sacral-synth/1.0.0"
COHORT_JSON = "cohort.json"
LATENT_CSV = "latent.csv"
MANIFEST_COLUMNS = ("patient_id", "label", "image", "mask", "radiologist_score", "age", "sex")


# ---------------------------------------------------------------- volumes
def reorient(data: np.ndarray, affine: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray]:
    """RAS+ array/affine -> the same image stored with axis code ``code`` (e.g. 'LPS')."""
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    target = nib.orientations.axcodes2ornt(tuple(code.upper()))
    transform = nib.orientations.ornt_transform(ras, target)
    out = nib.orientations.apply_orientation(data, transform)
    return np.ascontiguousarray(out), affine @ nib.orientations.inv_ornt_aff(transform, data.shape)


def _nifti_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """A gzipped NIfTI-1 file as bytes (mtime 0, so equal arrays give equal files)."""
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def handcrafted_features(image: np.ndarray, mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """The four 'radiomics' a logistic regression gets: log ROI mL, ROI mean/SD HU, 2-voxel-shell mean HU."""
    roi = mask > 0
    if not roi.any():
        raise CohortError("empty ROI mask")
    idx = np.nonzero(roi)
    lo = [max(int(a.min()) - 3, 0) for a in idx]
    hi = [int(a.max()) + 4 for a in idx]
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub = roi[box]
    shell = ndi.binary_dilation(sub, iterations=2) & ~sub
    values = image[box].astype(np.float64)
    inside = values[sub]
    return {
        "log_roi_ml": float(math.log(sub.sum() * float(np.prod(spacing)) / 1000.0)),
        "roi_mean_hu": float(inside.mean()),
        "roi_sd_hu": float(inside.std()),
        "shell_mean_hu": float(values[shell].mean()),
    }


def render_patient(spec: CentreSpec, plan: PatientPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stored (int16 HU, uint8 mask, RAS+ affine) of one patient, RAS+ voxel order."""
    rng = np.random.default_rng(list(plan.render_seed))
    grid = spec.grid()
    try:
        scene = anatomy.render(grid, plan.anatomy, plan.lesion, rng)
    except ValueError as exc:
        raise CohortError(f"{spec.name}: patient {plan.patient_id}: {exc}") from exc
    image = anatomy.acquire(
        scene.hu, spec.spacing_mm, spec.blur_sigma_mm, spec.noise_sd, spec.hu_scale, spec.hu_offset, rng
    )
    return image, scene.mask, grid.affine()


def _make_patient(task: tuple[CentreSpec, PatientPlan, str]) -> dict[str, float]:
    """Worker: render, write image and mask (stored orientation), return the handcrafted features."""
    spec, plan, site_dir = task
    image, mask, affine = render_patient(spec, plan)
    feats = handcrafted_features(image, mask, spec.spacing_mm)
    img_s, aff_s = reorient(image, affine, spec.orientation)
    msk_s, _ = reorient(mask, affine, spec.orientation)
    site = Path(site_dir)
    write_atomic(site / "images" / f"{plan.patient_id}.nii.gz", _nifti_bytes(img_s, aff_s))
    write_atomic(site / "masks" / f"{plan.patient_id}.nii.gz", _nifti_bytes(msk_s, aff_s))
    return feats


# ---------------------------------------------------------------- writing
def _prepare_site_dir(site: Path) -> None:
    """Empty a previous generation's site folder; refuse to touch a folder that is not one."""
    if site.exists():
        if not site.is_dir() or (
            any(site.iterdir()) and not (site / MANIFEST).exists() and not (site / "images").is_dir()
        ):
            raise CohortError(f"{site}: exists and is not a synthetic site folder; refusing to overwrite it")
        shutil.rmtree(site)
    (site / "images").mkdir(parents=True)
    (site / "masks").mkdir()


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _write_tables(out_dir: Path, cp: CentrePlan) -> None:
    site = out_dir / cp.spec.name
    manifest = [
        (
            p.patient_id,
            p.label,
            f"images/{p.patient_id}.nii.gz",
            f"masks/{p.patient_id}.nii.gz",
            p.radiologist_score,
            p.age,
            p.sex,
        )
        for p in cp.patients
    ]
    write_atomic(site / MANIFEST, _csv_bytes(MANIFEST_COLUMNS, manifest))
    readings = [(r.patient_id, r.reader, r.tier, r.score_without_ai, r.score_with_ai) for r in cp.reader_rows]
    write_atomic(site / READER_STUDY, _csv_bytes(READER_COLUMNS, readings))


def _latent_rows(plans: Sequence[CentrePlan], feats: dict[str, dict[str, float]]) -> bytes:
    header = [
        "centre",
        "patient_id",
        "label",
        "evidence",
        "clinical",
        "posterior_image",
        "posterior_full",
        "model_reading",
        *[f"feature_{f}" for f in FEATURES],
        "diameter_mm",
        "extension",
        "breach",
        "rim_hu",
        "mineral_fraction",
        *HANDCRAFTED,
    ]
    rows = []
    for cp in plans:
        logit_prior = (
            math.log(cp.spec.malignant / cp.spec.benign) if cp.spec.benign and cp.spec.malignant else 0.0
        )
        for p in cp.patients:
            les = p.lesion
            li = readers.EVIDENCE_SEPARATION * p.evidence + logit_prior
            lf = li + readers.CLINICAL_SEPARATION * p.clinical
            rows.append(
                [
                    cp.spec.name,
                    p.patient_id,
                    p.label,
                    f"{p.evidence:.5f}",
                    f"{p.clinical:.5f}",
                    f"{sigmoid(li):.5f}",
                    f"{sigmoid(lf):.5f}",
                    f"{p.model_reading:.5f}",
                    *[f"{v:.4f}" for v in p.features],
                    f"{2 * les.mean_radius_mm:.2f}",
                    f"{les.extension:.3f}",
                    f"{les.breach:.3f}",
                    f"{les.rim_hu:.1f}",
                    f"{les.mineral_fraction:.4f}",
                    *[f"{feats[p.patient_id][f]:.4f}" for f in HANDCRAFTED],
                ]
            )
    return _csv_bytes(header, rows)


def generate_cohort(
    out_dir: Path,
    scale: float = 1.0,
    seed: int = 0,
    workers: int = 1,
    *,
    centres: Sequence[CentreSpec] | None = None,
) -> dict[str, Any]:
    """Generate the cohort into ``out_dir`` and return the content of its ``cohort.json``.

    ``centres`` overrides ``default_centres(scale)`` (``scale`` is then only
    recorded).  ``workers`` > 1 renders patients in that many processes
    (spawned, so it is safe from threaded callers, but a calling script needs
    the ``if __name__ == "__main__":`` guard); the output does not depend on it.  Existing site folders of the same names are replaced; any previous
    ``cohort.json`` is removed first and written again only at the very end.
    """
    t0 = time.perf_counter()
    specs = tuple(centres) if centres is not None else default_centres(scale)
    names = [c.name for c in specs]
    if not specs or len(set(names)) != len(names):
        raise CohortError(f"need at least one centre and unique names, got {names}")
    if workers < 1:
        raise CohortError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / COHORT_JSON).unlink(missing_ok=True)
    plans = [plan_centre(spec, seed) for spec in specs]
    for cp in plans:
        _prepare_site_dir(out_dir / cp.spec.name)
    tasks = [(cp.spec, p, str(out_dir / cp.spec.name)) for cp in plans for p in cp.patients]
    logger.info(
        "generating %d patients in %d centres into %s (workers=%d)", len(tasks), len(plans), out_dir, workers
    )
    if workers == 1:
        results = [_make_patient(t) for t in tasks]
    else:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            results = list(pool.map(_make_patient, tasks, chunksize=4))
    feats = {t[1].patient_id: r for t, r in zip(tasks, results, strict=True)}
    for cp in plans:
        _write_tables(out_dir, cp)
    write_atomic(out_dir / LATENT_CSV, _latent_rows(plans, feats))
    stats = summarise(plans, feats, seed)
    cohort: dict[str, Any] = {
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "scale": scale,
        "centres": [dataclasses.asdict(cp.spec) for cp in plans],
        "sites": {cp.spec.name: cp.spec.name for cp in plans},
        "development": [cp.spec.name for cp in plans if not cp.spec.external],
        "external": [cp.spec.name for cp in plans if cp.spec.external],
        "reader_study_sites": [cp.spec.name for cp in plans],
        "latent_file": LATENT_CSV,
        "demographics": {
            **{cp.spec.name: demographics([cp]) for cp in plans},
            **(
                {"external": demographics([cp for cp in plans if cp.spec.external])}
                if any(cp.spec.external for cp in plans)
                else {}
            ),
            "all": demographics(plans),
        },
        "latent_model": {
            "evidence_separation": readers.EVIDENCE_SEPARATION,
            "clinical_separation": readers.CLINICAL_SEPARATION,
            "feature_noise": FEATURE_NOISE,
            "feature_gain": FEATURE_GAIN,
            "model_noise": readers.MODEL_NOISE,
            "features": list(FEATURES),
        },
        **stats,
    }
    cohort["generation_seconds"] = round(time.perf_counter() - t0, 2)
    text = json.dumps(cohort, indent=2) + "\n"
    write_atomic(out_dir / COHORT_JSON, text.encode("utf-8"))
    cohort = json.loads(text)  # exactly the file's content (tuples become lists)
    logger.info(
        "cohort written in %.1f s: oracle %.3f, radiologist %.3f, handcrafted LR %s",
        cohort["generation_seconds"],
        stats["oracle_auc"]["all"] or float("nan"),
        stats["radiologist_auc"]["all"] or float("nan"),
        stats["handcrafted_lr_auc"],
    )
    return cohort
