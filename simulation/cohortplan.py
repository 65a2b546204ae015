"""The synthetic cohort's plan: each patient's label, evidence, features and anatomy.

Planning is separate from rendering (``simulation.synth``): a ``CentrePlan``
is a deterministic function of the centre's spec and the seed (per-centre
and per-patient ``numpy`` seed sequences keyed by the centre *name*), cheap
to compute, and holds everything the volumes, the reader study and
``latent.csv`` are drawn from.  The design of the cohort (latent evidence,
overlapping visual features, centre effects) is described in
``simulation.synth``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as beta_dist

from common.sitedata import ReaderScore
from simulation import anatomy, readers
from simulation.anatomy import AnatomyParams
from simulation.centres import CentreSpec
from simulation.lesionshape import LesionParams

FEATURES = ("margin", "rim", "cortex", "extension", "permeation", "matrix")
FEATURE_NOISE = 0.7  # SD of each feature's own noise around e (within-class SD of e is 1)
FEATURE_GAIN = 1.3  # slope of the logistic map from evidence to a feature's 0-1 malignancy


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
