"""Voxel rendering of a pelvis-like CT slab with one sacral lesion.

Everything here is a pure function of its parameters and a ``numpy`` random
generator: the planner (``simulation.synth``) draws the parameters, this module
turns them into a true-HU volume and a tumour mask on a RAS+ voxel grid, and
``acquire`` applies one centre's scanner (calibration, reconstruction blur,
slice profile, noise).

Geometry is written in a *patient frame* (mm; x to the patient's right,
y anterior, z superior; the sacrum's mid-line at x = 0) and mapped onto the
scanner grid by a per-patient shift and a small rotation about z.  The sacrum
is a curved, boxy plate that is wide and thick cranially (S1) and narrow and
thin caudally, with a central canal, paired foramina and, cranially, the iliac
wings beyond the sacro-iliac joints.  The cortex is the outermost voxel layer
of the bone (one erosion), so its apparent thickness follows the voxel size, as
partial-volume averaging does on a real scanner.

The lesion (its shape: ``simulation.lesionshape``) is a lobulated ellipsoid
described by an approximate signed distance ``sd`` (mm, negative inside) so
that shells around it (sclerotic rim, expanded neo-cortex, permeative zone)
are bands of ``sd`` and are drawn with partial-volume occupancy rather than
aliased binary layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.special import ndtri

from .lesionshape import (
    Blob,
    LesionParams,
    band,
    fine_field,
    harmonics,
    inside,
    lesion_blobs,
    smooth_field,
    sphere_function,
)

# Sacral levels: the plate is described for z in [Z_LO, Z_HI] (patient frame, mm).
Z_LO, Z_HI = -65.0, 65.0
AIR_HU = -1000.0
CSF_HU = 12.0
SOFT_HU = 38.0  # soft-tissue tumour component, bowel
FLUID_HU = 8.0  # necrosis / cyst content
HU_LIMITS = (-1024.0, 3071.0)


@dataclass(frozen=True)
class Grid:
    """A RAS+ voxel grid: voxel (0, 0, 0) sits at ``origin`` (scanner mm)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """1-D scanner coordinates (mm) of the voxel centres along x, y, z."""
        return tuple(  # type: ignore[return-value]
            (self.origin[i] + self.spacing[i] * np.arange(self.shape[i])).astype(np.float32) for i in range(3)
        )

    def affine(self) -> np.ndarray:
        """The RAS+ voxel-to-scanner affine."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = self.origin
        return aff


@dataclass(frozen=True)
class AnatomyParams:
    """Per-patient body habitus and tissue densities (patient-to-scanner pose included)."""

    shift_mm: tuple[float, float, float]
    rotation_rad: float
    body_axes_mm: tuple[float, float]
    body_centre_y_mm: float
    fat_mm: float
    sacrum_width_scale: float
    sacrum_thickness_scale: float
    cortex_mm: float
    cancellous_hu: float
    cortex_hu: float
    fat_hu: float
    muscle_hu: float


# ---------------------------------------------------------------- sacral geometry
def sacral_level(z: np.ndarray | float) -> np.ndarray:
    """Relative level u in [0, 1]: 0 caudal (S4-5), 1 cranial (S1)."""
    return np.clip((np.asarray(z, dtype=np.float32) - Z_LO) / (Z_HI - Z_LO), 0.0, 1.0)


def sacrum_half_width(u: np.ndarray | float, anat: AnatomyParams) -> np.ndarray:
    """Half-width (mm) of the sacrum at level u: ~24 mm caudally, ~56 mm at S1."""
    return anat.sacrum_width_scale * (24.0 + 32.0 * np.asarray(u, dtype=np.float32))


def sacrum_centre_y(x: np.ndarray | float, u: np.ndarray | float) -> np.ndarray:
    """Antero-posterior centre (mm) of the plate: posterior caudally, wings swept back."""
    x = np.asarray(x, dtype=np.float32)
    return -42.0 + 20.0 * np.asarray(u, dtype=np.float32) - 0.0045 * x * x


def sacrum_half_thickness(x: np.ndarray | float, u: np.ndarray | float, anat: AnatomyParams) -> np.ndarray:
    """Half-thickness (mm): thick vertebral bodies in the mid-line, thin alae laterally."""
    u = np.asarray(u, dtype=np.float32)
    w = sacrum_half_width(u, anat)
    rel = np.clip(np.asarray(x, dtype=np.float32) / w, -1.0, 1.0)
    return anat.sacrum_thickness_scale * (8.0 + 9.0 * u) * (1.0 - 0.5 * rel * rel)


def lesion_site(
    anat: AnatomyParams, x_frac: float, level: float, y_frac: float
) -> tuple[float, float, float]:
    """Patient-frame point inside the sacrum from relative coordinates.

    ``x_frac`` in [-1, 1] of the half-width, ``level`` u in [0, 1], ``y_frac`` in
    [-1, 1] of the half-thickness; used by the planner to seat the lesion.
    """
    w = float(sacrum_half_width(level, anat))
    x = x_frac * w
    y = float(sacrum_centre_y(x, level)) + y_frac * float(sacrum_half_thickness(x, level, anat))
    z = Z_LO + level * (Z_HI - Z_LO)
    return (float(x), y, float(z))


# ---------------------------------------------------------------- rendering
@dataclass(frozen=True)
class Rendered:
    """True-HU volume, tumour mask and original-bone mask on a RAS+ grid."""

    hu: np.ndarray  # float32
    mask: np.ndarray  # uint8
    bone: np.ndarray  # bool, bone before the lesion (for checks)


def _patient_coords(grid: Grid, anat: AnatomyParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-frame coordinates as broadcastable arrays (x, y: (nx, ny, 1); z: (1, 1, nz))."""
    x, y, z = grid.axes()
    dx = x[:, None] - np.float32(anat.shift_mm[0])
    dy = y[None, :] - np.float32(anat.shift_mm[1])
    c, s = np.float32(math.cos(anat.rotation_rad)), np.float32(math.sin(anat.rotation_rad))
    xp = (c * dx + s * dy)[:, :, None]
    yp = (-s * dx + c * dy)[:, :, None]
    zp = (z - np.float32(anat.shift_mm[2]))[None, None, :]
    return xp, yp, zp


