"""Grad-CAM of the 3D model, put back on the patient's scan, and a PNG of key slices.

The 3D model sees a cube sampled on a world-aligned (RAS mm) grid around
the ROI (``common.transforms.CropResampled``), so its Grad-CAM lives on that
cube.  :func:`cube_to_grid` maps it onto any voxel grid through the grid's
affine (the input file's own, whatever its orientation), which makes the
saved overlay line up with the CT in any viewer; outside the cube it is 0.

Target layer: Grad-CAM is usually taken at the network's last feature map
(MONAI DenseNet: ``class_layers.relu``), but DenseNet121 divides each side
by 32, leaving a 1^3 map for a 32^3 input (a constant heatmap) and 3^3 at
96^3.  :func:`default_cam_layer` takes the deepest dense-block output whose
map has at least ``MIN_CAM_CELLS`` cells per side.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from monai.visualize import GradCAM
from scipy import ndimage
from torch import nn

log = logging.getLogger(__name__)

MIN_CAM_CELLS = 4
CAM_LAYERS = (
    "class_layers.relu",
    "features.denseblock3",
    "features.denseblock2",
    "features.denseblock1",
)
"""Candidate Grad-CAM layers of a MONAI DenseNet, deepest first."""
MALIGNANT = 1


def feature_sizes(model: nn.Module, cube: int, layers: Sequence[str] = CAM_LAYERS) -> dict[str, int]:
    """Smallest spatial side of each layer's output for a ``cube``^3 input (one no-grad forward)."""
    sizes: dict[str, int] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: sizes.__setitem__(name, min(out.shape[2:]))
        )
        for name in layers
        if name in modules
    ]
    try:
        with torch.no_grad():
            channels = next(m for m in model.modules() if isinstance(m, nn.Conv3d)).in_channels
            model.eval()(torch.zeros(1, channels, cube, cube, cube, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return sizes


def default_cam_layer(model: nn.Module, cube: int) -> str:
    """The deepest of ``CAM_LAYERS`` whose map has at least ``MIN_CAM_CELLS`` cells per side."""
    sizes = feature_sizes(model, cube)
    for name in CAM_LAYERS:
        if sizes.get(name, 0) >= MIN_CAM_CELLS:
            return name
    return max(sizes, key=lambda n: sizes[n]) if sizes else CAM_LAYERS[0]


class CubeGradCAM:
    """Grad-CAM of the malignant class, averaged over fold models (each normalised to [0, 1] by MONAI)."""

    def __init__(self, models: Sequence[nn.Module], layer: str) -> None:
        names = {n for n, _ in models[0].named_modules()} if models else set()
        if layer not in names:
            raise ValueError(
                f"Grad-CAM layer {layer!r} is not in the 3D model (try one of {list(CAM_LAYERS)})"
            )
        self.layer = layer
        self.device = next(models[0].parameters()).device  # the fold models share one (client.predict)
        self._cams = [GradCAM(nn_module=m, target_layers=layer) for m in models]

    def __call__(self, cube: np.ndarray) -> np.ndarray:
        """``cube`` (C, S, S, S) model input (mask channel included) -> (S, S, S) float32 map in [0, 1], on the models' device."""
        x = torch.from_numpy(np.asarray(cube, dtype=np.float32))[None].to(self.device)
        maps = [cam(x, class_idx=MALIGNANT).detach().cpu().numpy()[0, 0] for cam in self._cams]
        out = np.mean(maps, axis=0)
        peak = float(out.max())
        return (out / peak if peak > 0 else out).astype(np.float32)


def cube_to_grid(cam: np.ndarray, box_mm: np.ndarray, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resample a map on the 3D model's cube onto a voxel grid (``affine``, ``shape``), 0 outside the cube.

    The cube's voxel ``i`` sits at world ``lo + (i + 0.5) * step`` on each RAS
    axis (``common.roigeometry.box_coordinates``), so a grid voxel ``v`` at
    world ``A v + t`` reads the cube at ``(A v + t - lo) / step - 0.5``:
    one affine map, evaluated (trilinear) only on the block of the grid the
    cube covers.
    """
    cam = np.asarray(cam, dtype=np.float32)
    lo, hi = np.asarray(box_mm, dtype=np.float64)
    step = (hi - lo) / np.asarray(cam.shape, dtype=np.float64)
    a = np.asarray(affine, dtype=np.float64)
    matrix = a[:3, :3] / step[:, None]
    offset = (a[:3, 3] - lo) / step - 0.5
    out = np.zeros(tuple(int(n) for n in shape[:3]), dtype=np.float32)
    corners = np.array([[(hi if (c >> k) & 1 else lo)[k] for k in range(3)] for c in range(8)])
    vox = (corners - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T
    start = np.maximum(np.floor(vox.min(axis=0)).astype(int) - 1, 0)
    stop = np.minimum(np.ceil(vox.max(axis=0)).astype(int) + 2, out.shape)
    if np.any(stop <= start):
        return out
    block = tuple(slice(int(b), int(e)) for b, e in zip(start, stop, strict=True))
    out[block] = ndimage.affine_transform(
        cam,
        matrix,
        offset=offset + matrix @ start,
        output_shape=tuple(int(e - b) for b, e in zip(start, stop, strict=True)),
        order=1,
        mode="constant",
        cval=0.0,
        output=np.float32,
    )
    return np.clip(out, 0.0, 1.0)


def save_overlay(heat: np.ndarray, like: nib.Nifti1Image, path: Path) -> Path:
    """Write ``heat`` (on ``like``'s voxel grid) as float32 NIfTI with ``like``'s affine and orientation codes."""
    header = like.header.copy()
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(np.asarray(heat, dtype=np.float32), like.affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["descrip"] = b"Grad-CAM of the 3D model, malignant class, [0,1]"
    img.header["aux_file"] = b""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def _show(
    ax: Axes,
    ct: np.ndarray,
    roi: np.ndarray,
    heat: np.ndarray,
    aspect: float,
    window: tuple[float, float],
    title: str,
    left: str,
    right: str,
) -> None:
    """One panel: rows of the 2D arrays run bottom-up (``origin='lower'``), first axis horizontal."""
    ax.imshow(
        ct.T,
        cmap="gray",
        vmin=window[0],
        vmax=window[1],
        origin="lower",
        aspect=aspect,
        interpolation="nearest",
    )
    ax.imshow(
        np.ma.masked_less(heat.T, 0.05),
        cmap="jet",
        vmin=0.0,
        vmax=1.0,
        alpha=0.45,
        origin="lower",
        aspect=aspect,
    )
    if roi.any():
        ax.contour(roi.T.astype(float), levels=[0.5], colors="lime", linewidths=0.8, origin="lower")
    ax.set_title(title, fontsize=9)
    ax.text(0.01, 0.5, left, transform=ax.transAxes, color="yellow", fontsize=8, va="center")
    ax.text(0.99, 0.5, right, transform=ax.transAxes, color="yellow", fontsize=8, va="center", ha="right")
    ax.set_axis_off()


def key_slices_png(
    image: np.ndarray,
    mask: np.ndarray,
    heat: np.ndarray,
    spacing: Sequence[float],
    axial: int,
    window: tuple[float, float],
    title: str,
    path: Path,
) -> Path:
    """Axial slice ``axial`` and the coronal and sagittal planes through the ROI centre, Grad-CAM overlaid.

    Arrays are RAS+ (+x towards the patient's right); panels use the
    radiological convention (patient's right on the viewer's left) and are
    labelled with their sides.
    """
    cx, cy, _ = (round(c) for c in ndimage.center_of_mass(mask > 0))
    sx, sy, sz = spacing
    flip = slice(None, None, -1)  # radiological: high x (patient's right) on the left
    fig = Figure(figsize=(12, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    _show(
        axes[0],
        image[flip, :, axial],
        mask[flip, :, axial],
        heat[flip, :, axial],
        sy / sx,
        window,
        f"axial z={axial} (largest ROI area)",
        "R",
        "L",
    )
    _show(
        axes[1],
        image[flip, cy, :],
        mask[flip, cy, :],
        heat[flip, cy, :],
        sz / sx,
        window,
        f"coronal y={cy}",
        "R",
        "L",
    )
    _show(
        axes[2],
        image[cx, :, :],
        mask[cx, :, :],
        heat[cx, :, :],
        sz / sy,
        window,
        f"sagittal x={cx}",
        "P",
        "A",
    )
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.86, wspace=0.03)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path))
    return path
