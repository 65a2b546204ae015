"""Site preprocessing, its cache, refusal of invalid cases, features and the torch dataset."""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import common.dataset as dataset_mod
from common.config import AugmentConfig, Preprocess2DConfig, Preprocess3DConfig, PreprocessConfig
from common.dataset import PatientDataset, cache_key, preprocess_site
from common.features import FEATURE_NAMES, radiomic_features
from common.sitearrays import SiteArrays, load_arrays
from common.sitedata import SiteDataError, Volume
from common.validation import validate_site

CFG = PreprocessConfig(
    d3=Preprocess3DConfig(size=16, fov_mm=64.0),
    d2=Preprocess2DConfig(size=16, n_slices=3, slice_weights=(0.4, 0.3, 0.3)),
    augment=AugmentConfig(prob=1.0),
)
SPACING = (2.0, 2.0, 3.0)
SHAPE = (40, 40, 24)
VALID = ("p01", "p02", "p03", "p04", "p05", "p06")


def _lesion(radius_mm: float, hu: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(
        *[(np.arange(n) + 0.5) * s for n, s in zip(SHAPE, SPACING, strict=True)], indexing="ij"
    )
    centre = (40.0 + rng.uniform(-5, 5), 40.0 + rng.uniform(-5, 5), 36.0)
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
    image = np.where(r <= radius_mm, hu, 30.0) + rng.normal(0, 10, SHAPE)
    image[:, :, :2] = -1000.0  # air below the patient
    return image.astype(np.int16), (r <= radius_mm).astype(np.uint8)


def _write_site(site: Path) -> None:
    site.mkdir(parents=True)
    (site / "images").mkdir()
    affine = np.diag([*SPACING, 1.0])
    rows = []
    for i, pid in enumerate(VALID):
        label = i % 2
        image, mask = _lesion(8.0 + 2 * i, 300.0 + 200 * label, i)
        if pid == "p03":
            mask[1, 1, 5] = 1  # a stray voxel: a warning, the case is kept
        nib.save(nib.Nifti1Image(image, affine), str(site / "images" / f"{pid}.nii.gz"))
        nib.save(nib.Nifti1Image(mask, affine), str(site / "images" / f"{pid}_mask.nii.gz"))
        rows.append(
            [
                pid,
                label,
                f"images/{pid}.nii.gz",
                f"images/{pid}_mask.nii.gz",
                7 if label else 2,
                40 + i,
                "MF"[i % 2],
            ]
        )
    image, _ = _lesion(10.0, 300.0, 99)
    nib.save(nib.Nifti1Image(image, affine), str(site / "images" / "empty.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), affine), str(site / "images" / "empty_mask.nii.gz"))
    rows += [
        ["x_empty", 1, "images/empty.nii.gz", "images/empty_mask.nii.gz", 8, "", ""],
        ["x_missing", 0, "images/nothere.nii.gz", "images/p01_mask.nii.gz", 2, "", ""],
        ["x_label", 2, "images/p01.nii.gz", "images/p01_mask.nii.gz", 2, "", ""],
        ["x_dup", 0, "images/p02.nii.gz", "images/p02_mask.nii.gz", 3, "", ""],
        ["x_dup", 1, "images/p04.nii.gz", "images/p04_mask.nii.gz", 8, "", ""],
    ]
    with (site / "manifest.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "label", "image", "mask", "radiologist_score", "age", "sex"])
        w.writerows(rows)


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sites") / "centre1"
    _write_site(path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def arrays(site_dir: Path, cache_dir: Path) -> SiteArrays:
    return preprocess_site(site_dir, CFG, cache_dir, site="centre1")


def test_invalid_cases_refused_with_validation_messages(
    site_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="common.dataset"):
        arrays = preprocess_site(site_dir, CFG, tmp_path, site="centre1")
    assert arrays.patient_ids == VALID
    errors = [str(p) for p in validate_site(site_dir).errors]
    assert errors and sorted(arrays.refused) == sorted(errors)
    for pid in ("x_empty", "x_missing", "x_label", "x_dup"):
        assert any(f"patient {pid}:" in m for m in arrays.refused), pid
        assert any(pid in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING), pid


def test_arrays_shapes_dtypes_and_fields(arrays: SiteArrays) -> None:
    n = len(VALID)
    assert len(arrays) == n and arrays.site == "centre1" and arrays.sites == ("centre1",) * n
    assert arrays.vol3d.shape == (n, 1, 16, 16, 16) and arrays.vol3d.dtype == np.float16
    assert arrays.slices2d.shape == (n, 3, 3, 16, 16) and arrays.slices2d.dtype == np.float16
    assert arrays.slice_indices.shape == (n, 3) and arrays.slice_indices.dtype == np.int64
    assert arrays.features.shape == (n, len(FEATURE_NAMES)) and np.isfinite(arrays.features).all()
    assert arrays.labels.tolist() == [0, 1, 0, 1, 0, 1] and arrays.labels.dtype == np.int64
    assert arrays.radiologist_scores.tolist() == [2, 7, 2, 7, 2, 7]
    assert arrays.ages.tolist() == [40.0, 41.0, 42.0, 43.0, 44.0, 45.0] and arrays.sexes == ("M", "F") * 3
    for a in (arrays.vol3d, arrays.slices2d):
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    # log volume grows with the planted radius (8, 10, ... 18 mm)
    assert np.all(np.diff(arrays.features[:, 0]) > 0)


def test_second_call_hits_the_cache(
    site_dir: Path, cache_dir: Path, arrays: SiteArrays, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = list(cache_dir.iterdir())
    assert [f.suffix for f in files] == [".npz"]  # one file, no temporary left behind

    def boom(*args: object) -> None:
        raise AssertionError("preprocessing ran although the cache should have been used")

    monkeypatch.setattr(dataset_mod, "_process_case", boom)
    again = preprocess_site(site_dir, CFG, cache_dir, site="centre1")
    assert again.patient_ids == arrays.patient_ids and again.refused == arrays.refused
    assert np.array_equal(again.vol3d, arrays.vol3d) and np.array_equal(again.features, arrays.features)
    assert load_arrays(files[0]).digest == arrays.digest == cache_key(site_dir, CFG)
    # augmentation is applied later: changing it keeps the cache
    assert (
        preprocess_site(site_dir, dataclasses.replace(CFG, augment=AugmentConfig(prob=0.2)), cache_dir).digest
        == arrays.digest
    )
    # a different preprocessing config is a different key and really preprocesses
    other = dataclasses.replace(CFG, d3=dataclasses.replace(CFG.d3, fov_mm=80.0))
    assert cache_key(site_dir, other) != arrays.digest
    ortho = dataclasses.replace(CFG, d2=dataclasses.replace(CFG.d2, planes="orthogonal"))
    assert cache_key(site_dir, ortho) != arrays.digest  # other 2D sections, other arrays
    with pytest.raises(AssertionError, match="preprocessing ran"):
        preprocess_site(site_dir, other, cache_dir)


def test_changed_file_changes_the_key(site_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "site"
    copy.mkdir()
    for item in site_dir.rglob("*"):
        target = copy / item.relative_to(site_dir)
        if item.is_dir():
            target.mkdir(exist_ok=True)
        else:
            target.write_bytes(item.read_bytes())
            os.utime(target, ns=(item.stat().st_atime_ns, item.stat().st_mtime_ns))
    key = cache_key(copy, CFG)
    assert key == cache_key(site_dir, CFG)  # same content, sizes and mtimes
    mtime = (copy / "images" / "p01.nii.gz").stat().st_mtime_ns
    os.utime(copy / "images" / "p01.nii.gz", ns=(mtime, mtime + 10**9))
    assert cache_key(copy, CFG) != key


def test_worker_processes_give_the_same_arrays(site_dir: Path, arrays: SiteArrays, tmp_path: Path) -> None:
    pooled = preprocess_site(site_dir, CFG, tmp_path, site="centre1", workers=2)
    assert pooled.patient_ids == arrays.patient_ids and pooled.refused == arrays.refused
    assert np.array_equal(pooled.vol3d, arrays.vol3d) and np.array_equal(pooled.slices2d, arrays.slices2d)
    assert np.array_equal(pooled.features, arrays.features)


def test_unusable_site_raises(tmp_path: Path) -> None:
    with pytest.raises(SiteDataError, match="manifest not found"):
        preprocess_site(tmp_path, CFG, tmp_path / "cache")
    (tmp_path / "manifest.csv").write_text(
        "patient_id,label,image,mask,radiologist_score\na,0,nothere.nii.gz,nothere_mask.nii.gz,2\n"
    )
    with pytest.raises(SiteDataError, match="no valid case"):
        preprocess_site(tmp_path, CFG, tmp_path / "cache")


def test_radiomic_features_of_a_sphere() -> None:
    spacing = (1.0, 1.0, 1.5)
    shape = (50, 50, 34)
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    r = np.sqrt((grid[0] - 25) ** 2 + (grid[1] - 25) ** 2 + (grid[2] - 25) ** 2)
    mask = (r <= 12.0).astype(np.uint8)
    image = np.where(mask > 0, 500.0, 20.0).astype(np.float32)
    f = dict(
        zip(
            FEATURE_NAMES,
            radiomic_features(Volume(image, mask, np.diag([*spacing, 1.0]), spacing)),
            strict=True,
        )
    )
    assert f["log_volume_ml"] == pytest.approx(math.log(4 / 3 * math.pi * 12.0**3 / 1000), abs=0.05)
    assert f["mean_hu"] == pytest.approx(500.0) and f["sd_hu"] == pytest.approx(0.0, abs=1e-6)
    assert f["shell_mean_hu"] == pytest.approx(20.0)
    assert f["sphericity"] == pytest.approx(1.0, abs=0.05)
    assert f["max_extent_mm"] == pytest.approx(24.0, abs=2.0)
    cube = np.zeros(shape, np.uint8)
    cube[10:30, 10:20, 10:20] = 1  # an elongated box is less spherical
    g = radiomic_features(Volume(image, cube, np.diag([*spacing, 1.0]), spacing))
    assert g[4] < f["sphericity"] - 0.05  # true value: 0.76
    assert g[5] == pytest.approx(20.0)


def test_subset_concat_and_indices(arrays: SiteArrays) -> None:
    sub = arrays.subset(arrays.indices_of(["p04", "p02"]))
    assert sub.patient_ids == ("p04", "p02") and sub.labels.tolist() == [1, 1]
    assert np.array_equal(sub.vol3d[0], arrays.vol3d[3])
    with pytest.raises(KeyError, match="nobody"):
        arrays.indices_of(["nobody"])
    other = dataclasses.replace(arrays, site="centre2", sites=("centre2",) * len(arrays))
    with pytest.raises(ValueError, match=r"p01.*more than one site"):
        SiteArrays.concat([arrays, other])
    other = dataclasses.replace(other, patient_ids=tuple(f"centre2/{p}" for p in other.patient_ids))
    pooled = SiteArrays.concat([arrays, other])
    assert len(pooled) == 2 * len(arrays) and pooled.site == "pooled"
    assert pooled.patient_ids[0] == "p01" and pooled.patient_ids[-1] == "centre2/p06"
    assert pooled.sites[0] == "centre1" and pooled.sites[-1] == "centre2"
    assert np.array_equal(pooled.vol3d[len(arrays)], arrays.vol3d[0])
    small = dataclasses.replace(other, vol3d=other.vol3d[:, :, :8, :8, :8])
    with pytest.raises(ValueError, match="different preprocessing"):
        SiteArrays.concat([arrays, small])


def test_patient_dataset_items(arrays: SiteArrays) -> None:
    rows = [0, 2, 5]
    ds3 = PatientDataset(arrays, rows, "3d", "eval")
    assert len(ds3) == 3
    item = ds3[1]
    assert item["image"].shape == (1, 16, 16, 16) and item["image"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and int(item["label"]) == 0 and item["index"] == 2
    assert np.array_equal(item["image"].numpy(), arrays.vol3d[2].astype(np.float32))  # no augmentation
    ev2 = PatientDataset(arrays, rows, "2d", "eval", CFG.augment)
    assert len(ev2) == 3 and ev2[2]["image"].shape == (3, 3, 16, 16)
    assert np.array_equal(ev2[2]["image"].numpy(), arrays.slices2d[5].astype(np.float32))
    tr2 = PatientDataset(arrays, rows, "2d", "train", CFG.augment)
    assert len(tr2) == 9 and tr2.labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    it = tr2[7]
    assert it["image"].shape == (3, 16, 16) and it["index"] == 5 and it["slice"] == 1
    batch = next(iter(DataLoader(tr2, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].dtype == torch.int64


def test_augmentation_seeded_and_train_only(arrays: SiteArrays) -> None:
    def images(ds: PatientDataset) -> torch.Tensor:
        return torch.stack([ds[i]["image"] for i in range(len(ds))])

    a = images(PatientDataset(arrays, range(4), "3d", "train", CFG.augment, seed=0))
    b = images(PatientDataset(arrays, range(4), "3d", "train", CFG.augment, seed=0))
    c = images(PatientDataset(arrays, range(4), "3d", "train", CFG.augment, seed=1))
    plain = torch.from_numpy(arrays.vol3d[:4].astype(np.float32))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)
    ds = PatientDataset(arrays, range(4), "3d", "train", CFG.augment, seed=0)
    first = images(ds)
    ds.set_epoch(1)
    assert not torch.equal(first, images(ds))
    ds.set_epoch(0)
    assert torch.equal(first, images(ds))
    off = PatientDataset(arrays, range(4), "3d", "train", AugmentConfig(enabled=False))
    assert torch.equal(images(off), plain)
