"""The training pipeline's own answer for one patient: what a bundle's prediction must equal."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from common.bundle import ModelBundle
from common.dataset import preprocess_site
from common.engine import predict
from common.sitearrays import SiteArrays

SACRUM = (slice(50, 72), slice(14, 36), slice(28, 50))
"""A box over the sacrum of ``../shared/data/ct/pelvis_ct.nii.gz`` (voxel indices)."""


def sacrum_roi(image: Path, out: Path, *, notch: bool = False) -> Path:
    """Write a box ROI over the real pelvis CT's sacrum to ``out``; ``notch`` cuts a slab so it is not a plain box."""
    ct = nib.load(str(image))
    mask = np.zeros(ct.shape, np.uint8)
    mask[SACRUM] = 1
    if notch:
        mask[SACRUM[0], SACRUM[1], 28:33] = 0
    nib.save(nib.Nifti1Image(mask, ct.affine), str(out))
    return out


def one_patient_site(bundle: ModelBundle, image: Path, mask: Path, work: Path) -> SiteArrays:
    """``image``/``mask`` as a one-patient site folder, preprocessed as the federation does."""
    site = work / "site"
    site.mkdir()
    shutil.copy(image, site / "ct.nii.gz")  # manifest paths must stay inside the site folder
    shutil.copy(mask, site / "roi.nii.gz")
    (site / "manifest.csv").write_text(
        "patient_id,label,image,mask,radiologist_score\nP1,1,ct.nii.gz,roi.nii.gz,7\n"
    )
    return preprocess_site(site, bundle.config.preprocess, work / "cache")


def engine_fold_probabilities(bundle: ModelBundle, arrays: SiteArrays) -> dict[str, list[float]]:
    """Each model kind's per-fold probability for the site's first patient, from ``common.engine``."""
    return {
        kind: [float(predict(m, arrays, [0], kind, bundle.config)[0]) for m in bundle.build(kind)]
        for kind in bundle.kinds
    }
