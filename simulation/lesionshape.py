"""The lesion's shape and the random fields the renderer draws from: pure functions of their parameters and a generator.

``simulation.anatomy`` seats these in the sacrum and paints them; here a
lesion is a lobulated ellipsoid (``Blob``: an ellipsoid radius times one plus
a sum of random harmonics on the unit sphere) with an approximate signed
distance, so its rim, neo-cortex and permeative zone are bands of that
distance drawn with partial-volume occupancy (``band``, ``inside``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class LesionParams:
    """One sacral lesion; every visual feature is an explicit parameter.

    ``lobulation``/``ragged``: relative radial amplitude of low/high-frequency
    margin irregularity.  ``rim_hu``/``rim_mm``: sclerotic margin inside bone.
    ``breach``: fraction of the extra-osseous surface left without neo-cortex.
    ``reactive_sclerosis``: density of the bone left between the holes, as a
    multiple of what keeps the zone's mean unchanged (< 1 net lytic, > 1 net
    sclerotic; a nuisance, so the zone's mean HU says little about the class).
    ``neocortex_hu``/``neocortex_mm``: the expanded shell over the extra-osseous
    part of the lesion (thin shells read lower).
    ``spiculation`` in [0, 1]: extent of a spiculated ("sunburst") periosteal
    reaction over the breached surface, of density ``spicule_hu``; like the
    neo-cortex it is bright bone at the margin, so shell statistics cannot
    tell them apart, but the pattern (smooth shell vs radiating rays) differs.
    ``extension``: radius of the soft-tissue mass outside bone relative to the
    lesion's mean radius (0: none).  ``permeative_mm``/``hole_fraction``:
    moth-eaten zone of transition in the surrounding bone.  ``mineral_fraction``
    of the matrix is mineralised, as calcified foci (``foci_vs_septa`` = 1) or
    thin septa (0).  ``necrosis_fraction`` of the matrix is fluid density.
    ``contour_mm``: where the reader drew the ROI relative to the lesion edge
    (> 0: outside it, taking in part of the margin); manual contours vary,
    which moves first-order ROI/shell statistics but not the image.
    """

    centre_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    angle_rad: float
    lobulation: float
    ragged: float
    rim_hu: float
    rim_mm: float
    breach: float
    extension: float
    extension_dir: tuple[float, float, float]
    permeative_mm: float
    hole_fraction: float
    reactive_sclerosis: float
    neocortex_hu: float
    neocortex_mm: float
    spiculation: float
    spicule_hu: float
    mineral_fraction: float
    foci_vs_septa: float
    necrosis_fraction: float
    matrix_hu: float
    contour_mm: float = 0.0

    @property
    def mean_radius_mm(self) -> float:
        r = self.radii_mm
        return float((r[0] * r[1] * r[2]) ** (1.0 / 3.0))


# ---------------------------------------------------------------- random fields
def smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], cell_mm: float
) -> np.ndarray:
    """Unit-variance smooth random field, linearly interpolated from a ``cell_mm`` lattice.

    Separable interpolation matrices keep it cheap on a whole volume (no
    per-voxel filtering at full resolution).
    """
    coarse_shape = tuple(math.ceil(n * s / cell_mm) + 2 for n, s in zip(shape, spacing, strict=True))
    coarse = ndi.gaussian_filter(rng.standard_normal(coarse_shape).astype(np.float32), 0.7, mode="wrap")
    coarse /= max(float(coarse.std()), 1e-6)

    def weights(axis: int) -> np.ndarray:
        n, s = shape[axis], spacing[axis]
        pos = np.arange(n, dtype=np.float32) * s / cell_mm + 0.5
        lo = np.floor(pos).astype(np.int64)
        frac = pos - lo
        w = np.zeros((n, coarse_shape[axis]), dtype=np.float32)
        w[np.arange(n), lo] = 1.0 - frac
        w[np.arange(n), lo + 1] = frac
        return w

    # x and y on the small coarse array, then z as one contiguous matrix product at full size.
    out = np.einsum("ia,abc->ibc", weights(0), coarse)
    out = np.matmul(weights(1)[None], out)
    full = out.reshape(-1, coarse_shape[2]) @ weights(2).T
    return full.reshape(shape).astype(np.float32, copy=False)


def fine_field(
    rng: np.random.Generator, shape: tuple[int, ...], spacing: tuple[float, ...], sigma_mm: float
) -> np.ndarray:
    """Unit-variance Gaussian-filtered white noise with correlation length ``sigma_mm``."""
    field = ndi.gaussian_filter(
        rng.standard_normal(shape, dtype=np.float32), [sigma_mm / s for s in spacing], mode="reflect"
    )
    field /= max(float(field.std()), 1e-6)
    return field


def harmonics(rng: np.random.Generator, n_terms: int, freq: tuple[float, float]) -> tuple[np.ndarray, ...]:
    """Random directions, frequencies and phases of a smooth function on the unit sphere."""
    v = rng.standard_normal((n_terms, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return (
        v.astype(np.float32),
        rng.uniform(*freq, n_terms).astype(np.float32),
        rng.uniform(0, 2 * np.pi, n_terms),
    )


def sphere_function(
    ux: np.ndarray, uy: np.ndarray, uz: np.ndarray, terms: tuple[np.ndarray, ...]
) -> np.ndarray:
    """Evaluate a harmonic sum (unit variance) at unit directions (ux, uy, uz)."""
    v, f, phi = terms
    acc = np.zeros(np.broadcast_shapes(ux.shape, uy.shape, uz.shape), dtype=np.float32)
    for k in range(len(f)):
        acc += np.cos(f[k] * (v[k, 0] * ux + v[k, 1] * uy + v[k, 2] * uz) + np.float32(phi[k]))
    return acc * np.float32(math.sqrt(2.0 / len(f)))


def band(sd: np.ndarray, lo: float, hi: float, h: float) -> np.ndarray:
    """Partial-volume occupancy of the band lo < sd < hi for a voxel of size h (mm)."""
    return np.clip((np.minimum(sd + h / 2, hi) - np.maximum(sd - h / 2, lo)) / h, 0.0, 1.0)


def inside(sd: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume occupancy of sd < 0."""
    return np.clip(0.5 - sd / h, 0.0, 1.0)