def _bone_masks(
    xp: np.ndarray, yp: np.ndarray, zp: np.ndarray, anat: AnatomyParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(bone, canal, foramina) boolean volumes of the intact pelvis."""
    u = sacral_level(zp)
    w = sacrum_half_width(u, anat)
    yc = sacrum_centre_y(xp, u)
    t = sacrum_half_thickness(xp, u, anat)
    rx = np.abs(xp) / w
    sacrum = rx**4 + ((yp - yc) / t) ** 2 < 1.0
    # Iliac wings: plates sloping antero-laterally beyond a 3 mm sacro-iliac joint, cranial levels only.
    lateral = np.abs(xp) - w
    y_il = sacrum_centre_y(w, u) + 0.45 * lateral - 2.0
    ilium = (
        (lateral > 3.0) & (lateral < 80.0) & (np.abs(yp - y_il) < 9.0 + 6.0 * u - 0.06 * lateral) & (u > 0.4)
    )
    t0 = sacrum_half_thickness(0.0, u, anat)
    yc0 = sacrum_centre_y(0.0, u)
    canal = (xp / (9.0 + 5.0 * u)) ** 2 + ((yp - yc0 + 0.45 * t0) / (3.5 + 3.0 * u)) ** 2 < 1.0
    # Paired anterior foramina: cylinders along y at four levels (only the slices they cross).
    foramina = np.zeros(np.broadcast_shapes(xp.shape, zp.shape), dtype=bool)
    for zf in (-42.0, -17.0, 8.0, 33.0):
        xf = 0.5 * float(sacrum_half_width(sacral_level(zf), anat))
        k = np.nonzero(np.abs(zp[0, 0] - zf) < 4.5)[0]
        if k.size:
            dz2 = (zp[:, :, k] - zf) ** 2
            foramina[:, :, k] = (np.abs(xp) - xf) ** 2 + dz2 < 4.5**2
    bone = (sacrum | ilium) & ~canal & ~(foramina & sacrum)
    return bone, canal & sacrum, foramina & sacrum


def _box(grid: Grid, anat: AnatomyParams, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice]:
    """Grid index box covering the patient-frame box [lo, hi] (all 8 corners, after the patient pose)."""
    c, s = math.cos(anat.rotation_rad), math.sin(anat.rotation_rad)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = np.stack(
        [c * corners[:, 0] - s * corners[:, 1], s * corners[:, 0] + c * corners[:, 1], corners[:, 2]], axis=1
    ) + np.asarray(anat.shift_mm)
    out = []
    for i in range(3):
        a = math.floor((world[:, i].min() - grid.origin[i]) / grid.spacing[i]) - 1
        b = math.ceil((world[:, i].max() - grid.origin[i]) / grid.spacing[i]) + 2
        out.append(slice(min(max(a, 0), grid.shape[i]), min(max(b, 0), grid.shape[i])))
    return out[0], out[1], out[2]


def render(grid: Grid, anat: AnatomyParams, lesion: LesionParams, rng: np.random.Generator) -> Rendered:
    """True HU and tumour mask of one patient on ``grid`` (RAS+ voxel order)."""
    xp, yp, zp = _patient_coords(grid, anat)
    shape = grid.shape
    h = float(np.prod(grid.spacing) ** (1.0 / 3.0))

    # --- soft tissues (2-D body outline, 3-D pelvic content)
    bx, by = anat.body_axes_mm
    r_body = (xp / bx) ** 2 + ((yp - anat.body_centre_y_mm) / by) ** 2
    r_inner = (xp / (bx - anat.fat_mm)) ** 2 + ((yp - anat.body_centre_y_mm) / (by - anat.fat_mm)) ** 2
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    body2d = np.broadcast_to(r_body < 1.0, shape)
    inner2d = np.broadcast_to(r_inner < 1.0, shape)
    hu[body2d] = anat.fat_hu
    hu[inner2d] = anat.muscle_hu
    coarse = smooth_field(rng, shape, grid.spacing, 12.0)
    u = sacral_level(zp)
    anterior = sacrum_centre_y(xp, u) + sacrum_half_thickness(xp, u, anat)
    pelvis = inner2d & (yp > anterior + 2.0) & (np.abs(xp) < 62.0 + 0.25 * (yp - anterior))
    hu[pelvis] = anat.fat_hu
    bowel = pelvis & ((xp / 55.0) ** 2 + ((yp - 45.0) / 38.0) ** 2 < 1.0) & (coarse > -0.2)
    hu[bowel] = SOFT_HU - 8.0 + 6.0 * coarse[bowel]

    # --- bone
    bone, canal, foramina = _bone_masks(xp, yp, zp, anat)
    cortex = bone & ~ndi.binary_erosion(bone, border_value=1)
    density = smooth_field(rng, shape, grid.spacing, 9.0)
    hu[bone] = anat.cancellous_hu * (1.0 + 0.12 * density[bone])
    hu[cortex] = anat.cortex_hu
    hu[canal] = CSF_HU
    hu[foramina] = anat.muscle_hu - 15.0

    # --- lesion
    main, ext = lesion_blobs(lesion, rng)
    lo, hi = main.extent()
    shell = max(lesion.permeative_mm, lesion.rim_mm, lesion.neocortex_mm, 4.0 + 10.0 * lesion.spiculation) + h
    lo, hi = lo - shell, hi + shell
    if ext is not None:
        elo, ehi = ext.extent()
        lo, hi = np.minimum(lo, elo - h), np.maximum(hi, ehi + h)
    box = _box(grid, anat, lo, hi)
    if any(b.stop - b.start < 2 for b in box):
        raise ValueError(f"lesion at {lesion.centre_mm} mm lies outside the field of view")
    mask = np.zeros(shape, dtype=np.uint8)
    _paint_lesion(hu, mask, box, (xp, yp, zp), (bone, cortex, inner2d), grid, lesion, (main, ext), rng)
    return Rendered(hu=hu, mask=mask, bone=bone)


def _paint_lesion(
    hu: np.ndarray,
    mask: np.ndarray,
    box: tuple[slice, slice, slice],
    coords: tuple[np.ndarray, np.ndarray, np.ndarray],
    tissue: tuple[np.ndarray, np.ndarray, np.ndarray],
    grid: Grid,
    lesion: LesionParams,
    blobs: tuple[Blob, Blob | None],
    rng: np.random.Generator,
) -> None:
    """Draw the lesion, its shells and its soft-tissue extension into ``hu``/``mask`` (in place, box only)."""
    bxs, bys, bzs = box
    xp, yp, zp = coords
    main, ext = blobs
    h = float(np.prod(grid.spacing) ** (1.0 / 3.0))
    bshape = (bxs.stop - bxs.start, bys.stop - bys.start, bzs.stop - bzs.start)
    px, py, pz = np.broadcast_arrays(xp[bxs, bys, :], yp[bxs, bys, :], zp[:, :, bzs])
    c0 = main.centre.astype(np.float32)
    dx, dy, dz = px - c0[0], py - c0[1], pz - c0[2]
    sd = main.signed_distance(dx, dy, dz)

    b_bone, b_cortex, b_body = (t[box] for t in tissue)
    occ_les = inside(sd, h) * b_body

    # Soft-tissue extension: a lobulated mass outside bone, seated on the lesion surface.
    occ_ext = np.zeros(bshape, dtype=np.float32)
    if ext is not None:
        ce = ext.centre.astype(np.float32)
        esd = ext.signed_distance(px - ce[0], py - ce[1], pz - ce[2])
        occ_ext = inside(esd, h) * (~b_bone) * b_body * (1.0 - occ_les)

    # Breach: patches of the outer surface without neo-cortex, always where the mass leaves.
    outside = sd > 0
    integrity = np.ones(bshape, dtype=np.float32)
    if lesion.breach > 0.0:
        dist = np.sqrt(dx * dx + dy * dy + dz * dz) + np.float32(1e-6)
        wx, wy, wz = dx / dist, dy / dist, dz / dist
        bfield = sphere_function(wx, wy, wz, harmonics(rng, 4, (1.5, 3.5)))
        if ext is not None:
            d = np.asarray(lesion.extension_dir, dtype=np.float32)
            d /= np.linalg.norm(d)
            bfield = bfield - 3.0 * np.clip((wx * d[0] + wy * d[1] + wz * d[2] - 0.4) / 0.4, 0.0, 1.0)
        thr = np.float32(ndtri(min(max(lesion.breach, 1e-3), 0.999)))
        integrity = np.clip((bfield - thr) / 0.3 + 0.5, 0.0, 1.0)

    # Shell texture fields (shared white noise, two correlation lengths).
    # Texture scales are >= 2 mm so that they survive the models' ~4 mm input grid.
    fine = fine_field(rng, bshape, grid.spacing, 2.2)
    smooth = fine_field(rng, bshape, grid.spacing, 3.5)
    coarse = fine_field(rng, bshape, grid.spacing, 5.0)
    out = hu[box]

    # Permeative zone of transition: moth-eaten holes in the surrounding bone.
    if lesion.permeative_mm > 0.0 and lesion.hole_fraction > 0.0:
        depth = np.clip(1.0 - sd / lesion.permeative_mm, 0.0, 1.0) * outside
        holes = (fine < ndtri(lesion.hole_fraction)) & (depth > 0) & b_bone
        # Reactive sclerosis between the holes (mixed lytic-sclerotic); 1 keeps the zone's mean density.
        keep_mean = lesion.hole_fraction / (1.0 - lesion.hole_fraction)
        sclerosis = lesion.reactive_sclerosis * keep_mean * np.maximum(out - SOFT_HU, 0.0)
        out = np.where(holes, out + depth * (SOFT_HU - out), out + depth * sclerosis * b_bone)
    # Sclerotic rim inside the bone.
    if lesion.rim_hu > 0.0:
        out = out + lesion.rim_hu * band(sd, 0.0, lesion.rim_mm, h) * (b_bone & ~b_cortex)
    # Expanded neo-cortex where the lesion leaves the bone (or crosses its cortex).
    extra_osseous = ((~b_bone) | b_cortex) & b_body
    nc = band(sd, 0.0, lesion.neocortex_mm, h) * integrity * extra_osseous * (1.0 - occ_ext)
    out = out + nc * (lesion.neocortex_hu - out)
    # Spiculated periosteal reaction: rays (a direction-only field) over the breached surface.
    if lesion.spiculation > 0.0:
        dist = np.sqrt(dx * dx + dy * dy + dz * dz) + np.float32(1e-6)
        rays = sphere_function(dx / dist, dy / dist, dz / dist, harmonics(rng, 10, (10.0, 18.0)))
        length = 4.0 + 10.0 * lesion.spiculation
        thr = np.float32(1.0 - 1.4 * lesion.spiculation)
        ray_occ = np.clip((rays - thr) / 0.3, 0.0, 1.0) * band(sd, 0.0, length, h) * (1.0 - integrity)
        ray_occ = ray_occ * extra_osseous
        out = out + ray_occ * (lesion.spicule_hu - out)
    # Extension: soft tissue carrying calcified fragments of the tumour matrix.
    ext_foci = 0.04 + lesion.mineral_fraction * lesion.foci_vs_septa
    ext_hu = SOFT_HU + 6.0 * smooth + 600.0 * np.clip((fine - ndtri(1.0 - ext_foci)) / 0.35 + 0.5, 0.0, 1.0)
    out = out + occ_ext * (ext_hu - out)
    # Matrix: base density, necrosis, mineralisation as foci (blobs) or septa (sheets).
    matrix = np.full(bshape, lesion.matrix_hu, dtype=np.float32) + 5.0 * smooth
    if lesion.necrosis_fraction > 0.0:
        nec = np.clip((ndtri(lesion.necrosis_fraction) - smooth) / 0.4 + 0.5, 0.0, 1.0)
        matrix += nec * (FLUID_HU - matrix)
    foci_f = lesion.mineral_fraction * lesion.foci_vs_septa
    septa_f = lesion.mineral_fraction * (1.0 - lesion.foci_vs_septa)
    if foci_f > 0.0:
        matrix += 600.0 * np.clip((fine - ndtri(1.0 - foci_f)) / 0.35 + 0.5, 0.0, 1.0)
    if septa_f > 0.0:
        matrix += 380.0 * np.clip((ndtri(0.5 + septa_f / 2.0) - np.abs(coarse)) / 0.1 + 0.5, 0.0, 1.0)
    out = out + occ_les * (matrix - out)
    hu[box] = out

    roi = ((sd < lesion.contour_mm) & (b_body > 0)) | (occ_les >= 0.5) | (occ_ext >= 0.5)
    labels, n = ndi.label(roi, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        raise ValueError(f"lesion at {lesion.centre_mm} mm has an empty mask on this grid")
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        roi = labels == (int(np.argmax(sizes)) + 1)
    mask[box] = roi.astype(np.uint8)


# ---------------------------------------------------------------- scanner
def acquire(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    blur_sigma_mm: float,
    noise_sd: float,
    hu_scale: float,
    hu_offset: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """One centre's scanner: reconstruction blur + slice profile, correlated noise, calibration -> int16.

    Noise is added *before* the blur so that it is correlated the way the
    reconstruction kernel correlates it; its amplitude is pre-scaled by the
    kernel's L2 norm so the stored noise SD equals ``noise_sd`` (in HU, before
    the calibration ``hu_scale``).
    """
    sig_xy = [blur_sigma_mm / s for s in spacing[:2]]
    sig_z = math.sqrt(blur_sigma_mm**2 + (0.42 * spacing[2]) ** 2) / spacing[2]
    sigma = [*sig_xy, sig_z]
    norm = 1.0
    for s in sigma:
        impulse = np.zeros(2 * int(4 * s + 1) + 1, dtype=np.float64)
        impulse[len(impulse) // 2] = 1.0
        norm *= float(np.sqrt((ndi.gaussian_filter1d(impulse, s, mode="constant") ** 2).sum()))
    noisy = hu + rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise_sd / norm)
    out = ndi.gaussian_filter(noisy, sigma, mode="nearest")
    out = out * np.float32(hu_scale) + np.float32(hu_offset)
    return np.clip(np.rint(out), *HU_LIMITS).astype(np.int16)
