"""Training and inference throughput of one network at one input size.

Measured through the project's own engine (``common.engine.train`` for one
epoch, ``common.engine.recalibrate_batchnorm``, ``common.engine.predict``) on
an in-memory ``SiteArrays`` of random data, so the figures include the real
DataLoader, augmentation and prediction rule but no disk I/O or
preprocessing.  A warm-up (one optimiser step and one prediction batch) runs
first and is not timed: it pays for allocator growth and kernel selection.

The device, mixed precision and augmentation placement are the spec's
``train.device``/``train.amp``/``train.augment_on``, resolved by
``common.device`` exactly as in a run; the engine reports its own data wait
(``common.engine.DataWait``), so nothing here replaces or copies any of it.

Each configuration is meant to run in a fresh process (``python -m
bench.throughput --one SPEC_JSON`` prints one JSON object), so its peak RSS
(``VmHWM``) is its own and not the maximum of everything measured before.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from common import engine
from common.config import ConfigError, ExperimentConfig
from common.configfile import load_config
from common.device import Runtime, for_config
from common.features import FEATURE_NAMES
from common.models import ModelKind, build_model, count_parameters, in_channels
from common.sitearrays import SiteArrays

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
Arch = Literal["densenet121", "small"]


class BenchError(RuntimeError):
    """A configuration could not be measured; the message names it."""


@dataclass(frozen=True)
class Spec:
    """One configuration to measure.

    ``preset`` gives the input sizes and the batch size (``quick``: 3D 32^3,
    2D 3 x 64^2, batch 8; ``study``: 96^3, 3 x 224^2, batch 20; ``tiny``: 32^3,
    3 x 32^2).  ``batch=0`` keeps the preset's; ``threads=0`` leaves torch's
    default.  ``device``, ``amp``, ``augment_on`` and ``memory_format`` are
    the ``train.*`` settings of the same names.
    """

    kind: ModelKind
    preset: str
    patients: int
    arch: Arch = "densenet121"
    batch: int = 0
    threads: int = 0
    device: str = "cpu"
    seed: int = 0
    workers: int = -1  # DataLoader worker processes; -1 keeps the preset's
    amp: Literal["auto", "off", "bf16", "fp16"] = "off"
    augment_on: Literal["auto", "workers", "device"] = "auto"
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"

    @property
    def label(self) -> str:
        amp = f", amp {self.amp}" if self.amp != "off" else ""
        return f"{self.kind} {self.arch} {self.preset} ({self.patients} patients, {self.device}{amp})"


@dataclass(frozen=True)
class Measurement:
    """What one configuration measured (seconds for ``patients`` patients, memory in MiB).

    ``train_load_s`` / ``infer_load_s``: time spent waiting for the
    DataLoader's next batch (augmentation included) inside the timed phase.
    ``recal_s`` is 0 when the preset does not recalibrate BatchNorm.
    ``load_avg_1m`` is the machine's 1-minute load average when the
    measurement ended: above the core count, other processes competed for
    the CPUs while it ran.
    """

    kind: str
    preset: str
    arch: str
    input: str
    patients: int
    train_batch: int
    eval_batch: int
    threads: int
    num_workers: int
    device: str
    loop: str
    params: int
    warmup_s: float
    train_s: float
    train_steps: int
    train_loss: float
    train_load_s: float
    recal_s: float
    infer_s: float
    infer_load_s: float
    base_rss_mib: float
    peak_rss_mib: float
    load_avg_1m: float = float("nan")
    gpu_peak_mib: float | None = None
    device_name: str = ""
    amp: str = "off"
    augment_on: str = "workers"
    layout: str = "contiguous"  # the network's resolved tensor layout (train.memory_format)

    @property
    def train_pps(self) -> float:
        return self.patients / self.train_s

    @property
    def infer_pps(self) -> float:
        return self.patients / self.infer_s

    @property
    def train_load_fraction(self) -> float:
        return self.train_load_s / self.train_s

    @property
    def infer_load_fraction(self) -> float:
        return self.infer_load_s / self.infer_s

    def summary(self) -> dict[str, Any]:
        """The raw fields plus the derived rates, for JSON."""
        return {
            **dataclasses.asdict(self),
            "train_patients_per_s": self.train_pps,
            "infer_patients_per_s": self.infer_pps,
            "train_load_fraction": self.train_load_fraction,
            "infer_load_fraction": self.infer_load_fraction,
        }


# ---------------------------------------------------------------- inputs


def bench_config(spec: Spec) -> tuple[ExperimentConfig, bool]:
    """The preset's config with the spec's arch and batch, and whether it recalibrates BatchNorm.

    Recalibration is switched off inside ``train`` so the epoch and the
    recalibration pass are timed separately (``train`` runs exactly the two
    in sequence).  ImageNet weights are not loaded: they do not change the
    cost and need not be on disk.
    """
    cfg = load_config(spec.preset)
    model_cfg = dataclasses.replace(getattr(cfg.models, spec.kind), arch=spec.arch, pretrained=False)
    train = dataclasses.replace(
        cfg.train,
        batch_size=spec.batch or cfg.train.batch_size,
        bn_recalibration=False,
        num_workers=cfg.train.num_workers if spec.workers < 0 else spec.workers,
        device=spec.device,
        amp=spec.amp,
        augment_on=spec.augment_on,
        memory_format=spec.memory_format,
    )
    cfg = dataclasses.replace(
        cfg, models=dataclasses.replace(cfg.models, **{spec.kind: model_cfg}), train=train
    )
    return cfg, load_config(spec.preset).train.bn_recalibration


def random_arrays(
    n: int, size3d: int, size2d: int, n_slices: int, seed: int = 0, mask_channel: bool = False
) -> SiteArrays:
    """``n`` patients of uniform random inputs in [0, 1] (float16, as the cache stores them), labels alternating."""
    if n < 1:
        raise ValueError(f"need at least one patient, got {n}")
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % 2
    return SiteArrays(
        site="bench",
        patient_ids=tuple(f"b{i:04d}" for i in range(n)),
        labels=labels,
        radiologist_scores=np.where(labels == 1, 7, 3).astype(np.int64),
        vol3d=rng.random(
            (n, in_channels("densenet3d", mask_channel), size3d, size3d, size3d), dtype=np.float32
        ).astype(np.float16),
        slices2d=rng.random(
            (n, n_slices, in_channels("densenet2d", mask_channel), size2d, size2d), dtype=np.float32
        ).astype(np.float16),
        slice_indices=np.zeros((n, n_slices), dtype=np.int64),
        features=np.zeros((n, len(FEATURE_NAMES))),
        feature_names=FEATURE_NAMES,
        ages=np.full(n, np.nan),
        sexes=("",) * n,
        sites=("bench",) * n,
    )


def input_label(kind: ModelKind, cfg: ExperimentConfig) -> str:
    if kind == "densenet3d":
        return f"{cfg.preprocess.d3.size}^3"
    return f"{cfg.preprocess.d2.n_slices}x{cfg.preprocess.d2.size}^2"


# ---------------------------------------------------------------- phases


@dataclass(frozen=True)
class _Phases:
    """Train / recalibrate / predict, each one call of ``common.engine`` timing its data wait."""

    model: nn.Module
    arrays: SiteArrays
    kind: ModelKind
    cfg: ExperimentConfig
    seed: int

    def train(self, indices: Sequence[int], wait: engine.DataWait) -> tuple[int, float]:
        res = engine.train(
            self.model,
            self.arrays,
            indices,
            self.kind,
            self.cfg,
            epochs=1,
            schedule=engine.Schedule(0, 1),
            seed=self.seed,
            desc="bench",
            wait=wait,
        )
        return res.steps, res.loss

    def recalibrate(self, indices: Sequence[int], wait: engine.DataWait) -> None:
        engine.recalibrate_batchnorm(
            self.model, self.arrays, indices, self.kind, self.cfg, self.seed, wait=wait
        )

    def predict(self, indices: Sequence[int], wait: engine.DataWait) -> np.ndarray:
        return engine.predict(self.model, self.arrays, indices, self.kind, self.cfg, wait=wait)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_mib(field_name: str = "VmHWM", status: Path = Path("/proc/self/status")) -> float:
    """This process's ``VmHWM`` (peak RSS) or ``VmRSS`` in MiB; ``ru_maxrss`` where /proc is absent."""
    try:
        for line in status.read_text().splitlines():
            if line.startswith(f"{field_name}:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def runtime(cfg: ExperimentConfig) -> Runtime:
    """The spec's device resolved as a run would; an unusable one is a ``BenchError`` naming ``--device``."""
    try:
        return for_config(cfg)
    except ConfigError as exc:
        raise BenchError(str(exc).replace("train.device:", "--device:", 1)) from exc


def warmup_patients(patients: int, batch: int, items_per_patient: int) -> int:
    """Patients for the warm-up: at least one full training batch, never a last batch of one item.

    2D trains on slices (``items_per_patient`` of them), so a whole number of
    patients rarely fills a batch exactly; the smallest count whose items
    fill one batch is used, plus one patient where the remainder would be a
    single item (BatchNorm refuses that in training mode).
    """
    k = max(1, -(-batch // items_per_patient))
    if (k * items_per_patient) % batch == 1:
        k += 1
    return min(k, patients)


def measure(spec: Spec) -> Measurement:
    """Measure ``spec`` in this process (see the module docstring for what is timed).

    ``threads > 0`` sets torch's thread count for the whole process, which is
    why the CLI runs each spec in its own subprocess.
    """
    if spec.patients < 1:
        raise BenchError(f"{spec.label}: need at least one patient")
    base_rss = memory_mib("VmRSS")
    if spec.threads > 0:
        engine.set_threads(spec.threads)
    cfg, recal = bench_config(spec)
    rt = runtime(cfg)
    device = rt.torch_device
    d3, d2 = cfg.preprocess.d3, cfg.preprocess.d2
    arrays = random_arrays(
        spec.patients, d3.size, d2.size, d2.n_slices, seed=spec.seed, mask_channel=cfg.preprocess.mask_channel
    )
    train_batch = cfg.train.batch_size
    eval_batch = engine.eval_batch_size(cfg)
    items_per_patient = d2.n_slices if spec.kind == "densenet2d" else 1  # 2D trains on slices

    n_items = spec.patients * items_per_patient
    if n_items % train_batch == 1 and getattr(cfg.models, spec.kind).norm == "batch":
        raise BenchError(
            f"{spec.label}: the epoch's last training batch would hold a single "
            f"{'slice' if items_per_patient > 1 else 'patient'}, which BatchNorm refuses in training mode "
            "(the engine keeps partial batches); choose another --patients or --batch"
        )

    torch.manual_seed(spec.seed)
    model = build_model(
        spec.kind, getattr(cfg.models, spec.kind), mask_channel=cfg.preprocess.mask_channel
    ).to(device)  # the engine keeps it there
    phases = _Phases(model, arrays, spec.kind, cfg, spec.seed)
    indices = list(range(spec.patients))

    t0 = time.perf_counter()  # warm-up: one full training step, one recalibration and one prediction batch
    phases.train(indices[: warmup_patients(spec.patients, train_batch, items_per_patient)], engine.DataWait())
    warm_eval = indices[: min(spec.patients, eval_batch)]
    if recal:
        phases.recalibrate(warm_eval, engine.DataWait())
    phases.predict(warm_eval, engine.DataWait())
    _sync(device)
    warmup_s = time.perf_counter() - t0

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_clock, recal_clock, infer_clock = engine.DataWait(), engine.DataWait(), engine.DataWait()
    t0 = time.perf_counter()
    steps, loss = phases.train(indices, train_clock)
    _sync(device)
    train_s = time.perf_counter() - t0
    recal_s = 0.0
    if recal:
        t0 = time.perf_counter()
        phases.recalibrate(indices, recal_clock)
        _sync(device)
        recal_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = phases.predict(indices, infer_clock)
    _sync(device)
    infer_s = time.perf_counter() - t0
    if probs.shape != (spec.patients,) or not np.all(np.isfinite(probs)):
        raise BenchError(
            f"{spec.label}: prediction gave {probs.shape} values, finite: {np.isfinite(probs).all()}"
        )
    return Measurement(
        kind=spec.kind,
        preset=spec.preset,
        arch=spec.arch,
        input=input_label(spec.kind, cfg),
        patients=spec.patients,
        train_batch=min(train_batch, spec.patients * items_per_patient),
        eval_batch=min(eval_batch, spec.patients),
        threads=torch.get_num_threads(),
        num_workers=cfg.train.num_workers,
        device=str(device),
        loop="common.engine",
        params=count_parameters(model),
        warmup_s=warmup_s,
        train_s=train_s,
        train_steps=steps,
        train_loss=loss,
        train_load_s=train_clock.seconds,
        recal_s=recal_s,
        infer_s=infer_s,
        infer_load_s=infer_clock.seconds,
        base_rss_mib=base_rss,
        peak_rss_mib=memory_mib("VmHWM"),
        load_avg_1m=os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        gpu_peak_mib=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        device_name=rt.name,
        amp=rt.amp,
        augment_on=rt.augment_on,
        layout=rt.layout(spec.kind),
    )


# ---------------------------------------------------------------- one process per spec


def measure_in_subprocess(spec: Spec, timeout_s: float | None = None) -> Measurement:
    """Run :func:`measure` in a fresh ``python -m bench.throughput --one`` so its peak RSS is its own."""
    cmd = [sys.executable, "-m", "bench.throughput", "--one", json.dumps(dataclasses.asdict(spec))]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{spec.label}: did not finish within {timeout_s:.0f} s") from exc
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise BenchError(f"{spec.label}: measuring process exited with status {proc.returncode}:\n{tail}")
    data = json.loads(lines[-1])
    return Measurement(**{f.name: data[f.name] for f in dataclasses.fields(Measurement)})


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.throughput --one SPEC_JSON``: measure one spec, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=main.__doc__)
    parser.add_argument("--one", required=True, metavar="SPEC_JSON", help="a Spec as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        spec = Spec(**json.loads(args.one))
    except (json.JSONDecodeError, TypeError) as exc:
        parser.error(f"--one: not a valid spec: {exc}")
    try:
        result = measure(spec)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
