"""The training pipeline's own answer for one patient: what a bundle's prediction must equal."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.bundle import ModelBundle
from common.dataset import SiteArrays, preprocess_site
from common.engine import predict


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
