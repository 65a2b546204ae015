"""Preprocessing of one CT volume and its ROI into the 3D and 2D model inputs.

Everything is a MONAI *dictionary* transform, composed once per config.  The
deterministic part (``deterministic_3d``, ``deterministic_2d``) runs once per
patient and is cached by ``common.dataset``; evaluation sees exactly that
output.  The random part (``random_3d``, ``random_2d``) is training-only
augmentation applied to the cached tensors.

Input dictionaries come from ``volume_dict(volume)``: ``image`` (HU, float32)
and ``mask`` in RAS+ voxel order (as ``sitedata.load_case`` returns them) plus
their ``affine``.  Geometry is done in world millimetres, so a volume stored
LPS, or with anisotropic voxels, gives the same input as its RAS, isotropic
twin.

Conventions (documented because results depend on them):

* **Largest connected component.**  A mask in several pieces is reduced to its
  largest piece (``scipy.ndimage.label``, full 26-connectivity; equal sizes:
  the first in scan order).  A stray island would otherwise stretch the ROI
  box and move the crop centre.
* **3D crop ``fov``** (default): a cube of edge ``fov_mm`` along the world
  R, A, S axes, centred on the centre of the ROI's bounding box, sampled on a
  ``size``^3 grid (voxel edge ``fov_mm / size`` everywhere).  Lesions keep
  their absolute size.  Where the cube leaves the scan it is air (-1000 HU).
  **``bbox``**: the ROI's bounding box plus ``margin_mm`` on each side,
  stretched to ``size``^3 (the study's crop; absolute size is lost, and so is
  elongation: an ellipsoid's box becomes a cube, the lesion a ball).
  **``cube``**: a cube around the same centre whose edge is the box's longest
  side plus ``margin_mm`` on each side: isotropic voxels, so the lesion keeps
  its shape (elongation, lobulation) while filling the input along its
  longest axis; absolute size is lost as with ``bbox``.
* **Resampling** is trilinear after a Gaussian anti-aliasing filter when the
  output grid is coarser than the input (sigma = (factor - 1) / 2 voxels, the
  usual rule), on a sub-block around the output grid only, so a 512x512x400
  scan costs little more than a small one.  The output mask is the resampled
  mask thresholded at 0.5, which keeps its volume.
* **HU windows** clip and scale linearly to [0, 1]; air and the padding are 0.
* **2D slices**: the ``n_slices`` axial (RAS z) slices with the largest
  tumour area, largest first (so ``slice_weights[0]`` weighs the largest);
  equal areas: the slice closer to the mask's centroid first, then the lower
  one.  A tumour on fewer slices repeats its largest slice.  With
  ``d2.planes="orthogonal"`` the three slices are the largest axial, coronal
  (RAS y) and sagittal (RAS x) sections, by the same rule along each axis;
  a slice's rows follow the first of its two in-plane RAS axes (x for axial
  and coronal, y for sagittal), its columns the second.  Each slice's ROI
  bounding box plus ``margin_mm`` in-plane is stretched to ``size``^2, with
  three channels: bone window, soft tissue [-160, 240], wide [-1000, 2000].
* **Augmentation**: with probability ``prob`` an affine (rotation about every
  axis in 3D, in-plane in 2D, translation ``translate_frac * size`` voxels,
  per-axis scaling) and, independently with ``prob``, a left-right flip
  (the first axis is R in both the 3D cube and the axial and coronal slices:
  the mirror image of a sacrum is anatomically plausible, a head-to-foot flip
  is not).  A sagittal slice has no left-right axis; its first axis is A, so
  there the same flip is front-to-back, which makes the 2D network indifferent
  to it (measured with it; see ``quick.yaml``).  Padding is 0, i.e. air.
* **Mask outside** (``d3.mask_outside_mm``, ``d2.mask_outside_mm``; 0 is
  off): after windowing, the image is set to 0 (air) where the Euclidean
  distance (mm, on the crop's own grid) to the ROI exceeds the setting, so
  the network sees the lesion, its rim and the tissue around it, not the
  rest of the box.  The crop (and with it the mask channel) is unchanged.
* **Mask channel** (``preprocess.mask_channel``): the resampled ROI mask is
  appended as the last channel of ``image`` (3D: (2, S, S, S); 2D: (n, 4, s,
  s)).  Augmentation splits it off again, moves image and mask with the same
  random draw (image bilinear, mask nearest, so it stays binary) and joins
  them, so the mask never drifts from the lesion it outlines.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, ConcatItemsd, MapTransform, RandAffined, RandFlipd, ToTensord
from scipy import ndimage

from common.config import AugmentConfig, Planes, Preprocess2DConfig, Preprocess3DConfig
from common.sitedata import Volume

AIR_HU = -1000.0
BONE_WINDOW = (-200.0, 1500.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)
WIDE_WINDOW = (-1000.0, 2000.0)
_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
_TRUNCATE = 4.0  # Gaussian kernel half-width in sigmas (scipy's default)


# ---------------------------------------------------------------- pure helpers


def volume_dict(volume: Volume) -> dict[str, Any]:
    """The dictionary the deterministic transforms act on."""
    return {"image": volume.image, "mask": volume.mask, "affine": volume.affine}


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


# ---------------------------------------------------------------- dictionary transforms


class LargestComponentd(MapTransform):
    """Reduce each mask key to its largest 26-connected component (see the module docstring)."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = largest_component(d[key])
        return d


