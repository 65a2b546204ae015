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
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy.stats import beta as beta_dist
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.atomicfile import write_atomic
from common.sitedata import MANIFEST, READER_COLUMNS, READER_STUDY, ReaderScore
from simulation import anatomy, readers
from simulation.anatomy import AnatomyParams, Grid, LesionParams

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "sacral-synth/1.0.0"
COHORT_JSON = "cohort.json"
LATENT_CSV = "latent.csv"
MIN_PER_CLASS = 10  # the floor: fivefold CV with an 8:2 train/validation split still sees both classes
MANIFEST_COLUMNS = ("patient_id", "label", "image", "mask", "radiologist_score", "age", "sex")
FEATURES = ("margin", "rim", "cortex", "extension", "permeation", "matrix")
FEATURE_NOISE = 0.7  # SD of each feature's own noise around e (within-class SD of e is 1)
FEATURE_GAIN = 1.3  # slope of the logistic map from evidence to a feature's 0-1 malignancy
HANDCRAFTED = ("log_roi_ml", "roi_mean_hu", "roi_sd_hu", "shell_mean_hu")
AXIS_LETTERS = ({"R", "L"}, {"A", "P"}, {"S", "I"})


class CohortError(ValueError):
    """The cohort cannot be generated as asked; the message says why."""


@dataclass(frozen=True)
class CentreSpec:
    """One hospital: class counts, scanner (centre effects) and demographics.

    Stored HU = ``hu_scale`` * true HU + ``hu_offset`` (calibration drift);
    ``noise_sd`` is the image noise in HU, ``blur_sigma_mm`` the in-plane
    reconstruction-kernel blur (the slice profile adds ~0.42 x slice spacing
    along z).  ``shape`` x ``spacing_mm`` is the field of view, centred on the
    patient-frame point ``fov_centre_mm``; ``table_mm`` is where that point
    lands in scanner coordinates.  ``orientation`` is the stored NIfTI axis
    code (any permutation/flip of RAS, e.g. ``"LPS"``).
    """

    name: str
    benign: int
    malignant: int
    hu_offset: float = 0.0
    hu_scale: float = 1.0
    noise_sd: float = 15.0
    blur_sigma_mm: float = 0.8
    spacing_mm: tuple[float, float, float] = (1.5, 1.5, 2.5)
    shape: tuple[int, int, int] = (136, 112, 48)
    fov_centre_mm: tuple[float, float, float] = (0.0, -4.0, 0.0)
    table_mm: tuple[float, float, float] = (0.0, -150.0, -800.0)
    orientation: str = "RAS"
    age_mean: float = 45.0
    age_sd: float = 16.0
    age_min: float = 6.0
    age_max: float = 82.0
    male_fraction: float = 0.5
    external: bool = False

    def __post_init__(self) -> None:
        where = f"centre {self.name!r}"
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise CohortError(f"{where}: the name must be a plain folder name")
        if self.benign < 0 or self.malignant < 0 or self.benign + self.malignant == 0:
            raise CohortError(
                f"{where}: needs a positive number of patients (benign={self.benign}, malignant={self.malignant})"
            )
        if len(self.shape) != 3 or min(self.shape) < 16:
            raise CohortError(f"{where}: shape {self.shape} must be three sizes >= 16")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise CohortError(f"{where}: spacing {self.spacing_mm} must be three positive sizes (mm)")
        code = self.orientation.upper()
        axes = sorted(i for c in code for i, letters in enumerate(AXIS_LETTERS) if c in letters)
        if len(code) != 3 or axes != [0, 1, 2]:
            raise CohortError(
                f"{where}: orientation {self.orientation!r} is not an axis code like 'RAS' or 'LPS'"
            )
        if not self.age_min <= self.age_mean <= self.age_max or self.age_sd <= 0:
            raise CohortError(f"{where}: ages need min <= mean <= max and sd > 0")
        if not 0.0 <= self.male_fraction <= 1.0:
            raise CohortError(f"{where}: male_fraction {self.male_fraction} outside [0, 1]")
        if self.hu_scale <= 0 or self.noise_sd < 0 or self.blur_sigma_mm < 0:
            raise CohortError(f"{where}: hu_scale must be > 0 and noise_sd, blur_sigma_mm >= 0")

    @property
    def n_patients(self) -> int:
        return self.benign + self.malignant

    @property
    def n_male(self) -> int:
        return _round_half_up(self.male_fraction * self.n_patients)

    def grid(self) -> Grid:
        """The RAS+ scanner grid of this centre's volumes."""
        origin = tuple(self.table_mm[i] - (self.shape[i] - 1) / 2.0 * self.spacing_mm[i] for i in range(3))
        return Grid(shape=self.shape, spacing=self.spacing_mm, origin=origin)  # type: ignore[arg-type]

    def fov_bounds(self) -> tuple[tuple[float, float], ...]:
        """Patient-frame extent (mm) of the field of view along x, y, z."""
        return tuple(
            (
                self.fov_centre_mm[i] - self.shape[i] * self.spacing_mm[i] / 2.0,
                self.fov_centre_mm[i] + self.shape[i] * self.spacing_mm[i] / 2.0,
            )
            for i in range(3)
        )

    def scaled(self, scale: float) -> CentreSpec:
        """This centre with both classes multiplied by ``scale``.

        A shrunk cohort (``scale`` < 1) keeps at least ``MIN_PER_CLASS`` per
        class, enough for fivefold CV with an 8:2 train/validation split;
        ``scale`` >= 1 keeps the exact multiple (so the study's centre 3, with
        9 benign patients, stays at 9 at ``scale`` 1).
        """
        if not math.isfinite(scale) or scale < 0:
            raise CohortError(f"scale must be a finite number >= 0, got {scale!r}")
        floor = MIN_PER_CLASS if scale < 1.0 else 0
        return dataclasses.replace(
            self,
            benign=max(floor, _round_half_up(scale * self.benign)),
            malignant=max(floor, _round_half_up(scale * self.malignant)),
        )


