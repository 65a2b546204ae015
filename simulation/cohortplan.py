"""The synthetic cohort's plan: centres, and each patient's label, evidence, features and anatomy.

Planning is separate from rendering (``simulation.synth``): a ``CentrePlan``
is a deterministic function of the centre's spec and the seed (per-centre
and per-patient ``numpy`` seed sequences keyed by the centre *name*), cheap
to compute, and holds everything the volumes, the reader study and
``latent.csv`` are drawn from.  The design of the cohort (latent evidence,
overlapping visual features, centre effects) is described in
``simulation.synth``.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as beta_dist

from common.sitedata import ReaderScore
from simulation import anatomy, readers
from simulation.anatomy import AnatomyParams, Grid
from simulation.lesionshape import LesionParams

MIN_PER_CLASS = 10  # the floor: fivefold CV with an 8:2 train/validation split still sees both classes
FEATURES = ("margin", "rim", "cortex", "extension", "permeation", "matrix")
FEATURE_NOISE = 0.7  # SD of each feature's own noise around e (within-class SD of e is 1)
FEATURE_GAIN = 1.3  # slope of the logistic map from evidence to a feature's 0-1 malignancy
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


def sigmoid(x: float) -> float:
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
            f: sigmoid(FEATURE_GAIN * (evidence[i] + FEATURE_NOISE * noise[k]))
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
