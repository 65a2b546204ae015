"""The one training and evaluation engine.

The federated client, the pooled and local-only baselines and the benchmark
all call these functions, so "federated vs pooled vs local" compares like
with like: same loss, optimiser, schedule, augmentation and prediction rule.

Two choices here come from measurements on this task (stack notes):

* cosine learning-rate decay over the *whole* budget (all rounds of a
  federation, or all epochs centrally), because a constant rate made the AUC
  swing between epochs and sometimes collapse;
* BatchNorm recalibration after local training: with few optimiser steps per
  epoch, the running statistics lag the weights and eval-mode outputs became
  nearly constant (AUC inverted).  Recomputing the statistics with the final
  weights (a no-grad pass over the training data) fixes that cheaply.

Every entry point runs where ``train.device`` resolves (``common.device``):
the caller's model is moved there for the call and handed back where it
was, so callers (codecs, checkpoints) keep CPU models.  On CUDA, batches are
pinned, AMP runs as ``train.amp`` resolves and the random augmentation is
batched on the device (``common.device_augment``); on the CPU the path is
the original one, bit for bit.

Beside it: ``common.selection`` (the best-validation epoch of a centralised
run, and the constant/inverted-model guard) and ``common.optimstate`` (the
check of a saved Adam state before it is trusted).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import ExperimentConfig
from .dataset import PatientDataset
from .device import Runtime, for_config, placed
from .device_augment import BatchAugment
from .models import ModelKind, in_channels
from .optimstate import OptimizerStateError, detached_state, load_optimizer_state
from .privacy import PrivacyLedger, finish, make_private
from .seeding import seed_everything
from .sitearrays import SiteArrays

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    """What one call to :func:`train` did (aggregate numbers only)."""

    n_patients: int
    epochs: int
    steps: int
    loss: float
    seconds: float
    lr_last: float
    epsilon: float | None = None
    # The optimiser's state after training (``train.keep_optimizer_state``): the caller keeps it for
    # the next call; it stays where the training ran (a site's own folder), never on the wire.
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Schedule:
    """Where this local training sits in the global budget (for the cosine decay).

    ``start_epoch`` counts epochs already done globally (e.g. ``(round-1) *
    local_epochs`` in a federation); ``total_epochs`` is the whole budget.
    """

    start_epoch: int
    total_epochs: int

    def lr(self, base: float, progress_epochs: float, kind: str) -> float:
        if kind == "constant" or self.total_epochs <= 0:
            return base
        t = min(max((self.start_epoch + progress_epochs) / self.total_epochs, 0.0), 1.0)
        return base * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class DataWait:
    """Seconds spent waiting for the DataLoader's next batch (augmentation in workers included).

    Pass one to :func:`train`, :func:`recalibrate_batchnorm` or
    :func:`predict` to learn how much of a call was data wait (the bench's
    load share); it only reads the clock.
    """

    seconds: float = 0.0
    batches: int = 0


def _waited(batches: Iterable[object], wait: DataWait | None) -> Iterator[object]:
    if wait is None:
        yield from batches
        return
    it = iter(batches)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            wait.seconds += time.perf_counter() - t0
            return
        wait.seconds += time.perf_counter() - t0
        wait.batches += 1
        yield batch


def set_threads(n: int) -> None:
    """Limit torch's intra-op threads so sites sharing a CPU do not oversubscribe it.

    ``n <= 0`` leaves torch's default (all cores).
    """
    if n > 0:
        torch.set_num_threads(n)
        with contextlib.suppress(RuntimeError):  # only settable before the first parallel op
            torch.set_num_interop_threads(1)


def _progress(it: Sequence[object] | DataLoader[dict[str, torch.Tensor]], desc: str) -> Iterator[object]:
    return iter(tqdm(it, desc=desc, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True))


def make_loader(
    arrays: SiteArrays,
    indices: Sequence[int],
    kind: ModelKind,
    mode: Literal["train", "eval"],
    cfg: ExperimentConfig,
    seed: int,
    runtime: Runtime | None = None,
) -> DataLoader[dict[str, torch.Tensor]]:
    """A loader over ``indices`` of ``arrays``: shuffled with augmentation in train mode.

    ``runtime`` (default: the CPU path) decides whether the items are
    augmented here (``augment_on: workers``) or left for the engine to
    augment in batches on the device, and pins memory for CUDA.  Workers
    persist across epochs only when their items carry no per-epoch random
    state (``set_epoch`` does not reach a persistent worker's copy).
    """
    on_device = runtime is not None and runtime.augment_on == "device"
    cuda = runtime is not None and runtime.is_cuda
    ds = PatientDataset(
        arrays,
        indices,
        kind="3d" if kind == "densenet3d" else "2d",
        mode=mode,
        augment=None if on_device else cfg.preprocess.augment,
        seed=seed,
        mask_channel=cfg.preprocess.mask_channel,
    )
    gen = torch.Generator().manual_seed(seed)
    # BatchNorm in training mode cannot normalise a batch of one sample (DenseNet121's final
    # feature map is 1x1x1 at 32^3): training drops that single leftover (reshuffled next
    # epoch); evaluation, which BatchNorm recalibration runs in training mode, puts it into
    # the batch before (17 patients at 16: one batch of 17), so every patient is counted.
    batching: dict[str, Any]
    if mode == "train":
        batch = cfg.train.batch_size
        batching = {"batch_size": batch, "shuffle": True, "drop_last": len(ds) > 1 and len(ds) % batch == 1}
    else:
        batching = {"batch_sampler": eval_batches(len(ds), eval_batch_size(cfg))}
    return DataLoader(
        ds,
        generator=gen,
        num_workers=cfg.train.num_workers,
        pin_memory=cuda,
        persistent_workers=cuda and cfg.train.num_workers > 0 and (mode == "eval" or on_device),
        **batching,
    )


def eval_batches(n: int, batch: int) -> list[list[int]]:
    """Consecutive batches of ``batch`` items in order, a last batch of one joined to the one before."""
    out = [list(range(start, min(start + batch, n))) for start in range(0, n, batch)]
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()
        out[-1] += last
    return out


def eval_batch_size(cfg: ExperimentConfig) -> int:
    """Patients per evaluation batch (prediction, BatchNorm recalibration): no fewer than 16."""
    return max(cfg.train.batch_size, 16)


def device_augment(kind: ModelKind, cfg: ExperimentConfig, runtime: Runtime) -> BatchAugment | None:
    """The batched augmentation of training batches when it runs on the device, else ``None``."""
    if runtime.augment_on != "device" or not (cfg.preprocess.augment.enabled and cfg.preprocess.augment.prob > 0):
        return None
    # the ROI mask (``preprocess.mask_channel``) is the last input channel: nearest-neighbour keeps it binary
    mask = [in_channels(kind, True) - 1] if cfg.preprocess.mask_channel else []
    return BatchAugment(cfg.preprocess.augment, 3 if kind == "densenet3d" else 2, nearest_channels=mask)


def class_weights(labels: np.ndarray) -> torch.Tensor:
    """Inverse-frequency class weights (normalised to mean 1) for an imbalanced site."""
    counts = np.bincount(labels.astype(int), minlength=2).astype(np.float64)
    counts[counts == 0] = 1.0
    w = counts.sum() / (2.0 * counts)
    return torch.tensor(w, dtype=torch.float32)


def train(
    model: nn.Module,
    arrays: SiteArrays,
    indices: Sequence[int],
    kind: ModelKind,
    cfg: ExperimentConfig,
    *,
    epochs: int,
    schedule: Schedule,
    seed: int,
    proximal_mu: float = 0.0,
    desc: str = "train",
    privacy: PrivacyLedger | None = None,
    wait: DataWait | None = None,
    optimizer_state: Mapping[str, Any] | None = None,
    recalibrate: bool = True,
) -> TrainResult:
    """Train ``model`` in place on the patients ``indices`` for ``epochs`` epochs.

    Adam with cross-entropy (optionally class-weighted), learning rate from
    ``schedule``; with ``proximal_mu > 0`` the FedProx term ``mu/2 ||w - w0||^2``
    keeps local weights near the round's global weights ``w0``.  With
    ``cfg.dp.enabled`` and a ``privacy`` ledger, DP-SGD (Opacus) runs and the
    epsilon spent so far is returned.  Runs where ``cfg.train.device``
    resolves; ``model`` is handed back on its own device.

    With ``cfg.train.keep_optimizer_state``, Adam resumes from
    ``optimizer_state`` (the previous call's ``TrainResult.optimizer_state``)
    instead of starting afresh: a fresh Adam's first steps are full-size
    sign-like steps, which every round of a federation (and every epoch of
    ``common.selection.fit_select``) would otherwise repeat.  A state that does not fit
    the model (another network, another version) is logged and training
    starts from a fresh Adam: a stale file never fails a round.

    ``recalibrate=False`` skips ``train.bn_recalibration``'s pass, for a model
    nobody evaluates (a round or an epoch before ``evaluation.select_from_round``).
    """
    keep = cfg.train.keep_optimizer_state
    rt = for_config(cfg)
    dev = rt.torch_device
    seed_everything(seed)
    t0 = time.perf_counter()
    loader = make_loader(arrays, indices, kind, "train", cfg, seed, rt)
    augment = device_augment(kind, cfg, rt)
    labels = arrays.labels[np.asarray(indices, dtype=int)]
    weight = class_weights(labels).to(dev) if cfg.train.class_weighting else None
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.train.label_smoothing)
    with placed(model, dev, rt.memory_format(kind)):
        opt = _resumed_adam(model, cfg, optimizer_state if keep else None, desc)
        anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
        net: nn.Module = model
        engine = None
        if cfg.dp.enabled:
            if privacy is None:
                raise ValueError("dp.enabled needs a privacy ledger (the site's accountant history)")
            net, opt, loader, engine = make_private(model, opt, loader, cfg.dp, privacy, schedule.total_epochs, epochs)
        scaler = rt.scaler()
        steps_per_epoch = max(len(loader), 1)
        steps, loss_sum, n_seen, lr = 0, 0.0, 0, cfg.train.lr
        model.train()
        dataset = loader.dataset
        for epoch in range(epochs):
            if isinstance(dataset, PatientDataset):
                dataset.set_epoch(schedule.start_epoch + epoch)
            gen = _augment_generator(seed, schedule.start_epoch + epoch) if augment is not None else None
            for i, batch in enumerate(_waited(_progress(loader, f"{desc} e{epoch + 1}/{epochs}"), wait)):
                assert isinstance(batch, dict)
                lr = schedule.lr(cfg.train.lr, epoch + i / steps_per_epoch, cfg.train.schedule)
                for group in opt.param_groups:
                    group["lr"] = lr
                x = batch["image"].to(dev, non_blocking=True).float()
                y = batch["label"].to(dev, non_blocking=True).long()
                if len(y) == 0:  # Poisson sampling (DP) can draw an empty batch
                    continue
                if augment is not None and gen is not None:
                    x = augment(x, gen)
                opt.zero_grad(set_to_none=True)
                with rt.autocast():
                    loss = loss_fn(net(x), y)
                if anchor:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                    loss = loss + 0.5 * proximal_mu * prox
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                steps += 1
                loss_sum += float(loss.detach()) * len(y)
                n_seen += len(y)
        epsilon = finish(engine, privacy, cfg.dp.delta, net) if engine is not None and privacy is not None else None
        if cfg.train.bn_recalibration and recalibrate:
            recalibrate_batchnorm(model, arrays, indices, kind, cfg, seed, wait=wait)
    return TrainResult(
        n_patients=len(indices),
        epochs=epochs,
        steps=steps,
        loss=loss_sum / max(n_seen, 1),
        seconds=time.perf_counter() - t0,
        lr_last=lr,
        epsilon=epsilon,
        optimizer_state=detached_state(opt.state_dict()) if keep else None,
    )


def _adam(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    """The training optimiser of every caller (the study's Adam), fresh."""
    return torch.optim.Adam(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def _resumed_adam(
    model: nn.Module, cfg: ExperimentConfig, state: Mapping[str, Any] | None, desc: str
) -> torch.optim.Optimizer:
    """Adam resumed from ``state`` where it fits the model, else fresh (logged, never fatal)."""
    opt = _adam(model, cfg)
    if state is None:
        return opt
    try:
        load_optimizer_state(opt, state)
    except OptimizerStateError as exc:  # before any step: the model is as it came in
        log.warning("%s: %s: fresh optimiser", desc, exc)
        opt = _adam(model, cfg)  # the failed load may have left part of the state in it
    return opt


def _augment_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of one epoch's device augmentation: a function of (seed, epoch) only."""
    state = int(np.random.SeedSequence([seed, epoch, 0x0A06]).generate_state(1)[0])
    return torch.Generator().manual_seed(state)


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    arrays: SiteArrays,
    indices: Sequence[int],
    kind: ModelKind,
    cfg: ExperimentConfig,
    seed: int,
    *,
    wait: DataWait | None = None,
) -> None:
    """Recompute BatchNorm running statistics with the current weights.

    A cumulative average (``momentum=None``) over one pass of the training
    patients, without augmentation, so eval-mode normalisation matches the
    weights that will be evaluated.  No-op for GroupNorm/InstanceNorm models.
    """
    bns = _batchnorms(model)
    if not bns or len(indices) == 0:
        return
    rt = for_config(cfg)
    saved = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    with placed(model, rt.torch_device, rt.memory_format(kind)):
        model.train()
        for batch in _waited(make_loader(arrays, indices, kind, "eval", cfg, seed, rt), wait):
            assert isinstance(batch, dict)
            x = batch["image"].to(rt.torch_device, non_blocking=True).float()
            with rt.autocast():
                model(x.flatten(0, 1) if kind == "densenet2d" else x)
    for bn, m in zip(bns, saved, strict=True):
        bn.momentum = m
    model.eval()


@torch.no_grad()
def predict(
    model: nn.Module,
    arrays: SiteArrays,
    indices: Sequence[int],
    kind: ModelKind,
    cfg: ExperimentConfig,
    *,
    wait: DataWait | None = None,
) -> np.ndarray:
    """Probability of malignancy per patient, under ``model.eval()`` (and autocast where AMP is on).

    2D: each patient's slices are scored and their probabilities averaged
    with ``preprocess.d2.slice_weights`` (in the order of ``preprocess.d2.planes``),
    the study's patient-level rule.  ``evaluation.tta_flip``: each input's
    probability is the mean over it and its mirror along the first spatial axis
    (the training flip: left-right, front-to-back for a sagittal slice), so a
    prediction does not depend on which side the scanner stored first.
    """
    if len(indices) == 0:
        return np.zeros(0, dtype=np.float64)
    rt = for_config(cfg)
    dev = rt.torch_device
    model.eval()
    sw = np.asarray(cfg.preprocess.d2.slice_weights, dtype=np.float64)
    w = torch.tensor(sw / sw.sum(), dtype=torch.float32, device=dev)
    out: list[np.ndarray] = []
    def prob(x: torch.Tensor) -> torch.Tensor:  # x: (B, C, *spatial); the flip is on the first spatial axis
        with rt.autocast():
            logits = model(x)
        p = torch.softmax(logits.float(), dim=1)[:, 1]
        if not cfg.evaluation.tta_flip:
            return p
        with rt.autocast():
            mirrored = model(x.flip(2))
        return (p + torch.softmax(mirrored.float(), dim=1)[:, 1]) / 2

    with placed(model, dev, rt.memory_format(kind)):
        for batch in _waited(make_loader(arrays, indices, kind, "eval", cfg, 0, rt), wait):
            assert isinstance(batch, dict)
            x = batch["image"].to(dev, non_blocking=True).float()
            if kind == "densenet2d":
                b, n = x.shape[:2]
                p = prob(x.flatten(0, 1)).reshape(b, n)
                out.append((p * w[:n] / w[:n].sum()).sum(dim=1).cpu().numpy())
            else:
                out.append(prob(x).cpu().numpy())
    return np.concatenate(out).astype(np.float64)