def _round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def default_centres(scale: float = 1.0) -> tuple[CentreSpec, ...]:
    """The study's three centres, shrunk by ``scale`` (0 gives the floor: 10 + 10 each).

    Centre 1 (development): 514 patients, 129 benign / 385 malignant, mean age
    42.0 (6-81), 276 M / 238 F.  Centres 2 + 3 (external): 55 patients,
    19 / 36, mean age 47.8 (13-82), 27 M / 28 F, split 28 (10/18) + 27 (9/18).
    Scanners differ on purpose (see ``CentreSpec``).
    """
    full = (
        CentreSpec(
            "centre1",
            129,
            385,
            hu_offset=0.0,
            hu_scale=1.0,
            noise_sd=16.0,
            blur_sigma_mm=0.8,
            spacing_mm=(1.5, 1.5, 2.5),
            shape=(136, 112, 48),
            orientation="LAS",
            table_mm=(2.0, -148.0, -812.5),
            age_mean=42.0,
            age_sd=16.0,
            age_min=6.0,
            age_max=81.0,
            male_fraction=276 / 514,
        ),
        CentreSpec(
            "centre2",
            10,
            18,
            hu_offset=28.0,
            hu_scale=1.03,
            noise_sd=26.0,
            blur_sigma_mm=0.5,
            spacing_mm=(1.2, 1.2, 3.0),
            shape=(150, 128, 40),
            orientation="LPS",
            table_mm=(-3.0, -171.0, -1130.0),
            age_mean=47.8,
            age_sd=17.0,
            age_min=13.0,
            age_max=82.0,
            male_fraction=14 / 28,
            external=True,
        ),
        CentreSpec(
            "centre3",
            9,
            18,
            hu_offset=-22.0,
            hu_scale=0.96,
            noise_sd=10.0,
            blur_sigma_mm=1.2,
            spacing_mm=(2.0, 2.0, 1.5),
            shape=(100, 84, 80),
            orientation="RAI",
            table_mm=(0.0, 95.0, 410.0),
            age_mean=47.8,
            age_sd=17.0,
            age_min=13.0,
            age_max=82.0,
            male_fraction=13 / 27,
            external=True,
        ),
    )
    return tuple(c.scaled(scale) for c in full)


# ---------------------------------------------------------------- planning
@dataclass(frozen=True)
class PatientPlan:
    """Everything about one synthetic patient except the voxels."""

    centre: str
    index: int
    patient_id: str
    label: int
    age: int
    sex: str
    evidence: float
    clinical: float
    features: tuple[float, ...]  # 0-1 malignancy of each of FEATURES
    anatomy: AnatomyParams
    lesion: LesionParams
    radiologist_score: int
    model_reading: float
    render_seed: tuple[int, ...]


