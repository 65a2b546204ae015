"""What a hospital does in a run, callable with or without Flower.

The ClientApp turns messages into calls on :class:`SiteRunner` (and, for the
evaluation statistics over its stored predictions, ``client.sitestats``);
tests and the benchmark call it directly.  Everything per patient (splits,
predictions) is written under the site's own output folder and never
returned: the methods return model vectors and aggregate statistics only.
"""

from __future__ import annotations

import csv
import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch

from common.config import ExperimentConfig
from common.dataset import preprocess_site
from common.device import for_config
from common.disclosure import add_noise, suppress_small_cells
from common.engine import predict, set_threads
from common.environment import environment
from common.foldcalibration import apply_platt, check_platt
from common.gridstats import ClassHistogram, ScoreGrid
from common.models import ModelKind
from common.privacy import PrivacyLedger
from common.protocol import ROLE_EXTERNAL, ROLE_TRAIN, FeatstatsReply, PredictReply, SiteInfoReply, TrainReply
from common.radiomics import FederatedLogit
from common.records import model_digest
from common.rounds import local_round
from common.selection import diagnose
from common.sitearrays import SiteArrays
from common.splits import Fold, fivefold, save_splits

from .optimstore import OptimizerStore
from .sitemodels import SiteModels
from .stagedrows import StagedPredictions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteContext:
    """Where a site's data and outputs live (from Flower's node config or the CLI)."""

    name: str
    data_dir: Path
    out_dir: Path
    threads: int = 1


RUN_ID = re.compile(r"[A-Za-z0-9._-]+")


class RunIdRejected(ValueError):
    """The server sent a run id that is not a plain folder name inside the site's output folder."""


def run_folder(out_dir: Path, run_id: str) -> Path:
    """The run's folder under ``out_dir``; the id comes from the server, so it must be a plain name.

    ``[A-Za-z0-9._-]+``, not ``.`` or ``..``, and resolving inside ``out_dir``:
    otherwise ``"../../x"`` or an absolute path would make the hospital write
    its splits, per-patient predictions and model state anywhere.
    """
    if not RUN_ID.fullmatch(run_id) or set(run_id) == {"."}:
        raise RunIdRejected(f"run id {run_id!r} refused: it must match [A-Za-z0-9._-]+ and not be '.' or '..'")
    folder = out_dir / run_id
    if not folder.resolve().is_relative_to(out_dir.resolve()):
        raise RunIdRejected(f"run id {run_id!r} refused: its folder resolves outside the site's output folder")
    return folder


