"""Preprocessing: shapes, determinism, physical size, orientation, the real pelvis CT, augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from common.config import AugmentConfig, Preprocess2DConfig, Preprocess3DConfig
from common.roigeometry import hu_window, largest_component, outside_roi, select_slices
from common.sitedata import Case, Volume, load_case, load_nifti, spacing_of
from common.transforms import (
    SOFT_TISSUE_WINDOW,
    WIDE_WINDOW,
    deterministic_2d,
    deterministic_3d,
    random_2d,
    random_3d,
    volume_dict,
)


def sphere_volume(
    radius_mm: float,
    spacing: tuple[float, float, float],
    extent_mm: tuple[float, float, float] = (100.0, 100.0, 90.0),
    centre_mm: tuple[float, float, float] = (48.0, 52.0, 44.0),
) -> Volume:
    """A 400 HU sphere in 40 HU tissue, with a bone slab behind it, on a grid of ``spacing``."""
    shape = tuple(round(e / s) for e, s in zip(extent_mm, spacing, strict=True))
    grid = np.meshgrid(
        *[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij"
    )
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre_mm, strict=True)))
    image = np.where(r <= radius_mm, 400.0, 40.0) + np.where(grid[1] < 15.0, 900.0, 0.0)
    affine = np.diag([*spacing, 1.0])
    return Volume(image.astype(np.float32), (r <= radius_mm).astype(np.uint8), affine, spacing)


def _run(pipeline: Any, volume: Volume) -> dict[str, Any]:
    return dict(pipeline(volume_dict(volume)))


def test_3d_and_2d_shapes_and_range() -> None:
    vol = sphere_volume(12.0, (1.5, 1.5, 3.0))
    out3 = _run(deterministic_3d(Preprocess3DConfig(size=24, fov_mm=96.0)), vol)
    assert out3["image"].shape == (1, 24, 24, 24) and out3["image"].dtype == np.float32
    assert out3["mask"].shape == (1, 24, 24, 24)
    out2 = _run(deterministic_2d(Preprocess2DConfig(size=32, n_slices=3)), vol)
    assert out2["image"].shape == (3, 3, 32, 32) and out2["image"].dtype == np.float32
    assert out2["slice_indices"].shape == (3,)
    for out in (out3, out2):
        assert np.isfinite(out["image"]).all() and out["image"].min() >= 0.0 and out["image"].max() <= 1.0


def test_evaluation_transforms_are_deterministic() -> None:
    vol = sphere_volume(12.0, (1.0, 1.0, 2.0))
    for pipeline in (
        deterministic_3d(Preprocess3DConfig(size=24)),
        deterministic_2d(Preprocess2DConfig(size=32)),
    ):
        a, b = _run(pipeline, vol), _run(pipeline, vol)
        assert np.array_equal(a["image"], b["image"])


def _brute_distance_mm(roi: np.ndarray, step_mm: np.ndarray) -> np.ndarray:
    """Distance (mm) from every grid point to the nearest ROI point, by brute force."""
    pts = np.argwhere(roi) * step_mm
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in roi.shape], indexing="ij"), -1) * step_mm
    return np.sqrt(((grid[..., None, :] - pts) ** 2).sum(-1)).min(-1)


def test_outside_roi_matches_brute_force_distance_on_anisotropic_grids() -> None:
    rng = np.random.default_rng(3)
    for shape, step in [((9, 11, 7), np.array([1.0, 2.0, 3.0])), ((13, 10), np.array([0.7, 1.9]))]:
        roi = rng.random(shape) > 0.97
        out = outside_roi(roi, step, 4.0)
        np.testing.assert_array_equal(out, _brute_distance_mm(roi, step) > 4.0)
    assert not outside_roi(np.zeros((4, 4)), [1.0, 1.0], 2.0).any()  # no ROI: nothing is blanked


@pytest.mark.parametrize("mask_channel", [False, True])
def test_mask_outside_blanks_only_far_from_the_roi_in_3d_and_2d(mask_channel: bool) -> None:
    vol = sphere_volume(12.0, (1.0, 1.0, 2.0))  # a bone slab lies in the box, far from the lesion
    far = 6.0
    for det, plain in [
        (
            deterministic_3d(Preprocess3DConfig(size=24, crop="bbox", margin_mm=20.0, mask_outside_mm=far), mask_channel),
            deterministic_3d(Preprocess3DConfig(size=24, crop="bbox", margin_mm=20.0), mask_channel),
        ),
        (
            deterministic_2d(Preprocess2DConfig(size=32, margin_mm=20.0, mask_outside_mm=far), mask_channel=mask_channel),
            deterministic_2d(Preprocess2DConfig(size=32, margin_mm=20.0), mask_channel=mask_channel),
        ),
    ]:
        a, b = _run(det, vol), _run(plain, vol)
        assert a["image"].shape == b["image"].shape
        if "slice_step_mm" in a:  # 2D: (n, C, s, s), each slice on its own in-plane grid
            for i, step in enumerate(a["slice_step_mm"]):
                dist = _brute_distance_mm(a["mask"][i, 0] > 0, step)
                img_a, img_b = a["image"][i], b["image"][i]
                n_img = img_a.shape[0] - int(mask_channel)
                assert (img_a[:n_img, dist > far] == 0).all()
                np.testing.assert_array_equal(img_a[:n_img, dist <= far], img_b[:n_img, dist <= far])
                np.testing.assert_array_equal(img_a[n_img:], img_b[n_img:])  # the mask channel is kept
                assert (img_b[:n_img, dist > far] > 0).any()  # there was something to blank
        else:  # 3D: (C, S, S, S) on the box's grid
            box = a["box_mm"]
            dist = _brute_distance_mm(a["mask"][0] > 0, (box[1] - box[0]) / 24)
            n_img = a["image"].shape[0] - int(mask_channel)
            assert (a["image"][:n_img, dist > far] == 0).all()
            np.testing.assert_array_equal(a["image"][:n_img, dist <= far], b["image"][:n_img, dist <= far])
            np.testing.assert_array_equal(a["image"][n_img:], b["image"][n_img:])
            assert (b["image"][:n_img, dist > far] > 0).any()


def test_fov_crop_keeps_absolute_size_and_bbox_does_not() -> None:
    fov = Preprocess3DConfig(size=32, fov_mm=64.0)  # 2 mm output voxels
    ratios = []
    for small_sp, big_sp in [((1.0, 1.0, 1.0), (2.0, 2.0, 3.0)), ((2.0, 2.0, 3.0), (0.8, 0.8, 1.5))]:
        small = _run(deterministic_3d(fov), sphere_volume(10.0, small_sp))["mask"].sum()
        big = _run(deterministic_3d(fov), sphere_volume(20.0, big_sp))["mask"].sum()
        ratios.append(big / small)
        # and the absolute volume itself, in output voxels of 8 mm^3
        assert big * 8.0 == pytest.approx(4 / 3 * np.pi * 20.0**3, rel=0.1)
    assert all(6.8 < r < 9.2 for r in ratios), ratios
    bbox = Preprocess3DConfig(size=32, crop="bbox", margin_mm=8.0)
    small = _run(deterministic_3d(bbox), sphere_volume(10.0, (1.0, 1.0, 1.0)))["mask"].sum()
    big = _run(deterministic_3d(bbox), sphere_volume(20.0, (1.0, 1.0, 1.0)))["mask"].sum()
    assert big / small < 3.0  # the study's crop stretches every lesion to the cube


def ellipsoid_volume(spacing: tuple[float, float, float]) -> Volume:
    """A 400 HU ellipsoid with semi-axes 24, 12, 12 mm (2:1:1, long along R) on the grid of ``sphere_volume``."""
    vol = sphere_volume(10.0, spacing)
    r, a, s = np.meshgrid(*[(np.arange(n) + 0.5) * sp for n, sp in zip(vol.mask.shape, spacing, strict=True)], indexing="ij")
    inside = (((r - 48) / 24) ** 2 + ((a - 52) / 12) ** 2 + ((s - 44) / 12) ** 2 <= 1).astype(np.uint8)
    return Volume(np.where(inside > 0, 400.0, 40.0).astype(np.float32), inside, vol.affine, vol.spacing)


def _extents(mask: np.ndarray) -> np.ndarray:
    idx = np.nonzero(mask[0] if mask.ndim == 4 else mask)
    return np.array([i.max() - i.min() + 1 for i in idx], dtype=float)


def test_cube_crop_keeps_an_elongated_lesion_elongated_and_bbox_does_not() -> None:
    lesion = ellipsoid_volume((1.0, 1.0, 2.0))
    cube = _extents(_run(deterministic_3d(Preprocess3DConfig(size=32, crop="cube", margin_mm=4.0)), lesion)["mask"])
    bbox = _extents(_run(deterministic_3d(Preprocess3DConfig(size=32, crop="bbox", margin_mm=4.0)), lesion)["mask"])
    assert cube[0] / cube[1] == pytest.approx(2.0, rel=0.15) and cube[1] == pytest.approx(cube[2], rel=0.15)
    assert cube[0] >= 32 * 48 / 56 - 2  # the longest axis fills the cube but for the margin
    assert bbox[0] / bbox[1] < 1.3  # stretched toward a ball (1.14 from the margins alone)


def test_square_slices_keep_an_elongated_lesion_elongated_on_anisotropic_pixels() -> None:
    lesion = ellipsoid_volume((0.8, 1.25, 2.0))
    square = _run(deterministic_2d(Preprocess2DConfig(size=32, crop="square", margin_mm=4.0)), lesion)["mask"]
    stretched = _run(deterministic_2d(Preprocess2DConfig(size=32, margin_mm=4.0)), lesion)["mask"]
    sq, st = _extents(np.asarray(square)[0, 0]), _extents(np.asarray(stretched)[0, 0])
    assert sq[0] / sq[1] == pytest.approx(2.0, rel=0.15)
    assert st[0] / st[1] < 1.3


def test_same_lesion_at_different_spacing_gives_similar_input() -> None:
    pipeline = deterministic_3d(Preprocess3DConfig(size=32, fov_mm=96.0))
    fine = _run(pipeline, sphere_volume(15.0, (1.0, 1.0, 1.0)))
    coarse = _run(pipeline, sphere_volume(15.0, (2.0, 2.0, 3.0)))
    assert np.abs(fine["image"] - coarse["image"]).mean() < 0.01
    inter = (fine["mask"] * coarse["mask"]).sum()
    union = np.maximum(fine["mask"], coarse["mask"]).sum()
    assert inter / union > 0.8


def test_crop_is_centred_on_the_largest_component_only() -> None:
    vol = sphere_volume(10.0, (1.0, 1.0, 1.0))
    mask = vol.mask.copy()
    mask[2:5, 90:95, 80:85] = 1  # a stray island far from the lesion
    assert largest_component(mask).sum() == vol.mask.sum()
    island = Volume(vol.image, mask, vol.affine, vol.spacing)
    a = _run(deterministic_3d(Preprocess3DConfig(size=32, fov_mm=64.0)), vol)
    b = _run(deterministic_3d(Preprocess3DConfig(size=32, fov_mm=64.0)), island)
    assert np.array_equal(a["image"], b["image"])


def test_fov_outside_the_scan_is_air() -> None:
    image = np.zeros((30, 30, 30), dtype=np.float32)  # 0 HU everywhere
    mask = np.zeros_like(image, dtype=np.uint8)
    mask[0:4, 0:4, 0:4] = 1  # ROI in a corner: most of the cube lies outside the scan
    vol = Volume(image, mask, np.eye(4), (1.0, 1.0, 1.0))
    out = _run(deterministic_3d(Preprocess3DConfig(size=16, fov_mm=32.0, hu_min=-200, hu_max=1500)), vol)[
        "image"
    ][0]
    assert out[0, 0, 0] == pytest.approx(0.0)  # air
    assert out[-1, -1, -1] == pytest.approx(200.0 / 1700.0)  # tissue at 0 HU


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_ras_and_lps_files_give_the_same_output(tmp_path: Path) -> None:
    vol = sphere_volume(12.0, (1.5, 1.25, 3.0), extent_mm=(90.0, 80.0, 60.0), centre_mm=(40.0, 35.0, 28.0))
    image, mask = vol.image.astype(np.int16), vol.mask
    ras = np.diag([1.5, 1.25, 3.0, 1.0])
    ras[:3, 3] = (-40.0, 10.0, 100.0)
    # LPS storage: x and y reversed, with the affine that says so (same world positions)
    nx, ny = image.shape[:2]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = nx - 1, ny - 1
    lps = ras @ flip
    assert nib.aff2axcodes(lps) == ("L", "P", "S")
    cases = {
        name: Case(
            name,
            1,
            _save(tmp_path / f"{name}_img.nii.gz", img, aff),
            _save(tmp_path / f"{name}_mask.nii.gz", msk, aff),
            7,
        )
        for name, img, msk, aff in [
            ("ras", image, mask, ras),
            ("lps", image[::-1, ::-1].copy(), mask[::-1, ::-1].copy(), lps),
        ]
    }
    vols = {k: load_case(c) for k, c in cases.items()}
    for pipeline in (
        deterministic_3d(Preprocess3DConfig(size=24)),
        deterministic_2d(Preprocess2DConfig(size=32)),
    ):
        a, b = _run(pipeline, vols["ras"]), _run(pipeline, vols["lps"])
        np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
    # The geometry is world-based even for a volume handed over in LPS voxel order
    raw = Volume(image[::-1, ::-1].astype(np.float32), mask[::-1, ::-1], lps, vol.spacing)
    direct = _run(deterministic_3d(Preprocess3DConfig(size=24)), raw)
    np.testing.assert_allclose(
        direct["image"], _run(deterministic_3d(Preprocess3DConfig(size=24)), vols["ras"])["image"], atol=1e-5
    )


def test_slice_selection_order_ties_and_repeats() -> None:
    mask = np.zeros((10, 10, 12), dtype=np.uint8)
    areas = {2: 4, 3: 9, 4: 9, 5: 16, 6: 9, 7: 4}  # centroid near z=4.7
    for z, a in areas.items():
        side = int(np.sqrt(a))
        mask[:side, :side, z] = 1
    # largest first; the 9-voxel ties go by distance to the centroid (233 / 51 = 4.57): 4, then 6, not 3
    assert select_slices(mask, 3).tolist() == [5, 4, 6]
    assert select_slices(mask, 5).tolist() == [5, 4, 6, 3, 7]  # 7 is nearer the centroid than 2
    one = np.zeros_like(mask)
    one[2:5, 2:5, 7] = 1
    assert select_slices(one, 3).tolist() == [7, 7, 7]


def test_orthogonal_planes_are_the_largest_section_along_each_axis() -> None:
    """Axial, coronal, sagittal: each the largest section along its own axis, rows and columns as documented."""
    spacing = (0.8, 1.0, 2.5)
    shape = (60, 50, 24)
    x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    # A cuboid lesion whose widest cross-sections sit off its centre, one per axis: a one-voxel
    # wider "collar" at x = 31, y = 22 and z = 11.
    mask = (abs(x - 30) <= 8) & (abs(y - 25) <= 6) & (abs(z - 12) <= 4)
    mask |= (x == 31) & (abs(y - 25) <= 7) & (abs(z - 12) <= 5)
    mask |= (y == 22) & (abs(x - 30) <= 9) & (abs(z - 12) <= 5)
    mask |= (z == 11) & (abs(x - 30) <= 9) & (abs(y - 25) <= 7)
    image = (40.0 * x * spacing[0] + 3.0 * z * spacing[2]).astype(np.float32)  # HU rises along R and S
    vol = Volume(image, mask.astype(np.uint8), np.diag([*spacing, 1.0]), spacing)
    cfg = Preprocess2DConfig(size=32, planes="orthogonal", margin_mm=2.0)
    out = _run(deterministic_2d(cfg, bone_window=(-1000.0, 3000.0)), vol)
    assert out["slice_indices"].tolist() == [11, 22, 31]  # RAS z, y, x
    bone = out["image"][:, 0]  # (3, s, s): HU rises along x (axial rows, coronal rows) and z (columns)
    axial, coronal, sagittal = bone
    def rows_up(a: np.ndarray) -> bool:
        return bool(np.all(np.diff(a[4:-4, 16]) > 0))

    def cols_up(a: np.ndarray) -> bool:
        return bool(np.all(np.diff(a[16, 4:-4]) > 0))

    assert rows_up(axial) and np.ptp(axial[16, 4:-4]) < 1e-4  # axial: x rows, y columns (constant)
    assert rows_up(coronal) and cols_up(coronal)  # coronal: x rows, z columns
    assert np.ptp(sagittal[4:-4, 16]) < 1e-4 and cols_up(sagittal)  # sagittal: y rows (constant), z columns
    # Each section's grid step: its ROI box plus the margin, along its own two in-plane axes.
    box_mm = {0: 19 * 0.8, 1: 15 * 1.0, 2: 11 * 2.5}  # the collar's extents
    for (a, b), step in zip([(0, 1), (0, 2), (1, 2)], out["slice_step_mm"], strict=True):
        assert step == pytest.approx([(box_mm[a] + 4.0) / 32, (box_mm[b] + 4.0) / 32])


def test_axial_planes_are_the_default_and_unchanged() -> None:
    vol = sphere_volume(12.0, (1.0, 1.0, 2.0))
    default = _run(deterministic_2d(Preprocess2DConfig(size=32)), vol)
    axial = _run(deterministic_2d(Preprocess2DConfig(size=32, planes="axial")), vol)
    assert np.array_equal(default["image"], axial["image"])
    assert default["slice_indices"].tolist() == select_slices(vol.mask, 3).tolist()
    ortho = _run(deterministic_2d(Preprocess2DConfig(size=32, planes="orthogonal")), vol)
    assert ortho["image"].shape == default["image"].shape


def test_2d_channels_are_the_three_hu_windows() -> None:
    image = np.full((20, 20, 10), 100.0, dtype=np.float32)
    mask = np.zeros((20, 20, 10), dtype=np.uint8)
    mask[5:15, 5:15, 3:7] = 1
    vol = Volume(image, mask, np.eye(4), (1.0, 1.0, 1.0))
    out = _run(
        deterministic_2d(Preprocess2DConfig(size=16, margin_mm=2.0), bone_window=(-200.0, 1500.0)), vol
    )
    px = out["image"][0, :, 8, 8]
    hu = np.array(100.0)
    expected = [
        hu_window(hu, -200.0, 1500.0),
        hu_window(hu, *SOFT_TISSUE_WINDOW),
        hu_window(hu, *WIDE_WINDOW),
    ]
    np.testing.assert_allclose(px, expected, rtol=1e-5)


# ---------------------------------------------------------------- the real pelvis CT

# A box over the sacrum of pelvis_ct.nii.gz (122x101x112, 3 mm, RAS): midline in x,
# posterior in y, low in z (S1-S4; bone > 200 HU).  22 voxels on each side, so the box
# centre sits between voxels and a 3 mm output grid falls exactly on input voxels.
SACRUM = (slice(50, 72), slice(14, 36), slice(28, 50))


@pytest.fixture(scope="module")
def pelvis(shared_ct: Path) -> Volume:
    image, affine = load_nifti(shared_ct / "pelvis_ct.nii.gz")
    mask = np.zeros(image.shape, dtype=np.uint8)
    mask[SACRUM] = 1
    return Volume(image, mask, affine, spacing_of(affine))


def test_real_ct_sacrum_box_lands_in_the_centre(pelvis: Volume) -> None:
    assert pelvis.image.shape == (122, 101, 112) and pelvis.spacing == (3.0, 3.0, 3.0)
    assert (pelvis.image[SACRUM] > 200).mean() > 0.1  # the box does hold bone
    out = _run(deterministic_3d(Preprocess3DConfig(size=32, fov_mm=96.0)), pelvis)
    # 3 mm output voxels centred on the box centre (voxel 60.5, 24.5, 38.5): output i is input i + 45, 9, 23
    expected = hu_window(pelvis.image[45:77, 9:41, 23:55], -200.0, 1500.0)
    np.testing.assert_allclose(out["image"][0], expected, atol=1e-5)
    box = np.argwhere(out["mask"][0] > 0)
    assert box.min(axis=0).tolist() == [5, 5, 5] and box.max(axis=0).tolist() == [26, 26, 26]


@pytest.mark.parametrize(("size3", "size2"), [(32, 64), (96, 224)])
def test_real_ct_preprocessing_runs(pelvis: Volume, size3: int, size2: int) -> None:
    out3 = _run(deterministic_3d(Preprocess3DConfig(size=size3, fov_mm=128.0)), pelvis)
    out2 = _run(deterministic_2d(Preprocess2DConfig(size=size2)), pelvis)
    assert out3["image"].shape == (1, size3, size3, size3)
    assert out2["image"].shape == (3, 3, size2, size2)
    for img in (out3["image"], out2["image"]):
        assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 1.0
    centre = np.argwhere(out3["mask"][0] > 0).mean(axis=0)
    np.testing.assert_allclose(centre, (size3 - 1) / 2.0, atol=0.6)
    assert all(28 <= z < 50 for z in out2["slice_indices"])
    # the sacrum is bright in the bone window at the cube's centre, not air
    c = size3 // 2
    assert out3["image"][0, c - 2 : c + 2, c - 2 : c + 2, c - 2 : c + 2].mean() > 0.05


def test_real_ct_orthogonal_sections_cut_through_the_sacrum_box(pelvis: Volume) -> None:
    out = _run(deterministic_2d(Preprocess2DConfig(size=64, planes="orthogonal")), pelvis)
    assert out["image"].shape == (3, 3, 64, 64)
    z, y, x = out["slice_indices"].tolist()  # axial, coronal, sagittal: RAS z, y, x
    assert SACRUM[2].start <= z < SACRUM[2].stop
    assert SACRUM[1].start <= y < SACRUM[1].stop
    assert SACRUM[0].start <= x < SACRUM[0].stop
    # every section cuts through the body, not air; each step spans 22 voxels + 2 x 8 mm at 3 mm
    assert all(section[16:48, 16:48].mean() > 0.05 for section in out["image"][:, 0])
    np.testing.assert_allclose(out["slice_step_mm"], (22 * 3.0 + 16.0) / 64)


# ---------------------------------------------------------------- augmentation


def _aug(pipeline: Any, x: torch.Tensor, seed: int) -> torch.Tensor:
    pipeline.set_random_state(seed)
    out = pipeline({"image": x.clone()})["image"]
    assert type(out) is torch.Tensor
    return out


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_transforms_seeded(ndim: int) -> None:
    size = 16
    x = torch.rand(
        (1, size, size, size) if ndim == 3 else (3, size, size), generator=torch.Generator().manual_seed(0)
    )
    cfg = AugmentConfig(prob=1.0)
    pipeline = random_3d(cfg, size) if ndim == 3 else random_2d(cfg, size)
    a, b, c = _aug(pipeline, x, 1), _aug(pipeline, x, 1), _aug(pipeline, x, 2)
    assert a.shape == x.shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, x)


def test_disabled_augmentation_is_identity() -> None:
    x = torch.rand(1, 8, 8, 8)
    for cfg in (AugmentConfig(enabled=False), AugmentConfig(prob=0.0)):
        assert torch.equal(_aug(random_3d(cfg, 8), x, 0), x)