# ---------------------------------------------------------------- lesion shapes
@dataclass(frozen=True)
class Blob:
    """A lobulated ellipsoid: radius ``radii`` (rotated by ``angle`` about z) times 1 + sum of harmonics."""

    centre: np.ndarray  # (3,) patient frame, mm
    radii: np.ndarray  # (3,)
    angle: float
    terms: tuple[tuple[float, tuple[np.ndarray, ...]], ...]  # (amplitude, harmonics)

    def _margin(self, ux: np.ndarray, uy: np.ndarray, uz: np.ndarray) -> np.ndarray:
        g = np.ones(np.broadcast_shapes(ux.shape, uy.shape, uz.shape), dtype=np.float32)
        for amp, terms in self.terms:
            if amp > 0.0:
                g += np.float32(amp) * sphere_function(ux, uy, uz, terms)
        return np.maximum(g, np.float32(0.35))

    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """Patient-frame bounding box (lo, hi), from the margin on 2000 directions (+3 %)."""
        n = 2000
        k = np.arange(n) + 0.5
        polar = np.arccos(1.0 - 2.0 * k / n)
        azim = np.pi * (1.0 + 5.0**0.5) * k
        u = np.stack([np.sin(polar) * np.cos(azim), np.sin(polar) * np.sin(azim), np.cos(polar)]).astype(
            np.float32
        )
        g = self._margin(u[0], u[1], u[2]) * np.float32(1.03)
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        px, py, pz = u[0] * self.radii[0] * g, u[1] * self.radii[1] * g, u[2] * self.radii[2] * g
        pts = np.stack([ca * px - sa * py, sa * px + ca * py, pz]) + self.centre[:, None]
        return pts.min(axis=1), pts.max(axis=1)

    def signed_distance(self, dx: np.ndarray, dy: np.ndarray, dz: np.ndarray) -> np.ndarray:
        """Approximate signed distance (mm) for offsets (dx, dy, dz) from ``centre``."""
        ca, sa = np.float32(math.cos(self.angle)), np.float32(math.sin(self.angle))
        rx, ry, rz = (np.float32(r) for r in self.radii)
        qx, qy, qz = (ca * dx + sa * dy) / rx, (-sa * dx + ca * dy) / ry, dz / rz
        rho = np.sqrt(qx * qx + qy * qy + qz * qz) + np.float32(1e-6)
        r_mean = np.float32(float(np.prod(self.radii)) ** (1.0 / 3.0))
        return (rho - self._margin(qx / rho, qy / rho, qz / rho)) * r_mean

    def radius_along(self, d: np.ndarray) -> float:
        """Ellipsoid radius (no harmonics) along unit direction ``d``."""
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        q = np.array([ca * d[0] + sa * d[1], -sa * d[0] + ca * d[1], d[2]]) / self.radii
        return float(1.0 / np.linalg.norm(q))


def lesion_blobs(lesion: LesionParams, rng: np.random.Generator) -> tuple[Blob, Blob | None]:
    """The lesion and its soft-tissue extension (if any) as blobs."""
    main = Blob(
        centre=np.asarray(lesion.centre_mm, dtype=np.float64),
        radii=np.asarray(lesion.radii_mm, dtype=np.float64),
        angle=lesion.angle_rad,
        terms=(
            (lesion.lobulation, harmonics(rng, 6, (2.0, 4.5))),
            (lesion.ragged, harmonics(rng, 8, (8.0, 16.0))),
        ),
    )
    ext_terms = harmonics(rng, 5, (2.5, 5.0))
    if lesion.extension <= 0.0:
        return main, None
    d = np.asarray(lesion.extension_dir, dtype=np.float64)
    d /= np.linalg.norm(d)
    r_ext = lesion.extension * lesion.mean_radius_mm
    centre = main.centre + d * (main.radius_along(d) + 0.2 * r_ext)
    return main, Blob(
        centre=centre,
        radii=np.array([r_ext, 0.8 * r_ext, 1.2 * r_ext]),
        angle=0.0,
        terms=((0.25, ext_terms),),
    )