@dataclass(frozen=True)
class CentrePlan:
    spec: CentreSpec
    patients: tuple[PatientPlan, ...]
    reader_rows: tuple[ReaderScore, ...]


def _centre_key(name: str) -> int:
    """A stable integer per centre name (seed streams must not depend on centre order)."""
    return zlib.crc32(name.encode("utf-8"))


def _ages(spec: CentreSpec) -> np.ndarray:
    """Integer ages on Beta quantiles matching the centre's mean, SD and exact range."""
    n = spec.n_patients
    lo, hi = spec.age_min, spec.age_max
    m = (spec.age_mean - lo) / (hi - lo)
    v = (spec.age_sd / (hi - lo)) ** 2
    kappa = max(m * (1 - m) / v - 1.0, 0.5)
    q = beta_dist.ppf((np.arange(n) + 0.5) / n, m * kappa, (1 - m) * kappa)
    ages = np.rint(lo + (hi - lo) * q)
    if n >= 2:
        ages[0], ages[-1] = lo, hi
    return ages.astype(np.int64)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _anatomy(rng: np.random.Generator, spec: CentreSpec, age: int, sex: str) -> AnatomyParams:
    male = sex == "M"
    jitter = rng.normal(0.0, (4.0, 4.0, 5.0))
    shift = tuple(float(spec.table_mm[i] - spec.fov_centre_mm[i] + jitter[i]) for i in range(3))
    habitus = 1.0 + 0.07 * rng.standard_normal()
    return AnatomyParams(
        shift_mm=shift,  # type: ignore[arg-type]
        rotation_rad=float(rng.normal(0.0, 0.05)),
        body_axes_mm=(float(160.0 * habitus * (1.03 if male else 1.0)), float(115.0 * habitus)),
        body_centre_y_mm=float(22.0 + rng.normal(0.0, 4.0)),
        fat_mm=float(rng.uniform(12.0, 24.0) + (0.0 if male else 6.0)),
        sacrum_width_scale=float(
            np.clip(1.0 + 0.06 * rng.standard_normal() + (0.0 if male else 0.04), 0.85, 1.2)
        ),
        sacrum_thickness_scale=float(np.clip(1.0 + 0.07 * rng.standard_normal(), 0.85, 1.2)),
        cortex_mm=float(rng.uniform(1.5, 2.5)),
        cancellous_hu=float(np.clip(300.0 - 2.0 * (age - 30.0) + rng.normal(0.0, 25.0), 130.0, 420.0)),
        cortex_hu=float(rng.normal(1250.0, 80.0)),
        fat_hu=float(rng.normal(-100.0, 8.0)),
        muscle_hu=float(rng.normal(48.0, 5.0)),
    )


