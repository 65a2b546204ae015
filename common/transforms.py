"""Preprocessing of one CT volume and its ROI into the 3D and 2D model inputs.

Everything is a MONAI *dictionary* transform, composed once per config.  The
deterministic part (``deterministic_3d``, ``deterministic_2d``) runs once per
patient and is cached by ``common.dataset``; evaluation sees exactly that
output.  The random part (``random_3d``, ``random_2d``) is training-only
augmentation applied to the cached tensors.  The geometry they are built on
(boxes, grids, resampling, slice choice) is plain numpy in
``common.roigeometry``.

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
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, ConcatItemsd, MapTransform, RandAffined, RandFlipd, ToTensord

from common.config import AugmentConfig, Preprocess2DConfig, Preprocess3DConfig
from common.roigeometry import (
    antialias_sigma,
    box_coordinates,
    hu_window,
    largest_component,
    outside_roi,
    roi_box_mm,
    sample,
    section_planes,
    slice_coordinates,
)
from common.sitedata import Volume

AIR_HU = -1000.0
BONE_WINDOW = (-200.0, 1500.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)
WIDE_WINDOW = (-1000.0, 2000.0)


# ---------------------------------------------------------------- pure helpers


def volume_dict(volume: Volume) -> dict[str, Any]:
    """The dictionary the deterministic transforms act on."""
    return {"image": volume.image, "mask": volume.mask, "affine": volume.affine}


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
