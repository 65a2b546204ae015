"""Model factory and training engine on in-memory tiny cohorts."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.config import ModelConfig
from common.configfile import load_config
from common.engine import Schedule, make_loader, predict, recalibrate_batchnorm, train
from common.features import FEATURE_NAMES
from common.metrics import binary_metrics
from common.models import IMAGENET_FILE, PretrainedWeightsError, build_model, load_imagenet_weights
from common.selection import diagnose, fit_select
from common.sitearrays import SiteArrays

S3, S2, NSL = 32, 32, 3


def tiny_arrays(n: int = 32, seed: int = 0, signal: float = 0.6) -> SiteArrays:
    """A bright central blob in malignant patients: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.array([i % 2 for i in range(n)], dtype=np.int64)
    vol = rng.normal(0.3, 0.05, size=(n, 1, S3, S3, S3)).astype(np.float32)
    sl = rng.normal(0.3, 0.05, size=(n, NSL, 3, S2, S2)).astype(np.float32)
    c = slice(S3 // 2 - 5, S3 // 2 + 5)
    vol[labels == 1, :, c, c, c] += signal
    sl[labels == 1, :, :, c, c] += signal
    return SiteArrays(
        site="tiny",
        patient_ids=tuple(f"p{i:03d}" for i in range(n)),
        labels=labels,
        radiologist_scores=np.where(labels == 1, 8, 2).astype(np.int64),
        vol3d=np.clip(vol, 0, 1).astype(np.float16),
        slices2d=np.clip(sl, 0, 1).astype(np.float16),
        slice_indices=np.zeros((n, NSL), dtype=np.int64),
        features=rng.normal(size=(n, len(FEATURE_NAMES))),
        feature_names=FEATURE_NAMES,
        ages=np.full(n, 50.0),
        sexes=("M",) * n,
        sites=("tiny",) * n,
    )


def tiny_cfg():  # type: ignore[no-untyped-def]
    cfg = load_config("tiny")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8, lr=3e-3))


@pytest.mark.parametrize(("kind", "shape"), [("densenet3d", (2, 1, 32, 32, 32)), ("densenet2d", (2, 3, 32, 32))])
def test_small_model_output_shapes(kind: str, shape: tuple[int, ...]) -> None:
    model = build_model(kind, ModelConfig(arch="small"))  # type: ignore[arg-type]
    assert model(torch.zeros(shape)).shape == (2, 2)


def test_real_densenet121_3d_forward_backward_step() -> None:
    """The study's network itself (11.2 M parameters), one optimiser step at 32^3."""
    torch.manual_seed(0)
    model = build_model("densenet3d", ModelConfig(arch="densenet121"))
    assert sum(p.numel() for p in model.parameters()) == 11_244_674
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y = torch.randn(2, 1, 32, 32, 32), torch.tensor([0, 1])
    before = model.class_layers.out.weight.detach().clone()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.class_layers.out.weight)


def test_group_norm_model_has_no_batchnorm_and_no_inplace_relu() -> None:
    model = build_model("densenet3d", ModelConfig(arch="small", norm="group", group_norm_groups=4))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())


def _weights_after_one_epoch(seed: int, label_smoothing: float = 0.0) -> torch.Tensor:
    arrays, cfg = tiny_arrays(16), tiny_cfg()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, label_smoothing=label_smoothing))
    torch.manual_seed(123)
    model = build_model("densenet3d", cfg.models.densenet3d)
    result = train(model, arrays, range(16), "densenet3d", cfg, epochs=1, schedule=Schedule(0, 1), seed=seed)
    if label_smoothing:
        # the loss can never fall below the entropy of the smoothed target, whatever the model
        t = 1 - label_smoothing / 2
        assert result.loss >= -(t * np.log(t) + (1 - t) * np.log(1 - t)) - 1e-6
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_label_smoothing_reaches_the_loss() -> None:
    assert not torch.equal(_weights_after_one_epoch(7), _weights_after_one_epoch(7, label_smoothing=0.9))


def test_training_is_deterministic_given_the_seed() -> None:
    a, b, c = _weights_after_one_epoch(7), _weights_after_one_epoch(7), _weights_after_one_epoch(8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["densenet3d", "densenet2d"])
def test_training_learns_and_passes_the_constant_inverted_check(kind: str) -> None:
    arrays, cfg = tiny_arrays(32), tiny_cfg()
    torch.manual_seed(0)
    model = build_model(kind, getattr(cfg.models, kind))  # type: ignore[arg-type]
    train(model, arrays, range(24), kind, cfg, epochs=4, schedule=Schedule(0, 4), seed=0)  # type: ignore[arg-type]
    probs = predict(model, arrays, range(32), kind, cfg)  # type: ignore[arg-type]
    assert diagnose(probs, arrays.labels) == []
    assert binary_metrics(arrays.labels, probs).auc > 0.8


def test_diagnose_catches_constant_and_inverted_models() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    assert any("constant" in p for p in diagnose(np.full(6, 0.7), y))
    assert any("inverted" in p for p in diagnose(np.array([0.9, 0.8, 0.1, 0.2, 0.7, 0.3]), y))
    assert diagnose(np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7]), y) == []


