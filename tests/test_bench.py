"""The benchmark (``python -m bench``): one configuration measured, the report, the GPU mirror."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bench.__main__ import parse_args, specs
from bench.machine import describe_machine
from bench.report import format_report
from bench.throughput import (
    BenchError,
    LoadClock,
    Spec,
    bench_config,
    measure,
    mirror_predict,
    mirror_recalibrate,
    mirror_train_epoch,
    random_arrays,
    resolve_device,
    warmup_patients,
)
from common import engine
from common.models import build_model


def test_one_configuration_measures_throughput_memory_and_prints_the_machine() -> None:
    result = measure(Spec(kind="densenet3d", preset="tiny", patients=4, arch="small"))
    assert result.loop == "common.engine" and result.input == "32^3" and result.train_steps == 1
    for rate in (result.train_pps, result.infer_pps):
        assert math.isfinite(rate) and rate > 0
    assert 0 < result.train_load_s < result.train_s and 0 < result.train_load_fraction < 1
    assert result.recal_s > 0  # the tiny preset recalibrates BatchNorm
    assert 50 < result.base_rss_mib <= result.peak_rss_mib < 16 * 1024

    machine = describe_machine("python -m bench --test")
    text = format_report(machine, [result])
    assert text.splitlines()[0].startswith(f"Machine: {machine.cpu_model}, {machine.cpu_count} cores")
    assert "Command: python -m bench --test" in text and "torch " in text
    row = next(line for line in text.splitlines() if line.startswith("densenet3d"))
    assert f"{result.train_pps:.3g}" in row and f"{result.peak_rss_mib / 1024:.2f}" in row
    busy = dataclasses.replace(result, load_avg_1m=machine.usable_cpus + 1.0)
    assert "WARNING: the 1-minute load average" in format_report(machine, [busy])
    idle = dataclasses.replace(result, load_avg_1m=0.0)
    assert "WARNING" not in format_report(machine, [idle])


def test_gpu_mirror_gives_the_engines_weights_and_probabilities_on_cpu() -> None:
    """The device loop must stay a faithful copy of common.engine (checked where both can run)."""
    spec = Spec(kind="densenet2d", preset="tiny", patients=6, arch="small")
    cfg, _ = bench_config(spec)
    arrays = random_arrays(6, 32, 32, 3, seed=1)
    idx, cpu = list(range(6)), torch.device("cpu")
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(build_model("densenet2d", cfg.models.densenet2d))
    ref, mirror = models
    res = engine.train(ref, arrays, idx, "densenet2d", cfg, epochs=1, schedule=engine.Schedule(0, 1), seed=3)
    engine.recalibrate_batchnorm(ref, arrays, idx, "densenet2d", cfg, 3)
    steps, loss = mirror_train_epoch(
        mirror, arrays, idx, "densenet2d", cfg, seed=3, device=cpu, clock=LoadClock()
    )
    mirror_recalibrate(mirror, arrays, idx, "densenet2d", cfg, seed=3, device=cpu, clock=LoadClock())
    assert (steps, loss) == (res.steps, res.loss)
    for (name, a), b in zip(ref.state_dict().items(), mirror.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    got = mirror_predict(mirror, arrays, idx, "densenet2d", cfg, device=cpu, clock=LoadClock())
    np.testing.assert_array_equal(got, engine.predict(ref, arrays, idx, "densenet2d", cfg))


def test_warmup_fills_a_batch_and_never_leaves_a_single_item() -> None:
    assert warmup_patients(16, 8, 1) == 8  # 3D: one full batch of patients
    assert warmup_patients(16, 8, 3) == 4  # 2D: 3 patients = 9 slices would leave 1 slice; 4 = 8 + 4
    assert warmup_patients(16, 20, 3) == 8  # 7 patients = 21 slices would leave 1
    assert warmup_patients(5, 20, 3) == 5  # capped at the patients there are


def test_cli_defaults_and_refusals() -> None:
    quick = specs(parse_args(["--quick-only"]))
    assert [(s.kind, s.preset, s.patients) for s in quick] == [
        ("densenet3d", "quick", 16),
        ("densenet2d", "quick", 16),
    ]
    full = specs(parse_args(["--patients", "5", "--batch", "4", "--threads", "1"]))
    assert {s.preset for s in full} == {"quick", "study"} and all(
        (s.patients, s.batch, s.threads) == (5, 4, 1) for s in full
    )
    if not torch.cuda.is_available():
        with pytest.raises(BenchError, match="CUDA is not available"):
            resolve_device("cuda")
    # 5 patients x 3 slices with batch 2 leaves one slice in the last batch: refused with a reason
    with pytest.raises(BenchError, match="single slice"):
        measure(
            dataclasses.replace(Spec(kind="densenet2d", preset="tiny", patients=5, arch="small"), batch=2)
        )