class CropResampled(MapTransform):
    """Sample ``keys`` on a ``size``^3 world-aligned grid around the ROI (``fov`` or ``bbox`` crop).

    Outputs are channel-first (1, S, S, S) float32; the mask key is
    thresholded at 0.5.  The world box is stored under ``box_mm`` (2, 3).
    """

    def __init__(self, keys: KeysCollection, cfg: Preprocess3DConfig, *, mask_key: str = "mask") -> None:
        super().__init__(keys)
        self.cfg = cfg
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        affine = np.asarray(d["affine"], dtype=np.float64)
        lo, hi = roi_box_mm(d[self.mask_key], affine, self.cfg.crop, self.cfg.fov_mm, self.cfg.margin_mm)
        size = self.cfg.size
        coords = box_coordinates(affine, lo, hi, size)
        sigma = antialias_sigma(np.linalg.inv(affine)[:3, :3], (hi - lo) / size)
        for key in self.key_iterator(d):
            is_mask = key == self.mask_key
            out = sample(np.asarray(d[key]), coords, sigma, 0.0 if is_mask else AIR_HU)
            d[key] = ((out >= 0.5).astype(np.float32) if is_mask else out)[None]
        d["box_mm"] = np.stack([lo, hi])
        return d


class RoiSlicesd(MapTransform):
    """Pick the largest ROI sections (``planes``) and resample each ROI box (``crop``: stretched or square) to ``size``^2.

    ``image`` becomes (n, 1, s, s) HU, the mask (n, 1, s, s) in {0, 1}; each
    section's index along its normal axis (RAS z for axial slices, y for
    coronal, x for sagittal) is stored under ``slice_indices``, its in-plane
    grid step (mm) under ``slice_step_mm``.
    """

    def __init__(self, keys: KeysCollection, cfg: Preprocess2DConfig, *, mask_key: str = "mask") -> None:
        super().__init__(keys)
        self.cfg = cfg
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = np.asarray(d[self.mask_key])
        spacing = np.sqrt((np.asarray(d["affine"], dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
        sections = section_planes(mask, self.cfg.n_slices, self.cfg.planes)
        in_plane = [np.asarray([a for a in range(3) if a != normal]) for normal, _ in sections]
        grids = [
            slice_coordinates(
                np.take(mask, index, axis=normal),
                (float(spacing[axes[0]]), float(spacing[axes[1]])),
                self.cfg.margin_mm,
                self.cfg.size,
                square=self.cfg.crop == "square",
            )
            for (normal, index), axes in zip(sections, in_plane, strict=True)
        ]
        for key in self.key_iterator(d):
            is_mask = key == self.mask_key
            volume = np.asarray(d[key])
            planes = []
            for (normal, index), (coords, step) in zip(sections, grids, strict=True):
                out = sample(
                    np.take(volume, index, axis=normal),
                    coords,
                    antialias_sigma(np.eye(2), step),
                    0.0 if is_mask else AIR_HU,
                )
                planes.append((out >= 0.5).astype(np.float32) if is_mask else out)
            d[key] = np.stack(planes)[:, None]
        d["slice_indices"] = np.asarray([index for _, index in sections], dtype=np.int64)
        d["slice_step_mm"] = np.stack(
            [step * spacing[axes] for (_, step), axes in zip(grids, in_plane, strict=True)]
        )  # (n, 2)
        return d


class HUWindowsd(MapTransform):
    """Replace the single HU channel (at ``channel_axis``) by one [0, 1] channel per window."""

    def __init__(
        self, keys: KeysCollection, windows: Sequence[tuple[float, float]], *, channel_axis: int = 0
    ) -> None:
        super().__init__(keys)
        if not windows or any(hi <= lo for lo, hi in windows):
            raise ValueError(f"HU windows must be non-empty (lo, hi) pairs with hi > lo, got {windows}")
        self.windows = tuple(windows)
        self.channel_axis = channel_axis

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            hu = np.asarray(d[key])
            if hu.shape[self.channel_axis] != 1:
                raise ValueError(
                    f"{key}: expected one HU channel at axis {self.channel_axis}, got {hu.shape}"
                )
            d[key] = np.concatenate(
                [hu_window(hu, lo, hi) for lo, hi in self.windows], axis=self.channel_axis
            )
        return d


def outside_roi(mask: np.ndarray, step_mm: Sequence[float] | np.ndarray, distance_mm: float) -> np.ndarray:
    """Where a grid lies farther than ``distance_mm`` from the ROI ``mask`` (Euclidean, grid step in mm)."""
    roi = np.asarray(mask) > 0
    if not roi.any():
        return np.zeros(roi.shape, dtype=bool)
    dist = ndimage.distance_transform_edt(~roi, sampling=np.asarray(step_mm, dtype=np.float64))
    return np.asarray(dist > distance_mm)


class MaskOutsided(MapTransform):
    """Set every channel of ``image`` to 0 (air after windowing) beyond ``distance_mm`` of the ROI.

    3D: one (C, S, S, S) cube whose grid step comes from ``box_mm``; 2D:
    (n, C, s, s) slices with their own in-plane steps in ``slice_step_mm``.
    """

    def __init__(self, key: str, distance_mm: float, *, mask_key: str = "mask") -> None:
        super().__init__(key)
        self.key, self.distance_mm, self.mask_key = key, float(distance_mm), mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = np.array(d[self.key], dtype=np.float32)  # a copy: the input dict is not changed
        mask = np.asarray(d[self.mask_key])
        if "slice_step_mm" in d:  # 2D: (n, C, s, s), mask (n, 1, s, s)
            for i, step in enumerate(np.asarray(d["slice_step_mm"])):
                image[i][:, outside_roi(mask[i, 0], step, self.distance_mm)] = 0.0
        else:  # 3D: (C, S, S, S), mask (1, S, S, S)
            box = np.asarray(d["box_mm"], dtype=np.float64)
            step = (box[1] - box[0]) / np.asarray(mask.shape[1:], dtype=np.float64)
            image[:, outside_roi(mask[0], step, self.distance_mm)] = 0.0
        d[self.key] = image
        return d


class AppendMaskd(MapTransform):
    """Append ``mask_key`` to each image key as its last channel (at ``channel_axis``)."""

    def __init__(self, keys: KeysCollection, *, mask_key: str = "mask", channel_axis: int = 0) -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.channel_axis = channel_axis

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mask = np.asarray(d[self.mask_key], dtype=np.float32)
        for key in self.key_iterator(d):
            d[key] = np.concatenate([np.asarray(d[key], dtype=np.float32), mask], axis=self.channel_axis)
        return d


class SplitMaskd(MapTransform):
    """Split the last channel of ``image`` off into ``mask`` (undone by ``ConcatItemsd``)."""

    def __init__(self, key: str = "image", mask_key: str = "mask") -> None:
        super().__init__(key)
        self.key, self.mask_key = key, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.key]
        if image.shape[0] < 2:
            raise ValueError(
                f"{self.key}: a mask channel needs at least 2 channels, got shape {tuple(image.shape)}"
            )
        d[self.key], d[self.mask_key] = image[:-1], image[-1:]
        return d


# ---------------------------------------------------------------- composed pipelines


def deterministic_3d(cfg: Preprocess3DConfig, mask_channel: bool = False) -> Compose:
    """Volume dict -> ``image`` (1, S, S, S) float32 in [0, 1] and ``mask`` (1, S, S, S) in {0, 1}.

    ``mask_channel``: ``image`` is (2, S, S, S), the mask its last channel.
    """
    steps: list[Any] = [
        LargestComponentd("mask"),
        CropResampled(("image", "mask"), cfg),
        HUWindowsd("image", [(cfg.hu_min, cfg.hu_max)]),
    ]
    if cfg.mask_outside_mm > 0:
        steps.append(MaskOutsided("image", cfg.mask_outside_mm))
    if mask_channel:
        steps.append(AppendMaskd("image"))
    return Compose(steps)


def deterministic_2d(
    cfg: Preprocess2DConfig, bone_window: tuple[float, float] = BONE_WINDOW, mask_channel: bool = False
) -> Compose:
    """Volume dict -> ``image`` (n, 3, s, s) float32 in [0, 1] and ``slice_indices`` (n,).

    Channels: ``bone_window`` (pass the 3D window to keep both models on the
    same bone contrast), soft tissue, wide; ``mask_channel`` adds the slice's
    ROI mask as a fourth.
    """
    steps: list[Any] = [
        LargestComponentd("mask"),
        RoiSlicesd(("image", "mask"), cfg),
        HUWindowsd("image", [bone_window, SOFT_TISSUE_WINDOW, WIDE_WINDOW], channel_axis=1),
    ]
    if cfg.mask_outside_mm > 0:
        steps.append(MaskOutsided("image", cfg.mask_outside_mm))
    if mask_channel:
        steps.append(AppendMaskd("image", channel_axis=1))
    return Compose(steps)


def _random(cfg: AugmentConfig, ndim: int, size: int, mask_channel: bool) -> Compose:
    """Augmentation of ``{"image": (C, *spatial) tensor}``; returns a plain ``torch.Tensor``."""
    steps: list[Any] = []
    if cfg.enabled and cfg.prob > 0:
        keys = ("image", "mask") if mask_channel else ("image",)
        modes = ("bilinear", "nearest") if mask_channel else ("bilinear",)
        if mask_channel:
            steps.append(SplitMaskd("image", "mask"))
        angle = math.radians(cfg.rotate_deg)
        shift = cfg.translate_frac * size  # MONAI translates in voxels
        steps.append(
            RandAffined(
                keys,
                prob=cfg.prob,
                rotate_range=(angle,) * (3 if ndim == 3 else 1),
                translate_range=(shift,) * ndim,
                scale_range=(cfg.scale_frac,) * ndim,
                mode=modes,
                padding_mode="zeros",
            )
        )
        if cfg.flip:
            steps.append(RandFlipd(keys, prob=cfg.prob, spatial_axis=0))
        if mask_channel:
            steps.append(ConcatItemsd(keys, "image", dim=0))
    steps.append(ToTensord("image", dtype=torch.float32, track_meta=False))
    return Compose(steps)


def random_3d(cfg: AugmentConfig, size: int, mask_channel: bool = False) -> Compose:
    """Training augmentation of a (C, S, S, S) cube; ``size`` (S) turns ``translate_frac`` into voxels.

    ``mask_channel``: the last channel is the ROI mask (moved with the image,
    resampled nearest).  Seed with ``.set_random_state(seed)``.  Disabled
    config: only the tensor conversion.
    """
    return _random(cfg, 3, size, mask_channel)


def random_2d(cfg: AugmentConfig, size: int, mask_channel: bool = False) -> Compose:
    """Training augmentation of one (C, s, s) slice image; ``size`` (s) scales the translation."""
    return _random(cfg, 2, size, mask_channel)