class SiteRunner:
    """One site's side of one run: data, training, validation, prediction, the radiomics fit."""

    def __init__(self, ctx: SiteContext, cfg: ExperimentConfig, run_id: str) -> None:
        self.ctx = ctx
        self.cfg = cfg
        self.run_dir = run_folder(ctx.out_dir, run_id)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.models = SiteModels(cfg, self.run_dir)
        set_threads(ctx.threads)

    # -- data -----------------------------------------------------------------
    @functools.cached_property
    def arrays(self) -> SiteArrays:
        """The site's preprocessed cases (cached on disk once per preprocessing config)."""
        return preprocess_site(self.ctx.data_dir, self.cfg.preprocess, self.ctx.out_dir / "cache", site=self.ctx.name)

    @functools.cached_property
    def folds(self) -> tuple[Fold, ...]:
        """Patient-level stratified folds; saved with the run for audit."""
        a = self.arrays
        folds = fivefold(
            list(a.patient_ids),
            list(a.labels),
            folds=self.cfg.folds,
            val_fraction=self.cfg.val_fraction,
            seed=self.cfg.seed,
        )
        save_splits(self.run_dir / "splits.json", self.ctx.name, folds)
        return folds

    def index(self, ids: tuple[str, ...]) -> list[int]:
        """Rows of ``arrays`` of these patient ids, in their order."""
        pos = {pid: i for i, pid in enumerate(self.arrays.patient_ids)}
        return [pos[p] for p in ids]

    def info(self) -> SiteInfoReply:
        """Patient counts (aggregate only) for the server's plan."""
        a = self.arrays
        return SiteInfoReply(
            patients=len(a),
            benign=int((a.labels == 0).sum()),
            malignant=int((a.labels == 1).sum()),
            refused=len(a.refused),
            environment=environment(),
            device=dict(for_config(self.cfg).describe()),
        )

    # -- federated steps -------------------------------------------------------------
    def train_round(
        self,
        kind: ModelKind,
        fold: int,
        flat: np.ndarray,
        rnd: int,
        total_rounds: int,
        proximal_mu: float = 0.0,
        *,
        validate: bool = False,
    ) -> TrainReply:
        """Local epochs on fold ``fold``'s training patients from the global weights.

        ``validate``: the received model (round ``rnd - 1``'s aggregate) is first
        validated as ``validate_round`` would, on the same object (one build, not
        two: prediction under ``eval()`` leaves it unchanged), and the statistics
        travel back with the update.
        """
        model = self.models.load(kind, fold, flat, rnd - 1)
        validation = self._validate(kind, fold, rnd - 1, self._score(model, kind, self.folds[fold].val)) if validate else None
        idx = self.index(self.folds[fold].train)
        store = self._optimizer_store(kind, fold)
        state = store.load(rnd) if self.cfg.train.keep_optimizer_state else None
        res = local_round(
            model,
            self.arrays,
            idx,
            kind,
            self.cfg.for_model(kind),
            fold=fold,
            rnd=rnd,
            total_rounds=total_rounds,
            proximal_mu=proximal_mu,
            desc=f"{self.ctx.name} {kind} f{fold} r{rnd}",
            privacy=PrivacyLedger(self.run_dir / "state" / f"dp_{kind}_fold{fold}.json") if self.cfg.dp.enabled else None,
            optimizer_state=state,
        )
        if rnd < total_rounds:  # the fold's last round has no next round to resume it
            store.save(rnd, res.optimizer_state)
        self.models.save_local(model, kind, fold, rnd)
        return TrainReply(
            weights=self.models.codec(kind).pack(model.state_dict()),
            num_examples=res.n_patients,
            loss=res.loss,
            seconds=res.seconds,
            steps=res.steps,
            lr=res.lr_last,
            epsilon=res.epsilon,
            validation=validation,
        )

    def _optimizer_store(self, kind: str, fold: int) -> OptimizerStore:
        """Where this fold's optimiser state waits between rounds (``train.keep_optimizer_state``)."""
        return OptimizerStore(self.run_dir / "state" / f"{kind}_fold{fold}_optimizer.tensors")

    def validate_round(
        self, kind: ModelKind, fold: int, flat: np.ndarray, rnd: int, *, stage: bool = False
    ) -> ClassHistogram:
        """Validation-split statistics of the global model (for model selection across sites).

        ``stage``: also score the fold's test patients and keep both splits' probabilities
        for a prediction request naming this model (``client.stagedrows``).
        """
        model = self.models.load(kind, fold, flat, rnd)
        parts = self._splits(fold, ROLE_TRAIN) if stage else {"val": self.folds[fold].val}
        probs = {split: self._score(model, kind, ids) for split, ids in parts.items()}
        if stage:
            self._staged(kind, fold).save(model_digest(flat, self.cfg.federation.transport_dtype), rnd, probs)
        return self._validate(kind, fold, rnd, probs["val"])

    def _score(self, model: torch.nn.Module, kind: ModelKind, ids: tuple[str, ...]) -> np.ndarray:
        """Probabilities of these patients under ``model`` (in their order)."""
        return predict(model, self.arrays, self.index(ids), kind, self.cfg)

    def _staged(self, kind: str, fold: int) -> StagedPredictions:
        return StagedPredictions(self.run_dir / "state" / f"{kind}_fold{fold}_staged.npz")

    def _splits(self, fold: int, role: str) -> dict[str, tuple[str, ...]]:
        """The patients a prediction covers: all at an external site, the fold's validation and test ones at a training site."""
        if role == ROLE_EXTERNAL:
            return {"external": tuple(self.arrays.patient_ids)}
        return {"val": self.folds[fold].val, "test": self.folds[fold].test}

    def _validate(self, kind: ModelKind, fold: int, rnd: int, probs: np.ndarray) -> ClassHistogram:
        """The released histogram of the fold's validation patients' ``probs`` (in split order), problems logged."""
        labels = self.arrays.labels[self.index(self.folds[fold].val)]
        for problem in diagnose(probs, labels):
            log.warning("%s %s fold %d round %d validation: %s", self.ctx.name, kind, fold, rnd, problem)
        return self.released(labels, probs)

    def release(self, h: ClassHistogram) -> ClassHistogram:
        """What a histogram looks like when it leaves the site.

        Optional protections (``evaluation.min_cell_count``, ``evaluation.stats_noise``):
        small cells merged, then Laplace noise on the counts.  Both make the
        pooled figures approximate, and DeLong's exact two-step protocol is
        then skipped by the server.
        """
        ev = self.cfg.evaluation
        if ev.min_cell_count > 1:
            h = suppress_small_cells(h, ev.min_cell_count)
        if ev.stats_noise > 0:
            h = add_noise(h, ev.stats_noise, np.random.default_rng())
        return h

    def released(self, labels: np.ndarray, probs: np.ndarray) -> ClassHistogram:
        """The run's grid histogram of these scores, as it leaves the site (:meth:`release`)."""
        return self.release(ClassHistogram.from_scores(labels, probs, ScoreGrid(self.cfg.evaluation.grid_bins)))

    def predict_fold(
        self,
        kind: str,
        fold: int,
        flat: np.ndarray | None,
        rnd: int,
        role: str,
        platt: Sequence[float] | None = None,
        *,
        staged: str | None = None,
    ) -> PredictReply:
        """Predict with the selected fold model; per-patient rows are written here, locally.

        A training site predicts its fold-``fold`` validation and test
        patients (internal test); an external site predicts all patients.
        ``kind="radiomics"``: ``flat`` is the federated logistic regression.
        ``flat=None``: the model is the one of digest ``staged`` whose probabilities the
        closing validation kept (``validate_round(stage=True)``); without them the reply
        asks for the weights (``resend``) and nothing is written.
        ``platt``: the fold's calibration ``(a, b)`` from the server (``common.foldcalibration``).
        """
        params = check_platt(platt)
        parts = self._splits(fold, role)
        if flat is None:
            if staged is None:
                raise ValueError("a prediction needs the model's weights or the digest of a kept model")
            raw = self._staged(kind, fold).take(staged, rnd, {split: len(ids) for split, ids in parts.items()})
            if raw is None:
                return PredictReply(predicted=0, resend=True)
            probs = {split: apply_platt(p, params) for split, p in raw.items()}
        else:
            self._staged(kind, fold).discard()
            probs = self._predict(kind, fold, flat, rnd, parts, params)
        # The server predicts with a fold's model once it chose it: the fold trains no more (a server
        # restarted later skips a finished fold), so its optimiser state is deleted, not left on disk.
        self._optimizer_store(kind, fold).discard()
        rows = []
        for split, ids in parts.items():
            idx = self.index(ids)
            rows += [
                (pid, split, int(self.arrays.labels[i]), float(p))
                for pid, i, p in zip(ids, idx, probs[split], strict=True)
            ]
        path = self.run_dir / "predictions" / f"{kind}_fold{fold}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["patient_id", "split", "label", "probability"])
            w.writerows(rows)
        return PredictReply(predicted=len(rows))

    def _predict(
        self,
        kind: str,
        fold: int,
        flat: np.ndarray,
        rnd: int,
        parts: dict[str, tuple[str, ...]],
        params: tuple[float, float],
    ) -> dict[str, np.ndarray]:
        """Each split's probabilities under the model ``flat`` (a network, or the radiomics regression)."""
        if kind == "radiomics":
            lr = FederatedLogit.unpack(flat)
            return {split: lr.predict(self.arrays.features[self.index(ids)]) for split, ids in parts.items()}
        net = cast(ModelKind, kind)
        model = self.models.load(net, fold, flat, rnd)
        return {split: apply_platt(self._score(model, net, ids), params) for split, ids in parts.items()}

    # -- the radiomics baseline, federated -----------------------------------------------------
    def feature_moments(self, fold: int) -> FeatstatsReply:
        """Count, sum and sum of squares of the handcrafted features over the fold's training patients."""
        x = self.arrays.features[self.index(self.folds[fold].train)]
        return FeatstatsReply(np.asarray([x.shape[0]], np.float64), x.sum(axis=0), (x**2).sum(axis=0), x.shape[0])

    def fit_radiomics(self, fold: int, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, int]:
        """Logistic regression on globally standardised features; returns its parameters and n."""
        idx = self.index(self.folds[fold].train)
        lr = FederatedLogit.fit(self.arrays.features[idx], self.arrays.labels[idx], mean, std, seed=self.cfg.seed)
        return lr.pack(), len(idx)
