"""Experiment configuration: frozen dataclasses parsed once from YAML.

One YAML file describes one experiment (plan, sites, preprocessing, models,
training, federation, evaluation). It is parsed and validated once, at the
edge (CLI or Flower run config), into immutable dataclasses that every layer
receives explicitly: there is no module-level configuration state.

The rules between values are checked here, when a config is built; reading
plain data into it (unknown keys and wrong types rejected with their dotted
path) is ``common.configparse``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    from .models import ModelKind

# Every network kind the project builds, 3D first (the order of the plan, the summary and a bundle).
NETWORKS: tuple[ModelKind, ...] = ("densenet3d", "densenet2d")

Plan = Literal["federated", "study", "loco"]
Role = Literal["train", "external"]
Norm = Literal["batch", "group", "instance"]
Planes = Literal["axial", "orthogonal"]
Strategy = Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedbn", "fedmedian", "fedtrimmedavg"]


class ConfigError(ValueError):
    """A configuration file or value is invalid; the message names the key."""


@dataclass(frozen=True)
class SiteConfig:
    """One hospital: its name, data folder and role in the plan."""

    name: str
    data_dir: str = ""
    role: Role = "train"


@dataclass(frozen=True)
class CohortConfig:
    """The built-in synthetic cohort, generated on first use when enabled."""

    synthetic: bool = True
    dir: str = "data/synthetic"
    scale: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Preprocess3DConfig:
    """3D input: a fixed physical field of view around the ROI, resampled to a cube.

    ``fov_mm`` is the edge of the cube in millimetres; lesions keep their
    absolute size (a 40 mm lesion fills the same fraction of every input),
    which a bounding-box-to-cube resize would throw away.  ``crop="bbox"``
    gives the study's tight crop instead, with ``log_volume`` exposed to the
    ensemble through the radiomics features; ``crop="cube"`` the same tight
    crop with isotropic voxels, so that the lesion keeps its shape.
    """

    size: int = 32
    fov_mm: float = 128.0
    crop: Literal["fov", "bbox", "cube"] = "fov"
    margin_mm: float = 8.0
    hu_min: float = -200.0
    hu_max: float = 1500.0
    mask_outside_mm: float = 0.0  # > 0: the image is air beyond this distance from the ROI (0: off)


@dataclass(frozen=True)
class Preprocess2DConfig:
    """2D input: ``n_slices`` tumour cross-sections, the largest first.

    ``planes="axial"``: the ``n_slices`` axial slices with the largest tumour
    area (the study's three images).  ``planes="orthogonal"``: the largest
    axial, coronal and sagittal section, in that order (``n_slices`` 3), so
    the three images see the lesion's shape along all three axes instead of
    three neighbouring axial cuts of it.  Each slice's ROI bounding box (plus
    margin) is resized to ``size``x``size`` (``crop="square"``: a square
    around it with the box's longer side, so the lesion keeps its shape); the
    three channels are three HU windows (bone, soft tissue, wide).
    """

    size: int = 64
    crop: Literal["bbox", "square"] = "bbox"
    planes: Planes = "axial"
    n_slices: int = 3
    margin_mm: float = 8.0
    slice_weights: tuple[float, ...] = (0.4, 0.3, 0.3)
    mask_outside_mm: float = 0.0  # > 0: each slice is air beyond this in-plane distance from the ROI (0: off)


@dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation (rotation, translation, scaling, flipping)."""

    enabled: bool = True
    prob: float = 0.5
    rotate_deg: float = 15.0
    translate_frac: float = 0.1
    scale_frac: float = 0.1
    flip: bool = True


@dataclass(frozen=True)
class PreprocessConfig:
    """``mask_channel``: the ROI mask rides along as the last input channel (3D and 2D).

    The crops stretch every lesion to one cube, so the network cannot tell the
    lesion's outline from the bone around it; the mask says where it is.
    """

    d3: Preprocess3DConfig = field(default_factory=Preprocess3DConfig)
    d2: Preprocess2DConfig = field(default_factory=Preprocess2DConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mask_channel: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """A DenseNet: ``densenet121`` is the study's; ``small`` is for tests."""

    enabled: bool = True
    arch: Literal["densenet121", "small"] = "densenet121"
    norm: Norm = "batch"
    group_norm_groups: int = 8
    pretrained: bool = False
    pretrained_path: str = ""
    allow_random_init: bool = True
    dropout: float = 0.0
    # This network's own round budget and selection window (0: ``train.rounds`` and
    # ``evaluation.select_from_round``): the two networks learn at different speeds, and a
    # budget is spent where it buys AUC (ExperimentConfig.for_model).
    rounds: int = 0
    select_from_round: int = 0


@dataclass(frozen=True)
class ModelsConfig:
    densenet3d: ModelConfig = field(default_factory=ModelConfig)
    densenet2d: ModelConfig = field(default_factory=ModelConfig)
    radiomics: bool = True


@dataclass(frozen=True)
class TrainConfig:
    """The study's defaults: batch 20, Adam 1e-4, cross-entropy, 50 epochs.

    ``rounds * local_epochs`` plays the role of the study's epochs, in the
    federation and in the pooled baseline alike (per network:
    ``models.<kind>.rounds``).  ``schedule="cosine"`` decays the rate over the
    whole budget.
    """

    batch_size: int = 20
    lr: float = 1e-4
    weight_decay: float = 0.0
    # Cross-entropy against (1 - e) one-hot + e/2: no patient's label is taken as certain.
    label_smoothing: float = 0.0
    rounds: int = 50
    local_epochs: int = 1
    schedule: Literal["constant", "cosine"] = "cosine"
    class_weighting: bool = False
    bn_recalibration: bool = True
    # Adam's moments carried from one round (pooled: one epoch) to the next at each site, in the
    # site's own run folder, never sent.  A fresh Adam per round restarts with full-size sign-like
    # steps: measured on the quick preset (federated 3D, 5 folds), 0.832 -> 0.876 test AUC.
    keep_optimizer_state: bool = True
    threads: int = 1
    num_workers: int = 0
    # The training randomness: the initial model, shuffling and augmentation draws of every round.
    # The patient splits follow the top-level ``seed``, so a new ``train.seed`` retrains on the same
    # folds (the spread it gives is the run-to-run noise of a recipe).
    seed: int = 0
    # Where the engine runs (common/device.py): auto = the first CUDA device when there is one.
    device: str = "auto"
    # Mixed precision on CUDA: auto = bf16 where supported, else fp16 with a gradient scaler;
    # always off on CPU and under DP.  bf16/fp16 on a CPU are refused (common/device.py): on an
    # AVX-512 BF16 EPYC (torch 2.13, 2026-12-03) CPU bf16 autocast ran DenseNet121 3D training steps
    # at 32^3 1.7x faster, but its first backward pass already gave NaN gradients (dense block 3).
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    # Random augmentation in the DataLoader (MONAI, per item) or batched on the device;
    # auto = device on CUDA, workers on CPU (the CPU path is unchanged).
    augment_on: Literal["auto", "workers", "device"] = "auto"
    # The networks' tensor layout (common/device.py): auto = channels-last for the 2D network, where
    # oneDNN (and cuDNN) take their fast path, and the default layout for 3D and under DP (Opacus'
    # per-sample gradients).  2026-12-03, AMD EPYC with AVX-512, quick preset, one thread (as a simulated
    # site), `python -m bench --only throughput --quick-only --kinds densenet2d --threads 1 --patients 32
    # --memory-format contiguous,channels_last,contiguous,channels_last`: 2D training 6.8-6.9 -> 8.0-8.2
    # patients/s, BatchNorm recalibration 1.2-1.3 -> 0.8-0.9 s, inference 15-17 -> 21-23 patients/s.  3D
    # at 32^3 in channels-last-3d, two threads: training 17.8-18.4 -> 13.3 patients/s, slower.  Numerics
    # differ in the last bits only (another convolution algorithm), as with another thread count.
    memory_format: Literal["auto", "contiguous", "channels_last"] = "auto"


@dataclass(frozen=True)
class DPConfig:
    """Differential privacy with Opacus (DP-SGD at each site)."""

    enabled: bool = False
    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    target_epsilon: float = 0.0
    delta: float = 1e-5


@dataclass(frozen=True)
class FederationConfig:
    strategy: Strategy = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    min_sites: int = 1
    round_timeout_s: float = 600.0
    # Flower simulation only: the fraction of a GPU each site's worker gets (0: none, CPU sites).
    sim_gpus_per_site: float = 0.0
    transport_dtype: Literal["float32", "float16"] = "float16"  # same model: |dAUC| 0.0003 (docs/benchmarks.md)
    norm_bound_factor: float = 10.0
    max_update_norm: float = 1e4  # absolute bound on an update's distance to the global model (0: off)
    trim_fraction: float = 0.2


@dataclass(frozen=True)
class EvaluationConfig:
    # a fixed probability, or a rule applied to pooled validation statistics:
    # "youden", "sensitivity:0.9", "specificity:0.9" (common/threshold.py)
    threshold: float | str = 0.5
    grid_bins: int = 10000
    calibration_bins: int = 10
    ensemble_grid_step: float = 0.05
    ensemble_tolerance: float = 0.0  # validation AUC a blend must gain over its best member (common.ensemble)
    calibrate_folds: bool = False  # per-fold Platt scaling on the fold's pooled validation scores (common.foldcalibration)
    tta_flip: bool = False  # predict: mean of the input and its left-right mirror (common.engine.predict)
    # model selection among rounds >= this one only (1: every round, the study's rule); earlier
    # rounds are still trained and validated, and kept when no later round has finished
    select_from_round: int = 1
    score_mapping: tuple[float, ...] = (0.05, 0.15, 0.25, 0.40, 0.50, 0.60, 0.75, 0.85, 0.95)
    min_cell_count: int = 0
    stats_noise: float = 0.0
    # evaluate every training site's local-only model and the global model at every site
    cross_site: bool = False

    @property
    def threshold_rule(self) -> Any:
        """The parsed ``threshold`` (a ``common.threshold.ThresholdRule``)."""
        from common.threshold import parse_threshold

        return parse_threshold(self.threshold)

    @property
    def fixed_threshold(self) -> float:
        """The threshold where none is chosen on validation (round logs, reader study): the fixed one, or 0.5."""
        rule = self.threshold_rule
        return float(rule.value) if rule.fixed else 0.5


@dataclass(frozen=True)
class BaselinesConfig:
    pooled: bool = False
    local: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; parsed once, passed everywhere."""

    name: str = "custom"
    seed: int = 0  # the patient-level splits (``train.seed``: the training randomness)
    plan: Plan = "federated"
    folds: int = 5
    run_folds: tuple[int, ...] = ()
    val_fraction: float = 0.2
    cohort: CohortConfig = field(default_factory=CohortConfig)
    sites: tuple[SiteConfig, ...] = ()
    external_sites: tuple[str, ...] = ()
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)

    def __post_init__(self) -> None:
        _check(self.folds >= 2, "folds", "must be at least 2")
        _check(all(0 <= k < self.folds for k in self.run_folds), "run_folds", f"fold numbers must be in 0..{self.folds - 1}")
        _check(0.0 < self.val_fraction < 1.0, "val_fraction", "must be in (0, 1)")
        _check(self.preprocess.d3.size >= 8, "preprocess.d3.size", "must be at least 8")
        _check(self.preprocess.d2.size >= 16, "preprocess.d2.size", "must be at least 16")
        _check(self.preprocess.d3.hu_max > self.preprocess.d3.hu_min, "preprocess.d3.hu_max", "must exceed hu_min")
        for dim in ("d3", "d2"):
            mo = getattr(self.preprocess, dim).mask_outside_mm
            _check(math.isfinite(mo) and mo >= 0, f"preprocess.{dim}.mask_outside_mm", "must be >= 0 (0: off)")
        d2 = self.preprocess.d2
        _check(
            d2.planes != "orthogonal" or d2.n_slices == 3,
            "preprocess.d2.n_slices",
            "must be 3 with planes: orthogonal (one axial, one coronal and one sagittal section)",
        )
        w = d2.slice_weights
        _check(len(w) == d2.n_slices, "preprocess.d2.slice_weights", "needs one weight per slice")
        _check(all(x >= 0 for x in w) and sum(w) > 0, "preprocess.d2.slice_weights", "must be >= 0 with a positive sum")
        _check(self.train.batch_size >= 1, "train.batch_size", "must be >= 1")
        _check(self.train.lr > 0, "train.lr", "must be > 0")
        _check(0.0 <= self.train.label_smoothing < 1.0, "train.label_smoothing", "must be in [0, 1)")
        _check(self.train.rounds >= 1 and self.train.local_epochs >= 1, "train.rounds", "rounds and local_epochs must be >= 1")
        _check(
            1 <= self.evaluation.select_from_round <= self.train.rounds,
            "evaluation.select_from_round",
            f"must be a round in 1..{self.train.rounds} (train.rounds)",
        )
        for key in NETWORKS:
            own = getattr(self.models, key)
            _check(own.rounds >= 0, f"models.{key}.rounds", "must be >= 0 (0: train.rounds)")
            rounds, first = self._budget(key)
            _check(
                1 <= first <= rounds,
                f"models.{key}.select_from_round",
                f"must be a round in 1..{rounds} (the network's rounds) or 0 (evaluation.select_from_round)",
            )
        _check(
            re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.train.device) is not None,
            "train.device",
            f"{self.train.device!r} is not one of auto, cpu, cuda, cuda:N",
        )
        _check(
            not (self.dp.enabled and self.train.amp in ("bf16", "fp16")),
            "train.amp",
            f"{self.train.amp} is not compatible with DP-SGD (Opacus clips per-sample gradients, which a "
            "gradient scaler or half precision would distort): use 'off' or 'auto' (auto is off under DP)",
        )
        _check(
            0.0 <= self.federation.sim_gpus_per_site <= 1.0,
            "federation.sim_gpus_per_site",
            "must be a fraction of one GPU in [0, 1]",
        )
        m = self.evaluation.score_mapping
        _check(len(m) == 9, "evaluation.score_mapping", "needs 9 probabilities, one per score 1-9")
        _check(all(0.0 <= p <= 1.0 for p in m), "evaluation.score_mapping", "values must be probabilities")
        _check(all(a < b for a, b in itertools.pairwise(m)), "evaluation.score_mapping", "must increase with the score")
        from common.threshold import parse_threshold

        try:
            rule = parse_threshold(self.evaluation.threshold)
        except ValueError as exc:
            raise ConfigError(f"evaluation.threshold: {exc}") from None
        bins = self.evaluation.grid_bins
        _check(
            not rule.fixed or abs(rule.value * bins - round(rule.value * bins)) < 1e-6,
            "evaluation.threshold",
            f"a fixed threshold must lie on the score grid (a multiple of 1/{bins}) for exact confusion matrices",
        )
        _check(
            not self.evaluation.cross_site or (self.federation.strategy != "fedbn" and not self.dp.enabled),
            "evaluation.cross_site",
            "needs whole models and one privacy ledger per site: not with federation.strategy fedbn "
            "(normalisation layers stay at each site) or dp.enabled (local-only training would spend budget "
            "outside the run's ledger)",
        )
        cb = self.evaluation.calibration_bins
        _check(
            cb >= 3 and self.evaluation.grid_bins % cb == 0,
            "evaluation.calibration_bins",
            f"must be >= 3 (Hosmer-Lemeshow has groups - 2 degrees of freedom) and divide grid_bins ({self.evaluation.grid_bins})",
        )
        _check(self.evaluation.grid_bins >= 100, "evaluation.grid_bins", "must be >= 100")
        _check(self.federation.max_update_norm >= 0, "federation.max_update_norm", "must be >= 0 (0: off)")
        _check(
            self.evaluation.stats_noise == 0 or self.evaluation.grid_bins <= 200,
            "evaluation.stats_noise",
            "Laplace noise on every cell of a fine grid adds thousands of phantom patients "
            "(pooled AUC 0.50 at 10,000 bins, measured): use evaluation.grid_bins <= 200 with noise",
        )
        names = [s.name for s in self.sites]
        _check(len(names) == len(set(names)), "sites", f"duplicate site names in {names}")
        unknown = set(self.external_sites) - set(names) if names else set()
        _check(not unknown, "external_sites", f"names unknown sites {sorted(unknown)}")
        if self.dp.enabled:
            for key in NETWORKS:
                model = getattr(self.models, key)
                _check(
                    not model.enabled or model.norm != "batch",
                    f"models.{key}.norm",
                    "BatchNorm is not compatible with DP-SGD: use 'group'",
                )

    @property
    def networks(self) -> tuple[ModelKind, ...]:
        """The networks this run trains (``models.<kind>.enabled``), 3D first."""
        return tuple(k for k in NETWORKS if cast(ModelConfig, getattr(self.models, k)).enabled)

    @property
    def active_folds(self) -> tuple[int, ...]:
        """The folds this run trains (``run_folds``, or all of them): e.g. one fold for a smoke test."""
        return self.run_folds or tuple(range(self.folds))

    def for_model(self, kind: str) -> ExperimentConfig:
        """The config as network ``kind`` trains under it: its own rounds and selection window.

        Every caller that trains, validates or selects one network reads
        ``train.rounds`` and ``evaluation.select_from_round`` from this view,
        so a per-network budget (``models.<kind>.rounds``) changes the server's
        rounds, the sites' learning-rate schedule and the baselines alike.
        """
        rounds, first = self._budget(kind)
        if rounds == self.train.rounds and first == self.evaluation.select_from_round:
            return self
        return dataclasses.replace(
            self,
            train=dataclasses.replace(self.train, rounds=rounds),
            evaluation=dataclasses.replace(self.evaluation, select_from_round=first),
        )

    def _budget(self, kind: str) -> tuple[int, int]:
        """Network ``kind``'s rounds and first competing round: its own, else the run's (capped at its rounds)."""
        own: ModelConfig = getattr(self.models, kind)
        rounds = own.rounds or self.train.rounds
        return rounds, own.select_from_round or min(self.evaluation.select_from_round, rounds)

    def digest(self) -> str:
        """Stable short hash of the whole config, stored with checkpoints."""
        blob = json.dumps(to_dict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def site(self, name: str) -> SiteConfig:
        for s in self.sites:
            if s.name == name:
                return s
        raise ConfigError(f"sites: no site named {name!r} (known: {[s.name for s in self.sites]})")


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (for JSON, YAML and Flower's ConfigRecord)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    return cfg


def with_sites(cfg: ExperimentConfig, sites: tuple[SiteConfig, ...]) -> ExperimentConfig:
    """Return ``cfg`` with ``sites`` set and roles resolved from the plan.

    ``study``: the first site trains, the others are external (the paper's
    design).  ``federated``: every site trains.  Sites named in
    ``external_sites`` are external under any plan.  ``loco`` keeps the roles
    given; the server runs one leave-one-centre-out pass per site.
    """
    resolved = []
    for i, s in enumerate(sites):
        role: Role = s.role
        if cfg.plan == "study":
            role = "train" if i == 0 else "external"
        elif cfg.plan == "federated":
            role = "train"
        if s.name in cfg.external_sites:
            role = "external"
        resolved.append(dataclasses.replace(s, role=role))
    return dataclasses.replace(cfg, sites=tuple(resolved))


def validated_round(cfg: ExperimentConfig, rnd: int) -> bool:
    """Whether round ``rnd``'s model is validated (and, with BatchNorm, recalibrated for it).

    Only rounds that compete for selection (``evaluation.select_from_round``)
    are: an earlier round's validation AUC is never used, so its validation
    pass and its recalibration pass are skipped.  The last round always
    competes (``select_from_round <= rounds``).  Here, not in ``common.rounds``,
    because the server decides it too and imports no training code.
    """
    return rnd >= cfg.evaluation.select_from_round
