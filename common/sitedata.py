"""The site data format: what a hospital prepares, and how it is read.

A site folder holds ``manifest.csv`` (one row per patient) and NIfTI CT
volumes in Hounsfield units with one tumour ROI mask each; paths in the
manifest are relative to the folder.  An optional ``reader_study.csv`` holds
the reader study in long form (one row per patient and reader).

Volumes are read with nibabel and reoriented to RAS+ (``as_closest_canonical``)
so that every site, whatever its scanner's storage order, hands the same
orientation to preprocessing; voxel spacing is taken from the header.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.csv"
READER_STUDY = "reader_study.csv"
REQUIRED_COLUMNS = ("patient_id", "label", "image", "mask", "radiologist_score")
OPTIONAL_COLUMNS = ("age", "sex")
READER_COLUMNS = ("patient_id", "reader", "tier", "score_without_ai", "score_with_ai")
READER_TIERS = ("junior", "mid", "senior")
SCORE_MIDPOINT = 5
SCORE_RANGE = (1, 9)


class SiteDataError(ValueError):
    """A site's data cannot be used; the message names file, patient and problem."""


@dataclass(frozen=True)
class Case:
    """One patient of a site, as listed in its manifest (paths resolved)."""

    patient_id: str
    label: int
    image: Path
    mask: Path
    radiologist_score: int
    age: float | None = None
    sex: str | None = None


@dataclass(frozen=True)
class ReaderScore:
    """One reader's two readings of one patient (reader-study sessions 1 and 2)."""

    patient_id: str
    reader: str
    tier: str
    score_without_ai: int
    score_with_ai: int


@dataclass(frozen=True)
class Volume:
    """A CT volume and its ROI mask in RAS+ orientation, with voxel spacing in mm."""

    image: np.ndarray  # float32 HU, (x, y, z)
    mask: np.ndarray  # uint8 {0, 1}, same shape
    affine: np.ndarray  # 4x4, RAS+ voxel -> world
    spacing: tuple[float, float, float]


def read_manifest_rows(site_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Raw rows of ``manifest.csv`` (header, rows); raises if the file is unusable."""
    path = Path(site_dir) / MANIFEST
    if not path.is_file():
        raise SiteDataError(f"{path}: manifest not found (a site folder needs {MANIFEST})")
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise SiteDataError(f"{path}: cannot read manifest ({exc})") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise SiteDataError(f"{path}: missing required column(s) {missing}")
    return header, rows


def confined_path(site_dir: Path, relative: str) -> Path:
    """``site_dir / relative``, refused (``SiteDataError``) unless it stays inside the site folder.

    An absolute path, a ``..`` component, or a symbolic link whose target lies
    outside the folder would let a manifest read (and preprocess, cache and
    train on) any file the process can open.
    """
    rel = Path(relative)
    if rel.is_absolute() or relative.startswith(("/", "\\")):
        raise SiteDataError(f"path {relative!r} is absolute; manifest paths are relative to the site folder")
    if ".." in rel.parts:
        raise SiteDataError(f"path {relative!r} leaves the site folder ('..')")
    root = Path(site_dir).resolve()
    full = Path(site_dir) / rel
    if not full.resolve().is_relative_to(root):
        raise SiteDataError(f"path {relative!r} resolves outside the site folder (a symbolic link?)")
    return full


def case_from_row(site_dir: Path, row: dict[str, str]) -> Case:
    """Parse one manifest row; raises ``SiteDataError`` naming the patient."""
    pid = row.get("patient_id", "")
    where = f"{Path(site_dir) / MANIFEST}: patient {pid!r}"
    try:
        label = int(row["label"])
        score = int(row["radiologist_score"])
    except ValueError as exc:
        raise SiteDataError(f"{where}: label and radiologist_score must be integers ({exc})") from exc
    age_s, sex_s = row.get("age", ""), row.get("sex", "")
    try:
        age = float(age_s) if age_s else None
    except ValueError as exc:
        raise SiteDataError(f"{where}: age {age_s!r} is not a number") from exc
    try:
        image, mask = confined_path(site_dir, row["image"]), confined_path(site_dir, row["mask"])
    except SiteDataError as exc:
        raise SiteDataError(f"{where}: {exc}") from None
    return Case(
        patient_id=pid,
        label=label,
        image=image,
        mask=mask,
        radiologist_score=score,
        age=age,
        sex=sex_s or None,
    )


def iter_cases(site_dir: Path) -> Iterator[Case]:
    """Cases of a site in manifest order (no image is read; see ``validation``)."""
    _, rows = read_manifest_rows(site_dir)
    for row in rows:
        yield case_from_row(site_dir, row)


def read_reader_study(site_dir: Path) -> list[ReaderScore]:
    """The optional reader study; an empty list when the site has none."""
    path = Path(site_dir) / READER_STUDY
    if not path.is_file():
        return []
    out: list[ReaderScore] = []
    with path.open(newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            try:
                out.append(
                    ReaderScore(
                        patient_id=row["patient_id"].strip(),
                        reader=row["reader"].strip(),
                        tier=row["tier"].strip(),
                        score_without_ai=int(row["score_without_ai"]),
                        score_with_ai=int(row["score_with_ai"]),
                    )
                )
            except (KeyError, ValueError) as exc:
                raise SiteDataError(f"{path}: line {i}: bad reader-study row ({exc})") from exc
    return out


def load_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI file in RAS+ orientation: (data as float32, affine)."""
    import nibabel as nib  # here, not at the top: a restart whose files are all remembered reads none

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # nibabel raises many types for broken files
        raise SiteDataError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SiteDataError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, np.asarray(img.affine, dtype=np.float64)


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel edge lengths in mm from an affine (column norms of its 3x3 part)."""
    sp = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(sp[0]), float(sp[1]), float(sp[2]))


def load_case(case: Case) -> Volume:
    """Read a case's image and mask, both in RAS+; the mask is binarised (> 0)."""
    return load_volume(case.patient_id, case.image, case.mask)


def load_volume(patient_id: str, image_path: Path, mask_path: Path) -> Volume:
    """Read an image and its ROI mask in RAS+ (a manifest case, or one patient given for prediction)."""
    image, affine = load_nifti(image_path)
    mask, m_affine = load_nifti(mask_path)
    if image.shape != mask.shape:
        raise SiteDataError(
            f"{mask_path}: patient {patient_id!r}: mask shape {mask.shape} != image shape {image.shape}"
        )
    if not np.allclose(affine, m_affine, atol=1e-3):
        raise SiteDataError(f"{mask_path}: patient {patient_id!r}: mask affine differs from the image's")
    return Volume(image=image, mask=(mask > 0.5).astype(np.uint8), affine=affine, spacing=spacing_of(affine))


def score_to_probability(score: int, mapping: tuple[float, ...]) -> float:
    """Map a 9-point confidence score to a probability of malignancy.

    ``mapping[s-1]`` is the probability for score ``s``.  Score 5, the 50%
    midpoint, is excluded by the reading protocol and is rejected here.
    """
    if not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:
        raise SiteDataError(f"radiologist score {score} outside 1-9")
    if score == SCORE_MIDPOINT:
        raise SiteDataError("radiologist score 5 (the 50% midpoint) is excluded by the protocol")
    return float(mapping[score - 1])
