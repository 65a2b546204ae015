"""The pure geometry under the preprocessing transforms: ROI boxes, sampling grids, resampling, slice choice.

Plain numpy and SciPy on arrays and affines, no MONAI and no config, so each
rule can be tested against numpy alone; ``common.transforms`` wraps them in
dictionary transforms and documents the conventions they implement.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage

from common.config import Planes

_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
_TRUNCATE = 4.0  # Gaussian kernel half-width in sigmas (scipy's default)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``mask > 0`` as uint8; raises on an empty mask."""
    roi = np.asarray(mask) > 0
    if not roi.any():
        raise ValueError("mask is empty: no ROI voxel")
    box = bounding_box(roi)
    labels, n = ndimage.label(roi[box], structure=_FULL_CONNECTIVITY[(slice(None),) * roi.ndim])
    out = np.zeros(roi.shape, dtype=np.uint8)
    if n == 1:
        out[box] = labels > 0
        return out
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out[box] = labels == int(np.argmax(sizes))  # argmax: the first of equal sizes
    return out


def bounding_box(roi: np.ndarray) -> tuple[slice, ...]:
    """Index slices of the smallest box holding every nonzero voxel of ``roi``."""
    idx = np.nonzero(roi)
    return tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)


def square_box(lo: np.ndarray, hi: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """A box with every side equal to ``[lo, hi]``'s longest side plus ``margin`` on each end, same centre.

    Shared by the 3D ``cube`` crop and the 2D ``square`` slices (both in millimetres).
    """
    centre, half = (lo + hi) / 2.0, float(np.max(hi - lo)) / 2.0 + margin
    return centre - half, centre + half


def roi_box_mm(
    mask: np.ndarray, affine: np.ndarray, crop: Literal["fov", "bbox", "cube"], fov_mm: float, margin_mm: float
) -> tuple[np.ndarray, np.ndarray]:
    """World-space (RAS mm) box to sample: low and high corners, each of shape (3,).

    The ROI's physical extent runs from the outer faces of its edge voxels
    (index -0.5 to +0.5), mapped through the affine (all 8 corners, so an
    oblique affine is handled).
    """
    box = bounding_box(mask)
    lo_v = np.array([s.start - 0.5 for s in box])
    hi_v = np.array([s.stop - 0.5 for s in box])
    corners = np.array([[(hi_v if (c >> a) & 1 else lo_v)[a] for a in range(3)] for c in range(8)])
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    lo_w, hi_w = world.min(axis=0), world.max(axis=0)
    if crop == "fov":
        centre = (lo_w + hi_w) / 2.0
        return centre - fov_mm / 2.0, centre + fov_mm / 2.0
    if crop == "bbox":
        return lo_w - margin_mm, hi_w + margin_mm
    if crop == "cube":
        return square_box(lo_w, hi_w, margin_mm)
    raise ValueError(f"crop must be 'fov', 'bbox' or 'cube', got {crop!r}")


def box_coordinates(affine: np.ndarray, lo_mm: np.ndarray, hi_mm: np.ndarray, size: int) -> np.ndarray:
    """Voxel coordinates (3, size, size, size) of a ``size``^3 grid filling a world box.

    Output axes follow the world R, A, S axes; grid points are voxel centres
    (``lo + (i + 0.5) * step``).
    """
    step = (np.asarray(hi_mm, dtype=np.float64) - lo_mm) / size
    axes = [lo_mm[a] + (np.arange(size) + 0.5) * step[a] for a in range(3)]
    inv = np.linalg.inv(affine)
    coords = np.empty((3, size, size, size), dtype=np.float64)
    for c in range(3):
        coords[c] = (
            inv[c, 0] * axes[0][:, None, None]
            + inv[c, 1] * axes[1][None, :, None]
            + inv[c, 2] * axes[2][None, None, :]
            + inv[c, 3]
        )
    return coords


def antialias_sigma(inv_linear: np.ndarray, step: Sequence[float] | np.ndarray) -> np.ndarray:
    """Gaussian sigma (input voxels) per input axis for an output grid of ``step`` (mm or voxels).

    ``inv_linear`` maps output-grid units to input voxels; the downsampling
    factor along input axis c is the largest ``|inv[c, j]| * step[j]``.
    """
    factor = np.max(np.abs(inv_linear) * np.asarray(step, dtype=np.float64)[None, :], axis=1)
    return np.maximum(0.0, (factor - 1.0) / 2.0)


def sample(array: np.ndarray, coords: np.ndarray, sigma: np.ndarray, cval: float) -> np.ndarray:
    """Linear interpolation of ``array`` at voxel ``coords`` (ndim, *out), anti-aliased by ``sigma``.

    Only the block of ``array`` the coordinates touch (plus the filter's
    reach) is filtered and read.  Points outside ``array`` get ``cval``.
    """
    ndim = array.ndim
    flat = coords.reshape(ndim, -1)
    reach = np.ceil(_TRUNCATE * sigma).astype(int) + 2
    lo = np.maximum(np.floor(flat.min(axis=1)).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(flat.max(axis=1)).astype(int) + reach + 1, array.shape)
    out_shape = coords.shape[1:]
    if np.any(hi <= lo):
        return np.full(out_shape, cval, dtype=np.float32)
    block = np.asarray(array[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))], dtype=np.float32)
    if np.any(sigma > 0):
        block = ndimage.gaussian_filter(block, sigma=tuple(sigma), mode="nearest", truncate=_TRUNCATE)
    local = coords - lo.reshape((ndim,) + (1,) * (coords.ndim - 1))
    out = ndimage.map_coordinates(block, local, order=1, mode="constant", cval=cval, output=np.float32)
    return np.asarray(out, dtype=np.float32)