def _lesion(
    rng: np.random.Generator, spec: CentreSpec, anat: AnatomyParams, evidence: float, s: dict[str, float]
) -> LesionParams:
    """Map feature malignancies (0-1) plus nuisance draws to lesion parameters that fit the FOV."""
    # Size: follows the evidence only weakly (size-only AUC ~0.6-0.7 with the extension included).
    diameter = float(
        np.clip(math.exp(math.log(46.0) + 0.04 * evidence + 0.28 * rng.standard_normal()), 22.0, 92.0)
    )
    r = diameter / 2.0
    radii = [
        r * (1.0 + 0.10 * rng.standard_normal()),
        r * (0.88 + 0.08 * rng.standard_normal()),
        r * (1.08 + 0.10 * rng.standard_normal()),
    ]
    radii = [float(np.clip(v, 0.6 * r, 1.4 * r)) for v in radii]
    lobulation = 0.02 + 0.35 * s["margin"] + 0.02 * abs(rng.standard_normal())
    ragged = 0.01 + 0.07 * s["margin"] ** 2
    grow = 1.0 + 1.6 * (lobulation + ragged)
    (xlo, xhi), (ylo, yhi), (zlo, zhi) = spec.fov_bounds()
    # Seat the centre: cranio-caudal level first (the lesion must fit the slab), then x, y.
    zmax = max(min(zhi, anatomy.Z_HI) - 6.0 - radii[2] * grow, 0.0)
    zmin = min(max(zlo, anatomy.Z_LO) + 6.0 + radii[2] * grow, 0.0)
    lvl_lo, lvl_hi = 0.3, 0.75
    z_lo_ok = max(anatomy.Z_LO + lvl_lo * (anatomy.Z_HI - anatomy.Z_LO), zmin)
    z_hi_ok = min(anatomy.Z_LO + lvl_hi * (anatomy.Z_HI - anatomy.Z_LO), zmax)
    z0 = float(rng.uniform(z_lo_ok, z_hi_ok)) if z_hi_ok > z_lo_ok else 0.5 * (zmin + zmax)
    level = float(anatomy.sacral_level(z0))
    radii[2] = float(min(radii[2], (min(zhi - z0, z0 - zlo) - 6.0) / grow))
    x_room = max((xhi - xlo) / 2.0 - 8.0 - radii[0] * grow, 0.0)
    x_frac_max = min(0.5, x_room / float(anatomy.sacrum_half_width(level, anat)))
    site = anatomy.lesion_site(
        anat,
        float(rng.uniform(-x_frac_max, x_frac_max)),
        level,
        float(np.clip(rng.normal(0, 0.25), -0.5, 0.5)),
    )
    centre = (site[0], site[1], z0)

    extension = float(np.clip(1.4 * s["extension"] - 0.55, 0.0, 0.75))
    anterior = rng.random() < 0.7
    ext_dir = np.array([rng.normal(0.0, 0.5), 1.0 if anterior else -1.0, rng.normal(0.0, 0.3)])
    ext_dir /= np.linalg.norm(ext_dir)
    if extension > 0:
        # Shrink the mass until it fits the FOV (8 mm margin) along every axis.
        r_mean = (radii[0] * radii[1] * radii[2]) ** (1 / 3)
        bounds = ((xlo, xhi), (ylo, yhi), (zlo, zhi))
        for _ in range(30):
            r_e = extension * r_mean
            c_e = [centre[i] + ext_dir[i] * (max(radii) + 0.2 * r_e) for i in range(3)]
            reach = 1.9 * r_e  # blob radii up to 1.2 r_e, lobulated margin up to ~1.6x
            if all(
                bounds[i][0] + 8.0 < c_e[i] - reach and c_e[i] + reach < bounds[i][1] - 8.0 for i in range(3)
            ):
                break
            extension *= 0.85
        else:
            extension = 0.0
    mineral = float(rng.uniform(0.0, 0.12)) if rng.random() < 0.8 else 0.0
    return LesionParams(
        centre_mm=centre,
        radii_mm=(radii[0], radii[1], radii[2]),
        angle_rad=float(rng.uniform(0.0, math.pi)),
        lobulation=float(lobulation),
        ragged=float(ragged),
        rim_hu=float(600.0 * (1.0 - s["rim"]) ** 1.5 * rng.uniform(0.2, 1.2) * (rng.random() < 0.6)),
        rim_mm=float(2.5 + 3.5 * (1.0 - s["rim"])),
        breach=float(np.clip(1.2 * s["cortex"] - 0.3, 0.0, 0.85)),
        extension=extension,
        extension_dir=(float(ext_dir[0]), float(ext_dir[1]), float(ext_dir[2])),
        permeative_mm=float(14.0 * s["permeation"] ** 1.5),
        hole_fraction=float(0.1 + 0.45 * s["permeation"]),
        reactive_sclerosis=float(rng.uniform(0.0, 2.0)),
        neocortex_hu=float(rng.uniform(300.0, 800.0)),
        neocortex_mm=float(rng.uniform(1.8, 3.0)),
        spiculation=float(np.clip(1.4 * s["cortex"] - 0.2, 0.0, 1.0) * rng.uniform(0.6, 1.0)),
        spicule_hu=float(rng.uniform(500.0, 1000.0)),
        mineral_fraction=mineral,
        foci_vs_septa=float(s["matrix"]),
        necrosis_fraction=float(0.3 * s["matrix"] * rng.uniform(0.3, 1.0)),
        matrix_hu=float(rng.normal(42.0, 20.0)),
        contour_mm=float(rng.uniform(-1.0, 3.5)),
    )