class _MeanModel(nn.Module):
    """Logit of malignancy = 10 * (mean intensity - 0.5): a known per-slice probability."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = 10 * (x.flatten(1).mean(1) - 0.5)
        return torch.stack([torch.zeros_like(z), z], dim=1)


def test_2d_patient_probability_is_the_weighted_average_of_its_slices() -> None:
    arrays, cfg = tiny_arrays(4), tiny_cfg()
    vals = np.array([0.2, 0.5, 0.8], dtype=np.float32)
    sl = np.broadcast_to(vals[None, :, None, None, None], arrays.slices2d.shape).astype(np.float16)
    arrays = dataclasses.replace(arrays, slices2d=sl)
    got = predict(_MeanModel(), arrays, range(4), "densenet2d", cfg)
    per_slice = 1 / (1 + np.exp(-10 * (vals.astype(np.float16).astype(np.float64) - 0.5)))
    w = np.asarray(cfg.preprocess.d2.slice_weights)
    np.testing.assert_allclose(got, np.full(4, (per_slice * w).sum() / w.sum()), rtol=1e-4)


def _torchvision_style_file(path: Path) -> dict[str, torch.Tensor]:
    """A generated state dict under torchvision's DenseNet121 key names (no download)."""
    monai_state = build_model("densenet2d", ModelConfig(arch="densenet121")).state_dict()
    tv: dict[str, torch.Tensor] = {}
    for k, v in monai_state.items():
        if k.startswith("class_layers"):
            continue
        k2 = re.sub(r"\.layers\.", ".", k) if "denselayer" in k else k
        tv[k2] = torch.full_like(v, 0.125) if v.is_floating_point() else v
    tv["classifier.weight"] = torch.zeros(1000, 1024)
    torch.save(tv, path)
    return tv


def test_imagenet_weights_load_from_a_local_file(tmp_path: Path) -> None:
    path = tmp_path / IMAGENET_FILE
    _torchvision_style_file(path)
    cfg = ModelConfig(arch="densenet121", pretrained=True, pretrained_path=str(path), allow_random_init=False)
    model = build_model("densenet2d", cfg)
    w = model.state_dict()["features.denseblock1.denselayer1.layers.conv1.weight"]
    assert torch.all(w == 0.125)
    assert not torch.all(model.state_dict()["class_layers.out.weight"] == 0.125)  # 2-class head not from ImageNet


def test_missing_imagenet_weights_say_where_and_follow_the_config(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    missing = tmp_path / "none" / IMAGENET_FILE
    strict = ModelConfig(arch="small", pretrained=True, pretrained_path=str(missing), allow_random_init=False)
    with pytest.raises(PretrainedWeightsError, match=re.escape(str(missing))):
        build_model("densenet2d", strict)
    lenient = dataclasses.replace(strict, allow_random_init=True)
    with caplog.at_level(logging.WARNING):
        load_imagenet_weights(build_model("densenet2d", dataclasses.replace(lenient, pretrained=False)), lenient)
    assert "RANDOM initialisation" in caplog.text and str(missing) in caplog.text


def test_a_last_training_batch_of_one_patient_does_not_break_batchnorm() -> None:
    """9 patients at batch 8 would leave one: BatchNorm cannot train on it, so it is dropped."""
    arrays, cfg = tiny_arrays(9), tiny_cfg()
    model = build_model("densenet3d", cfg.models.densenet3d)
    res = train(model, arrays, range(9), "densenet3d", cfg, epochs=1, schedule=Schedule(0, 1), seed=0)
    assert res.steps == 1


def test_batchnorm_recalibration_takes_a_last_patient_left_over_into_the_batch_before() -> None:
    """17 patients at recalibration batches of 16: the 17th cannot be a batch of its own at 32^3.

    In training mode BatchNorm needs more than one value per channel, and
    DenseNet121's last feature map is 1x1x1 here; a site with 17, 33, 49 ...
    training patients failed every validated round.  The 17 go through as one
    batch, so the first BatchNorm layer's running mean is exactly the mean of
    its input over all 17.
    """
    arrays, cfg = tiny_arrays(17), tiny_cfg()
    model = build_model("densenet3d", ModelConfig(arch="densenet121"))
    recalibrate_batchnorm(model, arrays, range(17), "densenet3d", cfg, seed=0)
    x = torch.cat([b["image"].float() for b in make_loader(arrays, range(17), "densenet3d", "eval", cfg, 0)])
    assert x.shape[0] == 17
    with torch.no_grad():
        first = model.features.conv0(x)
    torch.testing.assert_close(model.features.norm0.running_mean, first.mean(dim=(0, 2, 3, 4)), rtol=1e-5, atol=1e-6)


def test_training_accepts_numpy_index_arrays() -> None:
    """Folds give numpy index arrays: BatchNorm recalibration must not test their truth value."""
    arrays, cfg = tiny_arrays(12), tiny_cfg()
    model = build_model("densenet3d", cfg.models.densenet3d)
    res = train(model, arrays, np.arange(12), "densenet3d", cfg, epochs=1, schedule=Schedule(0, 1), seed=0)
    assert res.n_patients == 12


def test_fit_select_keeps_the_best_epoch_inside_the_selection_window() -> None:
    arrays, cfg = tiny_arrays(32), tiny_cfg()

    def run(first_epoch: int):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        model = build_model("densenet3d", cfg.models.densenet3d)
        sel = fit_select(model, arrays, range(20), range(20, 32), "densenet3d", cfg, epochs=3, seed=0, first_epoch=first_epoch)
        return sel, model

    every, _ = run(1)
    window, model = run(3)
    # epochs 1-2 do not compete, so they are neither validated nor recalibrated: the same training,
    # since BatchNorm normalises with batch statistics in training and epoch 3's pass starts afresh
    assert np.isnan(window.val_aucs[:2]).all() and window.val_aucs[2] == every.val_aucs[2]
    assert every.best_epoch == 1 + int(np.argmax(every.val_aucs))  # earliest on ties
    assert window.best_epoch == 3
    for k, v in model.state_dict().items():  # the kept weights are epoch 3's, the last trained
        assert torch.equal(window.state[k], v), k
