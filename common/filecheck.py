"""Checks of one case's image and mask files: readable, 3D, in HU, one grid, a usable ROI.

``common.validation`` runs them for every manifest row of a site; prediction
runs them on one pair (``validate_image_mask``), so a case refused at either
place gets the same message.  Each file is read once, through
``sitedata.load_nifti``, in the RAS+ orientation training sees.  nibabel and
SciPy are imported only when a file is read: a ``flower-client run`` whose
cases are all remembered (``common.checkmemo``) reads none, and starts 0.3 s
of CPU sooner.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from common.problems import Problem
from common.sitedata import SiteDataError, load_nifti, spacing_of

logger = logging.getLogger(__name__)

HU_RANGE = (-1100.0, 4000.0)
"""Plausible CT values in HU: air is about -1000, dense cortical bone below 3000."""
MAX_OUT_OF_RANGE_FRACTION = 0.01
"""More than this fraction of voxels outside ``HU_RANGE`` means the volume is not in HU."""
METAL_HU = 3000.0
"""Voxels above this are metal (implants, fiducials) or its streaks, not tissue."""
AFFINE_ATOL = 1e-3
"""Same tolerance as ``sitedata.load_case``, so what passes here loads there."""
_FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # 26-neighbourhood: touching corners join


def _read(path: Path, pid: str, what: str) -> tuple[np.ndarray | None, np.ndarray | None, list[Problem]]:
    """Read one NIfTI once (via ``sitedata.load_nifti``, so in the orientation training sees)."""
    file = str(path)
    if not path.is_file():
        return None, None, [Problem("error", pid, file, "missing_file", f"{what} file not found")]
    try:
        data, affine = load_nifti(path)
    except SiteDataError as exc:
        # Only on failure: look at the header alone to tell "not 3D" from "broken file".
        import nibabel as nib

        try:
            shape: tuple[int, ...] | None = tuple(nib.load(file).shape)  # type: ignore[attr-defined]
        except Exception:
            shape = None
        if shape is not None and not (len(shape) == 3 or (len(shape) == 4 and shape[-1] == 1)):
            msg = f"{what} is not a 3D volume (shape {shape})"
            return None, None, [Problem("error", pid, file, "not_3d", msg)]
        cause = exc.__cause__ or exc
        msg = f"{what} is unreadable or corrupt (truncated or damaged .nii.gz?): {type(cause).__name__}: {cause}"
        return None, None, [Problem("error", pid, file, "corrupt_nifti", msg)]
    return data, affine, []


def _check_affine(pid: str, file: str, affine: np.ndarray, what: str) -> list[Problem]:
    spacing = spacing_of(affine)
    if np.all(np.isfinite(affine)) and min(spacing) > 0:
        return []
    return [
        Problem("error", pid, file, "bad_affine", f"{what} affine is degenerate (voxel spacing {spacing})")
    ]


def _check_hu(pid: str, file: str, image: np.ndarray, hu_range: tuple[float, float]) -> list[Problem]:
    """Is the image in Hounsfield units?  See ``validate_case`` for the rule."""
    out: list[Problem] = []
    finite = np.isfinite(image)
    n_bad = int(image.size - np.count_nonzero(finite))
    if n_bad:
        out.append(
            Problem(
                "error", pid, file, "nonfinite_voxels", f"image has {n_bad} NaN/inf voxel(s) of {image.size}"
            )
        )
        image = image[finite]
    if image.size == 0:
        return out
    vmin, vmax = float(image.min()), float(image.max())
    lo, hi = hu_range
    if vmin >= 0:
        out.append(
            Problem(
                "error",
                pid,
                file,
                "not_hu",
                f"no voxel below 0 (range {vmin:g}..{vmax:g}): CT in HU always has air (about -1000) or "
                "fat (about -100); this looks like stored values without rescale slope/intercept, "
                "a normalised image or a mask",
            )
        )
        return out
    below = image[image < lo]
    # Scanners fill outside the reconstruction circle with one padding value (-2048, -3024...).
    padding, n_padding = None, 0
    if below.size > MAX_OUT_OF_RANGE_FRACTION * image.size:  # a few outliers are not padding
        values, counts = np.unique(below, return_counts=True)
        if counts.max() >= 0.9 * below.size:
            padding, n_padding = float(values[counts.argmax()]), int(counts.max())
    n_above = int(np.count_nonzero(image > hi))
    n_out = below.size - n_padding + n_above
    frac = n_out / image.size
    if frac > MAX_OUT_OF_RANGE_FRACTION:
        out.append(
            Problem(
                "error",
                pid,
                file,
                "hu_out_of_range",
                f"{100 * frac:.1f}% of voxels are outside the plausible CT range [{lo:g}, {hi:g}] HU "
                f"(range {vmin:g}..{vmax:g}): not in HU (unscaled or rescaled values?)",
            )
        )
        return out
    if padding is not None:
        out.append(
            Problem(
                "warning",
                pid,
                file,
                "hu_padding",
                f"{n_padding} voxels hold the padding value {padding:g} (outside the scanner's field of view); "
                "preprocessing clips them to the HU window",
            )
        )
    n_metal = int(np.count_nonzero(image > METAL_HU))
    if n_out or n_metal:
        parts = [f"{n_out} voxel(s) outside [{lo:g}, {hi:g}] HU"] if n_out else []
        parts += [f"{n_metal} voxel(s) above {METAL_HU:g} HU (metal?)"] if n_metal else []
        msg = f"{' and '.join(parts)}, range {vmin:g}..{vmax:g}: check for artefacts"
        out.append(Problem("warning", pid, file, "hu_outliers", msg))
    return out


def _check_mask(pid: str, file: str, mask: np.ndarray) -> list[Problem]:
    out: list[Problem] = []
    finite = np.isfinite(mask)
    if not finite.all():
        n_bad = int(mask.size - np.count_nonzero(finite))
        out.append(Problem("error", pid, file, "nonfinite_voxels", f"mask has {n_bad} NaN/inf voxel(s)"))
    if np.any((mask != 0) & (mask != 1) & finite):
        vals = np.unique(mask[finite])[:8]
        out.append(
            Problem(
                "warning",
                pid,
                file,
                "mask_not_binary",
                f"mask values {vals.tolist()} are not only 0/1; every value > 0.5 counts as tumour",
            )
        )
    roi = mask > 0.5
    if not roi.any():
        out.append(Problem("error", pid, file, "empty_mask", "mask has no voxel > 0.5 (no tumour ROI drawn)"))
        return out
    # Label inside the ROI's bounding box only: a whole CT can be 100 M voxels.
    box = tuple(slice(int(ix.min()), int(ix.max()) + 1) for ix in np.nonzero(roi))
    from scipy import ndimage

    labels, n = ndimage.label(roi[box], structure=_FULL_CONNECTIVITY)
    if n > 1:
        sizes = sorted(np.bincount(labels.ravel())[1:].tolist(), reverse=True)
        shown = ", ".join(map(str, sizes[:5])) + (", ..." if n > 5 else "")
        out.append(
            Problem(
                "warning",
                pid,
                file,
                "fragmented_mask",
                f"mask has {n} disconnected pieces (voxels: {shown}); preprocessing uses the largest "
                "connected component only",
            )
        )
    return out


def _check_files(pid: str, image_path: Path, mask_path: Path, hu_range: tuple[float, float]) -> list[Problem]:
    if image_path == mask_path:
        return [Problem("error", pid, str(mask_path), "mask_is_image", "image and mask are the same file")]
    image, affine, out = _read(image_path, pid, "image")
    if image is not None and affine is not None:
        out += _check_affine(pid, str(image_path), affine, "image")
        out += _check_hu(pid, str(image_path), image, hu_range)
    mask, m_affine, m_problems = _read(mask_path, pid, "mask")
    out += m_problems
    if mask is None or m_affine is None:
        return out
    out += _check_mask(pid, str(mask_path), mask)
    if image is None or affine is None:
        return out
    roi = mask > 0.5
    if roi.any() and (mask.shape != image.shape or not np.allclose(affine, m_affine, atol=AFFINE_ATOL)):
        lo, hi = _world_box(m_affine, mask.shape, roi)
        ilo, ihi = _world_box(affine, image.shape)
        if not _boxes_overlap((lo, hi), (ilo, ihi)):
            out.append(
                Problem(
                    "error",
                    pid,
                    str(mask_path),
                    "mask_outside_image",
                    f"the ROI (world box {_mm(lo)}..{_mm(hi)} mm) lies outside the image "
                    f"({_mm(ilo)}..{_mm(ihi)} mm): the mask was drawn on another scan or series",
                )
            )
    if mask.shape != image.shape:
        out.append(
            Problem(
                "error",
                pid,
                str(mask_path),
                "shape_mismatch",
                f"mask shape {mask.shape} != image shape {image.shape}",
            )
        )
    if not np.allclose(affine, m_affine, atol=AFFINE_ATOL):
        diff = float(np.abs(affine - m_affine).max())
        out.append(
            Problem(
                "error",
                pid,
                str(mask_path),
                "affine_mismatch",
                f"mask affine differs from the image's by up to {diff:.4g} "
                f"(spacing {spacing_of(m_affine)} vs {spacing_of(affine)}, "
                f"origin {m_affine[:3, 3].tolist()} vs {affine[:3, 3].tolist()})",
            )
        )
    return out


def _world_box(
    affine: np.ndarray, shape: tuple[int, ...], roi: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """World (mm) box of a grid of ``shape``, or of the voxels of ``roi`` on it; outer voxel faces included."""
    if roi is None:
        lo_v, hi_v = np.full(3, -0.5), np.asarray(shape[:3], dtype=np.float64) - 0.5
    else:
        nz = np.nonzero(roi)
        lo_v = np.array([i.min() - 0.5 for i in nz], dtype=np.float64)
        hi_v = np.array([i.max() + 0.5 for i in nz], dtype=np.float64)
    corners = np.array([[(hi_v if (c >> a) & 1 else lo_v)[a] for a in range(3)] for c in range(8)])
    world = corners @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    return world.min(axis=0), world.max(axis=0)


def _boxes_overlap(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return bool(np.all(a[0] < b[1]) and np.all(b[0] < a[1]))


def _mm(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{x:.1f}" for x in v) + ")"


def check_files_safely(
    pid: str, image_path: Path, mask_path: Path, hu_range: tuple[float, float]
) -> list[Problem]:
    """``_check_files``, turning any unexpected exception into a problem of this case only."""
    try:
        return _check_files(pid, image_path, mask_path, hu_range)
    except Exception as exc:
        logger.debug("checking patient %s failed", pid, exc_info=True)
        msg = f"checking this case failed: {type(exc).__name__}: {exc}"
        return [Problem("error", pid, str(image_path), "check_failed", msg)]


def validate_image_mask(
    patient_id: str, image: Path, mask: Path, *, hu_range: tuple[float, float] = HU_RANGE
) -> list[Problem]:
    """Every problem of one image/mask pair (no manifest fields): what prediction checks before it runs.

    The same file checks as ``validate_case`` (see there), so a case that
    passes ``flower-client validate`` passes here and the messages agree.
    """
    return check_files_safely(patient_id, Path(image), Path(mask), hu_range)