def hu_window(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi] HU and scale linearly to [0, 1] (float32)."""
    return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def select_slices(mask: np.ndarray, n_slices: int) -> np.ndarray:
    """Axial (last-axis) indices of the ``n_slices`` largest tumour cross-sections, largest first.

    Ties go to the slice closer to the mask's centroid, then the lower one; a
    tumour on fewer slices repeats its largest.
    """
    areas = mask.reshape(-1, mask.shape[-1]).sum(axis=0)
    zs = np.nonzero(areas)[0]
    if zs.size == 0:
        raise ValueError("mask is empty: no ROI voxel")
    centroid = float(np.average(zs, weights=areas[zs]))
    order = sorted(zs.tolist(), key=lambda z: (-int(areas[z]), abs(z - centroid), z))
    chosen = order[:n_slices]
    chosen += [chosen[0]] * (n_slices - len(chosen))
    return np.asarray(chosen, dtype=np.int64)


AXIAL, CORONAL, SAGITTAL = 2, 1, 0  # the RAS axis normal to each plane


def section_planes(mask: np.ndarray, n_slices: int, planes: Planes) -> list[tuple[int, int]]:
    """(normal axis, index) of each 2D section, in input order (see the module docstring)."""
    if planes == "orthogonal":
        return [(a, int(select_slices(np.moveaxis(mask, a, -1), 1)[0])) for a in (AXIAL, CORONAL, SAGITTAL)]
    return [(AXIAL, int(z)) for z in select_slices(mask, n_slices)]


def slice_coordinates(
    roi: np.ndarray, spacing_xy: tuple[float, float], margin_mm: float, size: int, *, square: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Voxel coordinates (2, size, size) of a 2D slice's ROI box plus margin, and the grid step (voxels).

    ``square``: a square in millimetres around the box's centre, edge the box's longer side plus
    the margins, so the lesion keeps its in-plane shape instead of being stretched to the square.
    """
    box = bounding_box(roi)
    sp = np.asarray(spacing_xy, dtype=np.float64)
    lo = np.array([box[a].start - 0.5 for a in range(2)], dtype=np.float64)
    hi = np.array([box[a].stop - 0.5 for a in range(2)], dtype=np.float64)
    if square:  # in millimetres, then back to this slice's voxel units
        lo_mm, hi_mm = square_box(lo * sp, hi * sp, margin_mm)
        lo, hi = lo_mm / sp, hi_mm / sp
    else:
        lo, hi = lo - margin_mm / sp, hi + margin_mm / sp
    step = (hi - lo) / size
    grid = [lo[a] + (np.arange(size) + 0.5) * step[a] for a in range(2)]
    gx, gy = np.meshgrid(grid[0], grid[1], indexing="ij")
    return np.stack([gx, gy]), step


def outside_roi(mask: np.ndarray, step_mm: Sequence[float] | np.ndarray, distance_mm: float) -> np.ndarray:
    """Where a grid lies farther than ``distance_mm`` from the ROI ``mask`` (Euclidean, grid step in mm)."""
    roi = np.asarray(mask) > 0
    if not roi.any():
        return np.zeros(roi.shape, dtype=bool)
    dist = ndimage.distance_transform_edt(~roi, sampling=np.asarray(step_mm, dtype=np.float64))
    return np.asarray(dist > distance_mm)
