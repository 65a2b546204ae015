"""The ROI mask as an input channel: alignment through augmentation, cache, models, bundles, prediction."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from client.predict import PatientInput, Predictor
from common.bundle import MANIFEST_NAME, SIGNATURE_NAME, BundleError, FoldModel, read_bundle, write_bundle
from common.config import AugmentConfig, ExperimentConfig, Preprocess2DConfig, Preprocess3DConfig
from common.configfile import load_config
from common.dataset import PatientDataset, cache_key, preprocess_site
from common.engine import Schedule, predict, seed_everything, train
from common.models import build_model, in_channels
from common.signing import sign
from common.sitearrays import SiteArrays
from common.transforms import deterministic_2d, deterministic_3d, random_2d, random_3d, volume_dict

from .onecase import engine_fold_probabilities, one_patient_site, sacrum_roi
from .test_transforms import sphere_volume

# The sacrum box of tests/test_transforms.py (pelvis_ct.nii.gz: 122x101x112, 3 mm, RAS).
# The coordinating site's key: every bundle here is signed (and edited manifests re-signed), so
# what is checked is the manifest's content, not its signature (tests/test_bundle_predict.py).
KEY = Ed25519PrivateKey.generate()
STRONG = AugmentConfig(prob=1.0, rotate_deg=30.0, translate_frac=0.2, scale_frac=0.2, flip=True)


def _asymmetric_blob(ndim: int, size: int) -> np.ndarray:
    """An L-shaped binary blob off the centre: any lone flip, shift or rotation moves it visibly."""
    blob = np.zeros((size,) * ndim, dtype=np.float32)
    lo, hi = size // 4, size // 2
    blob[(slice(4, 11),) + (slice(lo, hi),) * (ndim - 1)] = 1.0
    blob[(slice(4, 7), slice(hi, hi + 4)) + (slice(lo, hi),) * (ndim - 2)] = 1.0
    return blob


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a * b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize("ndim", [2, 3])
def test_mask_and_image_move_together_through_every_random_transform(ndim: int) -> None:
    """Image channels equal the mask before augmentation; after any draw they must still overlap it.

    With strong rotations, shifts and flips, a transform applied to the image alone (or the mask
    alone) drops the overlap far below what bilinear-vs-nearest resampling costs.
    """
    size = 24
    blob = _asymmetric_blob(ndim, size)
    image_channels = 1 if ndim == 3 else 3
    x = torch.from_numpy(np.stack([blob] * (image_channels + 1)))
    pipeline = (
        random_3d(STRONG, size, mask_channel=True)
        if ndim == 3
        else random_2d(STRONG, size, mask_channel=True)
    )
    moved = 0
    for seed in range(12):
        pipeline.set_random_state(seed=seed)
        out = pipeline({"image": x.clone()})["image"]
        assert type(out) is torch.Tensor and out.shape == x.shape
        image, mask = out[:-1].numpy(), out[-1].numpy()
        assert set(np.unique(mask)) <= {0.0, 1.0}, "the mask is resampled nearest: it stays binary"
        for c in range(image_channels):
            assert _dice(image[c] >= 0.5, mask) > 0.85, f"seed {seed}: channel {c} drifted from the mask"
        moved += _dice(mask, blob) < 0.7
        # the check can fail: the image flipped or shifted alone no longer matches its mask
        assert _dice(np.flip(image[0], 0) >= 0.5, mask) < 0.5
        assert _dice(np.roll(image[0], 5, axis=1) >= 0.5, mask) < 0.7
    assert moved >= 6, "the strong augmentation must actually move the blob for this test to mean anything"


@pytest.mark.parametrize("kind", ["densenet3d", "densenet2d"])
def test_the_engines_device_augmentation_moves_the_mask_with_the_image(kind: str) -> None:
    """The batched (device) path: the engine marks the mask channel nearest, so it stays binary and aligned."""
    from common.device import Runtime
    from common.engine import device_augment

    on_device = Runtime("cpu", "cpu", augment_on="device")
    augment = {"prob": 1.0, "rotate_deg": 30.0, "translate_frac": 0.2, "scale_frac": 0.2}
    plain = device_augment(kind, load_config("tiny", {"preprocess": {"augment": augment}}), on_device)
    assert plain is not None and plain.nearest_channels == frozenset()
    cfg = load_config("tiny", {"preprocess": {"mask_channel": True, "augment": augment}})
    aug = device_augment(kind, cfg, on_device)
    channels = in_channels(kind, True)
    assert aug is not None and aug.nearest_channels == {channels - 1}
    ndim, size = (3, 24) if kind == "densenet3d" else (2, 24)
    blob = _asymmetric_blob(ndim, size)
    x = torch.from_numpy(np.stack([np.stack([blob] * channels)] * 6))
    out = aug(x, torch.Generator().manual_seed(0)).numpy()
    for b in range(len(out)):
        image, mask = out[b, :-1], out[b, -1]
        assert set(np.unique(mask)) <= {0.0, 1.0}, "the mask is resampled nearest: it stays binary"
        for c in range(channels - 1):
            assert _dice(image[c] >= 0.5, mask) > 0.85, f"sample {b}: channel {c} drifted from the mask"


def test_deterministic_pipelines_append_the_mask_channel() -> None:
    vol = sphere_volume(12.0, (1.5, 1.5, 3.0))
    out3 = deterministic_3d(Preprocess3DConfig(size=24, crop="bbox"), mask_channel=True)(volume_dict(vol))
    assert out3["image"].shape == (2, 24, 24, 24)
    assert np.array_equal(out3["image"][1:], out3["mask"])
    plain3 = deterministic_3d(Preprocess3DConfig(size=24, crop="bbox"))(volume_dict(vol))
    assert np.array_equal(out3["image"][:1], plain3["image"])
    out2 = deterministic_2d(Preprocess2DConfig(size=32), mask_channel=True)(volume_dict(vol))
    assert out2["image"].shape == (3, 4, 32, 32)
    assert np.array_equal(out2["image"][:, 3:], out2["mask"])
    assert in_channels("densenet3d", True) == 2 and in_channels("densenet2d", True) == 4
    assert in_channels("densenet3d") == 1 and in_channels("densenet2d") == 3


def test_cache_key_and_dataset_follow_the_option(tiny_cohort: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny")
    masked = load_config("tiny", {"preprocess": {"mask_channel": True}})
    site = tiny_cohort / "centre1"
    assert cache_key(site, cfg.preprocess) != cache_key(site, masked.preprocess)
    arrays = preprocess_site(site, masked.preprocess, tmp_path)
    assert arrays.vol3d.shape[1] == 2 and arrays.slices2d.shape[2] == 4
    ds = PatientDataset(arrays, [0, 1], "3d", "train", masked.preprocess.augment, mask_channel=True)
    assert ds[0]["image"].shape == (2, 32, 32, 32)
    with pytest.raises(ValueError, match="mask_channel"):
        PatientDataset(arrays, [0, 1], "3d", "eval")  # image-only config on mask-channel arrays


# ---------------------------------------------------------------- bundles


def _trained_bundle(cfg: ExperimentConfig, arrays: SiteArrays, out: Path) -> Path:
    """Train both tiny networks one epoch on ``arrays`` and write them as a one-fold bundle."""
    models = []
    for kind in ("densenet3d", "densenet2d"):
        seed_everything(0)
        model = build_model(kind, getattr(cfg.models, kind), mask_channel=cfg.preprocess.mask_channel)
        train(model, arrays, range(len(arrays)), kind, cfg, epochs=1, schedule=Schedule(0, 1), seed=0)
        tensors = {k: v.numpy() for k, v in model.state_dict().items() if torch.is_floating_point(v)}
        models.append((FoldModel(kind, 0, 1, None, f"models/{kind}_fold0.npz"), tensors))
    return write_bundle(out, config=cfg, models=models, ensembles=(), metrics={}, source={}, signing_key=KEY)


@pytest.fixture(scope="module")
def pelvis(shared_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    image = shared_ct / "pelvis_ct.nii.gz"
    # not a plain box: the mask channel carries a shape
    return image, sacrum_roi(image, tmp_path_factory.mktemp("pelvis") / "sacrum_roi.nii.gz", notch=True)


def _rewrite_manifest(src: Path, dst: Path, edit: dict[str, object], drop: tuple[str, ...] = ()) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name == MANIFEST_NAME:
                manifest = {**json.loads(data), **edit}
                for key in drop:
                    manifest.pop(key, None)
                data = json.dumps(manifest).encode()
                zout.writestr(SIGNATURE_NAME, sign(data, KEY))
            elif name == SIGNATURE_NAME:
                continue
            zout.writestr(name, data)
    return dst


def test_mask_channel_bundle_predicts_as_the_engine(
    tiny_cohort: Path, pelvis: tuple[Path, Path], tmp_path: Path
) -> None:
    # with the image blanked beyond a few mm of the ROI too (preprocess.d3/d2.mask_outside_mm) and
    # the quick preset's orthogonal 2D sections (preprocess.d2.planes): the bundle's config carries
    # both, so prediction must apply them exactly as the training pipeline
    d2 = {"mask_outside_mm": 6.0, "planes": "orthogonal"}
    cfg = load_config(
        "tiny", {"preprocess": {"mask_channel": True, "d3": {"crop": "bbox", "mask_outside_mm": 6.0}, "d2": d2}}
    )
    arrays = preprocess_site(tiny_cohort / "centre1", cfg.preprocess, tmp_path / "cache")
    path = _trained_bundle(cfg, arrays, tmp_path / "masked.zip")
    bundle = read_bundle(path, KEY.public_key())
    assert bundle.manifest["input_channels"] == {"densenet3d": 2, "densenet2d": 4}
    image, mask = pelvis
    pred = Predictor(bundle, heatmap=True).predict(PatientInput("P1", image, mask), tmp_path / "out")
    assert (tmp_path / "out" / "P1_gradcam.nii.gz").is_file()
    one = one_patient_site(bundle, image, mask, tmp_path)
    for kind, expected in engine_fold_probabilities(bundle, one).items():
        assert pred.fold_probabilities[kind] == pytest.approx(expected, abs=1e-6)
    # a manifest whose channel count disagrees with its config is refused
    bad = _rewrite_manifest(
        path, tmp_path / "bad.zip", {"input_channels": {"densenet3d": 1, "densenet2d": 4}}
    )
    with pytest.raises(BundleError, match="input channel"):
        read_bundle(bad, KEY.public_key())
    hostile = _rewrite_manifest(path, tmp_path / "hostile.zip", {"input_channels": "all"})
    with pytest.raises(BundleError, match="input_channels"):
        read_bundle(hostile, KEY.public_key())


def test_an_old_image_only_bundle_still_predicts(
    tiny_cohort: Path, pelvis: tuple[Path, Path], tmp_path: Path
) -> None:
    """A bundle from before the mask option: no ``input_channels``, no ``mask_channel`` in its config."""
    cfg = load_config("tiny")
    arrays = preprocess_site(tiny_cohort / "centre1", cfg.preprocess, tmp_path / "cache")
    path = _trained_bundle(cfg, arrays, tmp_path / "new.zip")
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read(MANIFEST_NAME))
    config = manifest["config"]
    config["preprocess"].pop("mask_channel")
    old = _rewrite_manifest(path, tmp_path / "old.zip", {"config": config}, drop=("input_channels",))
    bundle = read_bundle(old, KEY.public_key())
    assert "input_channels" not in bundle.manifest and not bundle.config.preprocess.mask_channel
    image, mask = pelvis
    pred = Predictor(bundle, heatmap=False).predict(PatientInput("P1", image, mask), tmp_path / "out")
    one = one_patient_site(bundle, image, mask, tmp_path)
    assert one.vol3d.shape[1] == 1
    for kind, expected in engine_fold_probabilities(bundle, one).items():
        assert pred.fold_probabilities[kind] == pytest.approx(expected, abs=1e-6)


def test_bundle_folds_carry_their_calibration_and_guard(pelvis: tuple[Path, Path], tmp_path: Path) -> None:
    """Fold probabilities are calibrated as in the run; a guarded fold stays out of the mean."""
    from common.foldcalibration import apply_platt

    cfg = load_config("tiny", {"models": {"densenet2d": {"enabled": False}}})
    models = []
    for fold, platt, guard in ((0, (2.0, -0.5), ""), (1, (1.0, 0.0), "inverted on validation")):
        seed_everything(fold)
        model = build_model("densenet3d", cfg.models.densenet3d)
        tensors = {k: v.numpy() for k, v in model.state_dict().items() if torch.is_floating_point(v)}
        models.append(
            (
                FoldModel("densenet3d", fold, 1, 0.7, f"models/densenet3d_fold{fold}.npz", platt, guard),
                tensors,
            )
        )
    path = write_bundle(
        tmp_path / "b.zip", config=cfg, models=models, ensembles=(), metrics={}, source={}, signing_key=KEY
    )
    bundle = read_bundle(path, KEY.public_key())
    assert [fm.platt for fm in bundle.folds["densenet3d"]] == [(2.0, -0.5), (1.0, 0.0)]
    image, mask = pelvis
    pred = Predictor(bundle, heatmap=False).predict(PatientInput("P1", image, mask), tmp_path / "out")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(image, site / "ct.nii.gz")  # manifest paths must stay inside the site folder
    shutil.copy(mask, site / "roi.nii.gz")
    (site / "manifest.csv").write_text(
        "patient_id,label,image,mask,radiologist_score\nP1,1,ct.nii.gz,roi.nii.gz,7\n"
    )
    one = preprocess_site(site, cfg.preprocess, tmp_path / "cache")
    raw = [float(predict(m, one, [0], "densenet3d", cfg)[0]) for m in bundle.build("densenet3d")]
    expected = [float(apply_platt([raw[0]], (2.0, -0.5))[0]), raw[1]]
    assert pred.fold_probabilities["densenet3d"] == pytest.approx(expected, abs=1e-6)
    assert pred.probabilities["densenet3d"] == pytest.approx(expected[0], abs=1e-9)  # fold 1 is guarded
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read(MANIFEST_NAME))
    manifest["models"]["densenet3d"][0]["platt"] = [-2.0, 0.0]  # would invert the fold's ranking
    bad = _rewrite_manifest(path, tmp_path / "bad.zip", {"models": manifest["models"]})
    with pytest.raises(BundleError, match="calibration"):
        read_bundle(bad, KEY.public_key())


def test_imagenet_weights_fill_the_rgb_filters_and_zero_the_mask_filter(tmp_path: Path) -> None:
    from common.config import ModelConfig
    from common.models import IMAGENET_FILE

    from .test_engine import _torchvision_style_file

    path = tmp_path / IMAGENET_FILE
    tv = _torchvision_style_file(path)
    cfg = ModelConfig(arch="densenet121", pretrained=True, pretrained_path=str(path), allow_random_init=False)
    conv0 = build_model("densenet2d", cfg, mask_channel=True).state_dict()["features.conv0.weight"]
    assert conv0.shape[1] == 4
    assert torch.equal(conv0[:, :3], tv["features.conv0.weight"]) and torch.all(conv0[:, 3] == 0)