def plan_centre(spec: CentreSpec, seed: int) -> CentrePlan:
    """Draw every patient of a centre (labels, demographics, latents, anatomy, lesion, readings)."""
    key = _centre_key(spec.name)
    rng = np.random.default_rng([seed, key, 0])
    n = spec.n_patients
    labels = rng.permutation(
        np.r_[np.zeros(spec.benign, dtype=np.int64), np.ones(spec.malignant, dtype=np.int64)]
    )
    ages = rng.permutation(_ages(spec))
    sexes = rng.permutation(np.array(["M"] * spec.n_male + ["F"] * (n - spec.n_male)))
    d_e, d_c = readers.EVIDENCE_SEPARATION, readers.CLINICAL_SEPARATION
    evidence = d_e * (labels - 0.5) + rng.standard_normal(n)
    clinical = d_c * (labels - 0.5) + rng.standard_normal(n)
    model = readers.model_reading(evidence, rng)
    rad_z, _ = readers.read(readers.RADIOLOGIST, evidence, clinical, model, rng)
    rad_scores = readers.to_score(rad_z)
    width = max(4, len(str(n)))
    prefix = (
        "c" + "".join(ch for ch in spec.name if ch.isdigit())
        if any(ch.isdigit() for ch in spec.name)
        else spec.name
    )
    pids = [f"{prefix}-{i + 1:0{width}d}" for i in range(n)]
    patients = []
    for i in range(n):
        prng = np.random.default_rng([seed, key, 1, i])
        noise = prng.standard_normal(len(FEATURES))
        feats = {
            f: _sigmoid(FEATURE_GAIN * (evidence[i] + FEATURE_NOISE * noise[k]))
            for k, f in enumerate(FEATURES)
        }
        anat = _anatomy(prng, spec, int(ages[i]), str(sexes[i]))
        patients.append(
            PatientPlan(
                centre=spec.name,
                index=i,
                patient_id=pids[i],
                label=int(labels[i]),
                age=int(ages[i]),
                sex=str(sexes[i]),
                evidence=float(evidence[i]),
                clinical=float(clinical[i]),
                features=tuple(float(feats[f]) for f in FEATURES),
                anatomy=anat,
                lesion=_lesion(prng, spec, anat, float(evidence[i]), feats),
                radiologist_score=int(rad_scores[i]),
                model_reading=float(model[i]),
                render_seed=(seed, key, 2, i),
            )
        )
    rows: list[ReaderScore] = []
    for profile in readers.READERS:
        without, with_ai = readers.read(profile, evidence, clinical, model, rng)
        s0, s1 = readers.to_score(without), readers.to_score(with_ai)
        rows.extend(
            ReaderScore(pids[i], profile.reader, profile.tier, int(s0[i]), int(s1[i])) for i in range(n)
        )
    rows.sort(key=lambda r: (r.patient_id, r.reader))
    return CentrePlan(spec=spec, patients=tuple(patients), reader_rows=tuple(rows))


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


# ---------------------------------------------------------------- statistics
def _auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return None
    return round(float(roc_auc_score(y, np.asarray(scores, dtype=np.float64))), 4)


def _cv_lr_scores(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray | None:
    """Out-of-fold probabilities of a standardised logistic regression (stratified, up to 5 folds)."""
    n_splits = min(5, int(np.bincount(y, minlength=2).min()))
    if n_splits < 2:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]


