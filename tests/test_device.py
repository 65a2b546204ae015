"""Device resolution, AMP rules and the batched on-device augmentation (all on CPU tensors)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
import torch

from common.config import AugmentConfig, ConfigError, ExperimentConfig
from common.configfile import load_config
from common.device import Offer, Runtime, for_config, placed, resolve
from common.device_augment import BatchAugment, Draw, affine_grid_theta, rotation, warp
from common.engine import DataWait, Schedule, predict, recalibrate_batchnorm, train
from common.models import build_model
from tests.test_engine import tiny_arrays, tiny_cfg

CPU_ONLY = Offer((), "2.13.0+cpu", None)
TWO_GPUS = Offer((("NVIDIA A100-SXM4-80GB", True), ("Tesla V100", False)), "2.13.0+cu128", "12.8")


def with_train(cfg: ExperimentConfig, **kw: Any) -> ExperimentConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **kw))


# ---------------------------------------------------------------- resolution


def test_auto_is_the_cpu_without_a_gpu_and_the_first_gpu_with_one() -> None:
    assert resolve("auto", "auto", "auto", offer=CPU_ONLY) == Runtime(
        "cpu", "cpu", "off", "workers", layout_2d="channels_last"
    )
    on_gpu = resolve("auto", "auto", "auto", offer=TWO_GPUS)
    assert on_gpu == Runtime("cuda:0", "NVIDIA A100-SXM4-80GB", "bf16", "device", layout_2d="channels_last")
    # an older GPU without bf16 gets fp16 (with a scaler); DP turns auto AMP off
    assert resolve("cuda:1", "auto", "auto", offer=TWO_GPUS).amp == "fp16"
    assert resolve("cuda", "auto", "workers", offer=TWO_GPUS, dp=True) == Runtime(
        "cuda:0", "NVIDIA A100-SXM4-80GB", "off", "workers"
    )
    # this machine: auto resolves here exactly as torch sees it
    here = for_config(load_config("tiny"))
    assert here.device == ("cuda:0" if torch.cuda.is_available() else "cpu")


def test_cuda_without_a_gpu_is_an_error_naming_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"^train\.device: cuda requested but no CUDA device.*2\.13\.0\+cpu"
    ):
        resolve("cuda", "auto", "auto", offer=CPU_ONLY)
    with pytest.raises(ConfigError, match=r"^--device: cuda:0 requested but no CUDA device"):
        resolve("cuda:0", "auto", "auto", offer=CPU_ONLY, key="--device")
    with pytest.raises(ConfigError, match=r"^train\.device: cuda:2 requested but only 2 CUDA device"):
        resolve("cuda:2", "auto", "auto", offer=TWO_GPUS)
    for bad in ("gpu", "cuda:x", "auto:1", "CUDA", ""):
        with pytest.raises(ConfigError, match=r"^train\.device: "):
            resolve(bad, "auto", "auto", offer=TWO_GPUS)
    if not torch.cuda.is_available():  # the real probe on this machine, through the config
        with pytest.raises(ConfigError, match=r"^train\.device: cuda requested but no CUDA device"):
            for_config(with_train(load_config("tiny"), device="cuda"))


def test_the_config_names_bad_device_keys_and_refuses_dp_with_amp(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match=r"^tiny: train\.device: 'gpu0' is not one of"):
        load_config("tiny", {"train": {"device": "gpu0"}})
    with pytest.raises(ConfigError, match=r"train\.amp: 'half' is not one of"):
        load_config("tiny", {"train": {"amp": "half"}})
    with pytest.raises(ConfigError, match=r"train\.augment_on: 'gpu' is not one of"):
        load_config("tiny", {"train": {"augment_on": "gpu"}})
    dp = {
        "dp": {"enabled": True},
        "models": {"densenet3d": {"norm": "group"}, "densenet2d": {"norm": "group"}},
    }
    for amp in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=rf"train\.amp: {amp} is not compatible with DP-SGD"):
            load_config("tiny", {**dp, "train": {"amp": amp}})
    assert load_config("tiny", {**dp, "train": {"amp": "auto"}}).train.amp == "auto"  # off under DP
    with pytest.raises(ConfigError, match=r"federation\.sim_gpus_per_site: must be a fraction"):
        load_config("tiny", {"federation": {"sim_gpus_per_site": 2.0}})
    assert load_config("tiny", {"train": {"device": "cuda:1"}}).train.device == "cuda:1"  # checked when run


def test_explicit_amp_on_the_cpu_is_refused() -> None:
    """Documented choice (README): bf16/fp16 where the device is the CPU is an error, not a silent fp32 run."""
    for amp in ("bf16", "fp16"):
        with pytest.raises(ConfigError, match=rf"^train\.amp: {amp} needs a CUDA device but train\.device"):
            resolve("cpu", amp, "auto", offer=TWO_GPUS)
        with pytest.raises(ConfigError, match=rf"^train\.amp: {amp} needs a CUDA device"):
            resolve("auto", amp, "auto", offer=CPU_ONLY)
    assert resolve("cpu", "auto", "auto", offer=TWO_GPUS).amp == "off"
    cfg = with_train(tiny_cfg(), device="cpu", amp="fp16")
    model = build_model("densenet3d", cfg.models.densenet3d)
    with pytest.raises(ConfigError, match=r"train\.amp: fp16 needs a CUDA device"):
        train(
            model,
            tiny_arrays(8),
            list(range(8)),
            "densenet3d",
            cfg,
            epochs=1,
            schedule=Schedule(0, 1),
            seed=0,
        )


def test_runtime_autocast_and_scaler_follow_the_amp_choice() -> None:
    assert Runtime("cpu", "cpu").scaler() is None and Runtime("cpu", "cpu").amp_dtype is None
    assert Runtime("cuda:0", "x", "bf16").amp_dtype is torch.bfloat16
    assert Runtime("cuda:0", "x", "fp16").amp_dtype is torch.float16
    with Runtime("cpu", "cpu").autocast():
        assert not torch.is_autocast_enabled()


# ---------------------------------------------------------------- tensor layout


def test_memory_format_auto_is_channels_last_for_2d_only_and_never_under_dp() -> None:
    auto = resolve("cpu", "auto", "auto", offer=CPU_ONLY)
    assert auto.memory_format("densenet2d") == torch.channels_last
    assert auto.memory_format("densenet3d") == torch.contiguous_format
    both = resolve("cpu", "auto", "auto", offer=CPU_ONLY, memory_format="channels_last")
    assert both.memory_format("densenet3d") == torch.channels_last_3d
    assert both.describe()["layout"] == "2d channels_last, 3d channels_last"
    plain = resolve("cpu", "auto", "auto", offer=CPU_ONLY, memory_format="contiguous")
    assert plain.memory_format("densenet2d") == torch.contiguous_format
    dp = resolve("cpu", "auto", "auto", offer=CPU_ONLY, dp=True)
    assert dp.memory_format("densenet2d") == torch.contiguous_format  # Opacus' per-sample hooks
    with pytest.raises(ConfigError, match=r"^train\.memory_format: channels_last is not compatible with DP-SGD"):
        resolve("cpu", "auto", "auto", offer=CPU_ONLY, dp=True, memory_format="channels_last")
    with pytest.raises(ConfigError, match=r"^train\.memory_format: 'nhwc' is not one of"):
        for_config(with_train(load_config("tiny"), memory_format="nhwc"))
    assert for_config(load_config("quick")).memory_format("densenet2d") == torch.channels_last


@pytest.mark.parametrize("kind", ["densenet2d", "densenet3d"])
def test_channels_last_gives_the_same_probabilities_and_hands_the_model_back_contiguous(kind: str) -> None:
    """Only the convolution algorithm changes: outputs agree to float rounding, state dicts stay plain."""
    arrays = tiny_arrays(6, seed=2)
    idx = list(range(6))
    plain_cfg = with_train(tiny_cfg(), memory_format="contiguous")
    fast_cfg = with_train(tiny_cfg(), memory_format="channels_last")
    torch.manual_seed(0)
    model = build_model(kind, getattr(plain_cfg.models, kind))  # type: ignore[arg-type]
    train(model, arrays, idx, kind, plain_cfg, epochs=1, schedule=Schedule(0, 1), seed=1)  # type: ignore[arg-type]
    plain = predict(model, arrays, idx, kind, plain_cfg)  # type: ignore[arg-type]
    fast = predict(model, arrays, idx, kind, fast_cfg)  # type: ignore[arg-type]
    np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-5)
    assert np.ptp(plain) > 1e-4  # a model that separates patients, so the comparison means something
    result = train(model, arrays, idx, kind, fast_cfg, epochs=1, schedule=Schedule(1, 2), seed=1)  # type: ignore[arg-type]
    assert result.steps > 0 and math.isfinite(result.loss)
    assert all(t.is_contiguous() for t in model.state_dict().values())
    fmt = torch.channels_last if kind == "densenet2d" else torch.channels_last_3d
    with placed(model, torch.device("cpu"), fmt):
        convs = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
        assert convs and all(w.is_contiguous(memory_format=fmt) for w in convs)
        assert not all(w.is_contiguous() for w in convs)
    assert all(p.is_contiguous() for p in model.parameters())


# ---------------------------------------------------------------- the engine on the CPU


def _trained(cfg: ExperimentConfig, kind: str = "densenet3d") -> tuple[dict[str, torch.Tensor], np.ndarray]:
    arrays = tiny_arrays(12, seed=3)
    torch.manual_seed(0)
    model = build_model(kind, getattr(cfg.models, kind))  # type: ignore[arg-type]
    idx = list(range(12))
    train(model, arrays, idx, kind, cfg, epochs=2, schedule=Schedule(0, 2), seed=5)  # type: ignore[arg-type]
    return model.state_dict(), predict(model, arrays, idx, kind, cfg)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto is the CPU only on a machine without CUDA")
@pytest.mark.parametrize("kind", ["densenet3d", "densenet2d"])
def test_cpu_and_auto_train_bitwise_identical_weights(kind: str) -> None:
    a_state, a_probs = _trained(with_train(tiny_cfg(), device="cpu", amp="off", augment_on="workers"), kind)
    b_state, b_probs = _trained(with_train(tiny_cfg(), device="auto", amp="auto", augment_on="auto"), kind)
    assert a_state.keys() == b_state.keys()
    for name in a_state:
        assert torch.equal(a_state[name], b_state[name]), name
    np.testing.assert_array_equal(a_probs, b_probs)


def test_device_augmentation_path_trains_on_the_cpu_and_is_deterministic() -> None:
    """The CUDA data path (no augmentation in the loader, batched on the device) run on CPU tensors."""
    cfg = with_train(tiny_cfg(), device="cpu", augment_on="device")
    a_state, a_probs = _trained(cfg)
    b_state, _ = _trained(cfg)
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)
    workers_state, _ = _trained(with_train(tiny_cfg(), device="cpu", augment_on="workers"))
    assert not all(
        torch.equal(a_state[k], workers_state[k]) for k in a_state
    )  # a different augmentation stream
    assert np.isfinite(a_probs).all()


def test_data_wait_is_counted_and_the_model_stays_where_it_was() -> None:
    cfg = tiny_cfg()
    arrays, idx = tiny_arrays(10), list(range(10))
    model = build_model("densenet3d", cfg.models.densenet3d)
    wait = DataWait()
    train(model, arrays, idx, "densenet3d", cfg, epochs=1, schedule=Schedule(0, 1), seed=0, wait=wait)
    assert (
        wait.batches == 2 + 1 and wait.seconds > 0
    )  # two training batches of 8 and 2, one recalibration batch
    recalibrate_batchnorm(model, arrays, idx, "densenet3d", cfg, 0, wait=wait)
    predict(model, arrays, idx, "densenet3d", cfg, wait=wait)
    assert wait.batches == 5
    assert next(model.parameters()).device.type == "cpu"
    with placed(model, torch.device("cpu")) as m:
        assert m is model


# ---------------------------------------------------------------- batched augmentation geometry


def _pattern(shape: tuple[int, ...]) -> torch.Tensor:
    """Two channels: a one-voxel dot off-centre (channel 0) and a binary box around it (channel 1)."""
    x = torch.zeros((1, 2, *shape))
    dot = tuple(s // 4 for s in shape)
    box: tuple[Any, ...] = (0, 1, *(slice(d - 1, d + 2) for d in dot))
    x[(0, 0, *dot)] = 1.0
    x[box] = 1.0
    return x


@pytest.mark.parametrize("ndim", [2, 3])
def test_a_shift_moves_every_channel_by_whole_voxels(ndim: int) -> None:
    shape = (12,) * ndim
    x = _pattern(shape)
    shift = torch.zeros(1, ndim)
    shift[0, 0], shift[0, -1] = -3.0, 2.0  # in = out + t: content moves by -t
    theta = affine_grid_theta(torch.eye(ndim)[None], shift, shape)
    y = warp(x, theta, frozenset({1}))
    expected = torch.zeros_like(x)
    src = tuple(slice(None) for _ in range(2))
    expected[src] = torch.roll(x, shifts=(3, -2), dims=(2, 1 + ndim))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    assert set(torch.unique(y[:, 1]).tolist()) <= {0.0, 1.0}  # the nearest channel stays binary


def test_a_quarter_turn_and_a_flip_land_the_dot_where_geometry_says() -> None:
    shape = (9, 9, 9)
    x = _pattern(shape)  # dot at (2, 2, 2), centre at (4, 4, 4): centred (-2, -2, -2)
    rot = rotation(torch.tensor([[math.pi / 2, 0.0, 0.0]]))  # about axis 0: (a1, a2) -> (-a2, a1)
    y = warp(x, affine_grid_theta(rot, torch.zeros(1, 3), shape), frozenset({1}))
    # out reads in = R @ out, so the dot lands at out = R^T @ in: centred (-2, -2, 2) -> index (2, 2, 6)
    assert torch.argmax(y[0, 0]).item() == np.ravel_multi_index((2, 2, 6), shape)
    assert y[0, 1, 2, 2, 6] == 1.0 and y[0, 1].sum() == 27  # the box turned with it, still 27 voxels

    aug = BatchAugment(AugmentConfig(prob=1.0), 3, nearest_channels=[1])
    flipped = aug.apply(
        x, Draw(torch.eye(3)[None], torch.zeros(1, 3), torch.tensor([False]), torch.tensor([True]))
    )
    assert torch.equal(flipped, x.flip(2))  # left-right = first spatial axis, exact


@pytest.mark.parametrize("ndim", [2, 3])
def test_random_batches_are_deterministic_per_generator_and_identity_when_disabled(ndim: int) -> None:
    x = torch.rand(16, 3, *(16,) * ndim)
    aug = BatchAugment(AugmentConfig(prob=0.5), ndim, nearest_channels=[2])
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == x.shape
    d = aug.draw(16, x.shape[2:], torch.Generator().manual_seed(7))
    untouched = ~(d.affine | d.flip)
    assert untouched.any() and torch.equal(a[untouched], x[untouched])  # not resampled at all
    for off in (AugmentConfig(enabled=False), AugmentConfig(prob=0.0)):
        assert BatchAugment(off, ndim)(x, torch.Generator().manual_seed(7)) is x
    with pytest.raises(ValueError, match="batch"):
        aug(x[0], torch.Generator())


def test_random_draws_stay_in_the_configured_ranges() -> None:
    cfg = AugmentConfig(prob=1.0, rotate_deg=15.0, translate_frac=0.1, scale_frac=0.1, flip=False)
    d = BatchAugment(cfg, 3).draw(500, (20, 20, 20), torch.Generator().manual_seed(0))
    assert d.affine.all() and not d.flip.any()
    assert float(d.shift.abs().max()) <= 2.0 + 1e-6  # 0.1 x 20 voxels
    det = torch.linalg.det(d.matrix)
    assert float(det.min()) >= 0.9**3 - 1e-4 and float(det.max()) <= 1.1**3 + 1e-4  # rotation x scale


def test_simulated_sites_get_a_gpu_share_only_when_configured() -> None:
    from simulation.cli import simulation_resources

    cpu = simulation_resources(load_config("tiny"), 2, 0)
    assert cpu == {"num-supernodes": 0, "client-resources-num-cpus": 1, "init-args-num-cpus": 2}
    share = load_config("tiny", {"federation": {"sim_gpus_per_site": 0.25}})
    assert simulation_resources(load_config("tiny"), 2, 1) == cpu  # no share asked: as on a CPU machine
    assert simulation_resources(share, 2, 0) == cpu  # no GPU: Ray would otherwise schedule no site
    assert simulation_resources(share, 16, 1)["client-resources-num-gpus"] == 0.25


def test_simulated_sites_of_a_round_run_at_once_up_to_twice_the_cores() -> None:
    from common.config import SiteConfig, with_sites
    from simulation.cli import simulation_resources

    def slots(n_sites: int, cpus: int, threads: int = 1) -> object:
        sites = tuple(SiteConfig(name=f"s{i}") for i in range(n_sites))
        cfg = with_sites(load_config("tiny", {"train": {"threads": threads}}), sites)
        return simulation_resources(cfg, cpus, 0)["init-args-num-cpus"]

    assert slots(3, 2) == 3  # all three sites of a round train together on 2 cores
    assert slots(8, 2) == 4  # no more than twice the cores
    assert slots(1, 2) == 2  # never fewer than the cores
    assert slots(3, 2, threads=2) == 4


def test_a_sites_device_report_is_cleaned_and_shown_in_the_report_header() -> None:
    from common.replycheck import MAX_REPORTED_CHARS, reported
    from common.report import _devices

    hostile = {
        "device": "cuda:0",
        "name": "GPU\x1b[2J<script>" + "x" * 500,
        "amp": 7,
        "augment_on": ["device"],
        "patient_ids": "p001,p002",
    }
    kept = reported(hostile)
    assert set(kept) == {"device", "name"} and len(kept["name"]) == MAX_REPORTED_CHARS
    assert "\x1b" not in kept["name"]
    assert reported(Runtime("cpu", "cpu").describe()) == {
        "device": "cpu",
        "name": "cpu",
        "amp": "off",
        "augment_on": "workers",
        "layout": "2d contiguous, 3d contiguous",
    }
    line = _devices(
        {"b": {"device": "cpu", "name": "cpu"}, "a": {"device": "cuda:0", "name": "H100", "amp": "bf16"}}
    )
    assert line == "a: cuda:0 (H100), amp bf16; b: cpu"
