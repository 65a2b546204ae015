"""The synthetic cohort's centres: each hospital's class counts, scanner and demographics.

``default_centres`` gives the study's three centres (one development, two
external), shrunk by a scale factor; a ``CentreSpec`` checks itself when made,
so a bad custom centre fails before anything is generated.  What is drawn for
each patient of a centre is ``simulation.cohortplan``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from simulation.anatomy import Grid

MIN_PER_CLASS = 10  # the floor: fivefold CV with an 8:2 train/validation split still sees both classes
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