def _summarise(plans: Sequence[CentrePlan], feats: dict[str, dict[str, float]], seed: int) -> dict[str, Any]:
    """AUCs of every simulated reading per centre, the external pool and overall.

    Single-feature AUCs are raw (the feature used as the score): below 0.5
    means benign lesions score higher.
    """
    groups: dict[str, list[PatientPlan]] = {cp.spec.name: list(cp.patients) for cp in plans}
    external = [p for cp in plans if cp.spec.external for p in cp.patients]
    if external and len(plans) > 1:
        groups["external"] = external
    groups["all"] = [p for cp in plans for p in cp.patients]
    d_e, d_c = readers.EVIDENCE_SEPARATION, readers.CLINICAL_SEPARATION

    def per_group(score: Callable[[PatientPlan], float]) -> dict[str, float | None]:
        return {g: _auc([p.label for p in ps], [score(p) for p in ps]) for g, ps in groups.items()}

    def design(ps: Sequence[PatientPlan]) -> tuple[np.ndarray, np.ndarray]:
        x = np.array([[feats[p.patient_id][f] for f in HANDCRAFTED] for p in ps], dtype=np.float64)
        return x, np.array([p.label for p in ps], dtype=np.int64)

    lr: dict[str, float | None] = {}
    for g, ps in groups.items():
        x, y = design(ps)
        oof = _cv_lr_scores(x, y, seed)
        lr[g if g != "external" else "external_cv"] = None if oof is None else _auc(y, oof)
    development = [p for cp in plans if not cp.spec.external for p in cp.patients]
    if external and development:
        x_dev, y_dev = design(development)
        x_ext, y_ext = design(external)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_dev, y_dev)
        lr["external_from_development"] = _auc(y_ext, model.predict_proba(x_ext)[:, 1])

    oracle = per_group(lambda p: p.evidence)
    gap: dict[str, float | None] = {}
    for g, value in lr.items():
        ref = oracle.get("external" if g.startswith("external") else g)
        gap[g] = None if ref is None or value is None else round(ref - value, 4)

    label_of = {p.patient_id: p.label for p in groups["all"]}
    rows_by_group: dict[str, list[ReaderScore]] = {cp.spec.name: list(cp.reader_rows) for cp in plans}
    if "external" in groups:
        rows_by_group["external"] = [r for cp in plans if cp.spec.external for r in cp.reader_rows]
    rows_by_group["all"] = [r for cp in plans for r in cp.reader_rows]
    reader_study: dict[str, dict[str, dict[str, float | None]]] = {}
    for g, rows in rows_by_group.items():
        reader_study[g] = {}
        for tier in ("junior", "mid", "senior"):
            sel = [r for r in rows if r.tier == tier]
            y_t = [label_of[r.patient_id] for r in sel]
            reader_study[g][tier] = {
                "without_ai": _auc(y_t, [r.score_without_ai for r in sel]),
                "with_ai": _auc(y_t, [r.score_with_ai for r in sel]),
            }
    return {
        "oracle_auc": oracle,
        "oracle_full_auc": per_group(lambda p: d_e * p.evidence + d_c * p.clinical),
        "radiologist_auc": per_group(lambda p: p.radiologist_score),
        "model_proxy_auc": per_group(lambda p: p.model_reading),
        "handcrafted_lr_auc": lr,
        "oracle_minus_handcrafted": gap,
        "size_only_auc": per_group(lambda p: feats[p.patient_id]["log_roi_ml"]),
        "mean_hu_only_auc": per_group(lambda p: feats[p.patient_id]["roi_mean_hu"]),
        "sd_hu_only_auc": per_group(lambda p: feats[p.patient_id]["roi_sd_hu"]),
        "shell_hu_only_auc": per_group(lambda p: feats[p.patient_id]["shell_mean_hu"]),
        "reader_study_auc": reader_study,
        "reader_study_expected_auc": {
            pr.reader: {
                "without_ai": round(readers.expected_auc(pr), 4),
                "with_ai": round(readers.expected_auc(pr, True), 4),
            }
            for pr in readers.READERS
        },
        "radiologist_expected_auc": round(readers.expected_auc(readers.RADIOLOGIST), 4),
    }


def _demographics(cps: Sequence[CentrePlan]) -> dict[str, Any]:
    ps = [p for cp in cps for p in cp.patients]
    ages = np.array([p.age for p in ps], dtype=np.float64)
    return {
        "patients": len(ps),
        "benign": sum(p.label == 0 for p in ps),
        "malignant": sum(p.label == 1 for p in ps),
        "age_mean": round(float(ages.mean()), 2),
        "age_min": int(ages.min()),
        "age_max": int(ages.max()),
        "male": sum(p.sex == "M" for p in ps),
        "female": sum(p.sex == "F" for p in ps),
    }


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
                    f"{_sigmoid(li):.5f}",
                    f"{_sigmoid(lf):.5f}",
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
    stats = _summarise(plans, feats, seed)
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
            **{cp.spec.name: _demographics([cp]) for cp in plans},
            **(
                {"external": _demographics([cp for cp in plans if cp.spec.external])}
                if any(cp.spec.external for cp in plans)
                else {}
            ),
            "all": _demographics(plans),
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
