"""Fold training: Flower's round loop per model and fold, checkpoints, selection, prediction.

For each model and fold, Flower's ``Strategy.start()`` runs the rounds among
the training sites; after every round the round's global model is
checkpointed, and once its pooled validation statistics arrive (with the
next round's train replies, or the one evaluate exchange after the last
round: ``server.strategy``) they are recorded beside it; the round with the
best pooled validation AUC is kept (the study's model selection, done across
sites).  With ``evaluation.calibrate_folds`` each round's validation also
holds the fold's Platt calibration fitted on that pooled validation histogram
(``common.foldcalibration``), sent with the selected model to every site.  The
selection guard (``server.foldguard``) flags a selected model that is constant
or inverted on validation; it is left out of the external average.  A fold
finished by an earlier server process is not retrained; an interrupted one
resumes after its last checkpoint, whose model the first resumed round
validates if it was not yet.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from common.config import ExperimentConfig, validated_round
from common.foldcalibration import fit_platt
from common.gridstats import ClassHistogram
from common.protocol import (
    PREDICT,
    ROLE_TRAIN,
    ROLES,
    PredictReply,
    PredictRequest,
    ProtocolError,
)
from common.records import ModelCodec, model_digest, weights_from_record, weights_record

from .checkpoints import CheckpointStore
from .foldguard import GUARD_KEY, selection_problem
from .messenger import Messenger
from .progress import Progress
from .registry import SiteRegistry
from .session import FoldSession, RoundLog
from .strategies import make_strategy
from .strategy import FederationError

if TYPE_CHECKING:  # a name for annotations only: importing common.models would load torch and MONAI
    from common.models import ModelKind

log = logging.getLogger(__name__)

_ROUNDLOG_FIELDS = frozenset(f.name for f in dataclasses.fields(RoundLog))

PLATT_KEY = "platt"
"""Key of a checkpoint's (and a selection's) per-fold calibration ``[a, b]`` (server-side bookkeeping)."""


def initial_vector(cfg: ExperimentConfig, kind: ModelKind) -> np.ndarray:
    """The round-0 global model: the factory's initialisation under the run's seed, as sent.

    The plan's folds and the bench's plain loop start from it.  The ServerApp's messages,
    aggregation and statistics are numpy; it needs MONAI only here, so MONAI is imported
    here (torch is already there, for the progress's TensorBoard writer), and only the
    factory and the seeding: not the training engine, its data pipeline and Opacus (0.6 s
    before the first round).  Not imported in a thread meanwhile: in a simulation the
    ClientApp imports torch in another thread of the same process, and two concurrent
    first imports of torch failed ("partially initialized module"); by the first fold
    the sites have answered, so the ClientApp's imports are done.
    """
    from common.models import build_model
    from common.seeding import seed_everything

    seed_everything(cfg.train.seed)
    model = build_model(kind, getattr(cfg.models, kind), mask_channel=cfg.preprocess.mask_channel)
    codec = ModelCodec.for_state_dict(model.state_dict(), exclude_norm=cfg.federation.strategy == "fedbn")
    return codec.pack(model.state_dict())


class FoldTrainer:
    """Trains and predicts fold models; keeps who took part in every round."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        messenger: Messenger,
        registry: SiteRegistry,
        ckpt: CheckpointStore,
        progress: Progress | None = None,
    ) -> None:
        self.cfg = cfg
        self.messenger = messenger
        self.registry = registry
        self.ckpt = ckpt
        self.progress = progress
        self.resumed: dict[
            str, int
        ] = {}  # "<model>/fold<k>" -> rounds taken from an earlier process's checkpoints
        self.participation: dict[str, list[dict[str, Any]]] = {}

    def session(self, kind: ModelKind, fold: int, offset: int) -> FoldSession:
        """What the strategy needs to know about this fold (rounds before ``offset`` are done)."""
        return FoldSession(
            model=kind,
            fold=fold,
            train_nodes=self.registry.nodes(ROLE_TRAIN),
            refresh=lambda: self.registry.rejoin(self.messenger),
            total_rounds=self.cfg.for_model(kind).train.rounds,
            round_offset=offset,
            header=self.messenger.header,
            transport_dtype=self.cfg.federation.transport_dtype,
            min_sites=self.cfg.federation.min_sites,
            norm_bound_factor=self.cfg.federation.norm_bound_factor,
            max_update_norm=self.cfg.federation.max_update_norm,
            site_patients={s.site: s.patients for s in self.registry.sites.values()},
            threshold=self.cfg.evaluation.fixed_threshold,
            check=self.messenger.check,
            validate_from=self.cfg.for_model(kind).evaluation.select_from_round,
        )

    def train_fold(self, kind: ModelKind, fold: int) -> dict[str, Any]:
        """Federated rounds for one fold; returns the selected round and its pooled validation AUC."""
        if not self.registry.nodes(ROLE_TRAIN):
            raise FederationError("no training site is available")
        total = self.cfg.for_model(kind).train.rounds
        done = self.ckpt.finished(kind, fold)
        if done is not None:
            log.info("%s fold %d already finished (round %d selected): skipping", kind, fold, done["round"])
            self._restore_round_logs(kind, fold)
            return self._annotated(kind, fold, done)
        last = self.ckpt.last_round(kind, fold)
        start_vec = self.ckpt.load(kind, fold, last) if last else initial_vector(self.cfg, kind)
        if last:
            log.info(
                "%s fold %d: resuming after round %d of %d (earlier rounds not retrained)",
                kind,
                fold,
                last,
                total,
            )
            self._restore_round_logs(kind, fold)
        session = self.session(kind, fold, last)
        if last and validated_round(self.cfg.for_model(kind), last) and not self.ckpt.validated(kind, fold, last):
            # interrupted before its validation arrived
            meta = self.ckpt.meta(kind, fold, last)
            session.rounds[last] = RoundLog(**{f: meta[f] for f in _ROUNDLOG_FIELDS if f in meta})
            session.validate_first = True
        if self.progress is not None:
            self.progress.phase(
                f"{kind} fold {fold}: training rounds {last + 1}-{total} at {', '.join(session.train_nodes.values())}"
            )
        strategy = make_strategy(self.cfg.federation, session)

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            rlog = session.log_for(server_round)
            earlier = set(session.validated) - {rlog.round}  # validated by this round's train replies
            for rnd in sorted(earlier):
                meta = self._validation(session, rnd, session.validated.pop(rnd))
                self.ckpt.save_validation(kind, fold, rnd, meta)  # beside its checkpoint, never rewritten
                self._record(kind, fold, session, rnd, validated=True, counted=rnd > last)
            if rlog.round in session.validated:  # the last round, validated by the evaluate exchange
                meta = self._validation(session, rlog.round, session.validated.pop(rlog.round))
            else:  # its validation comes with the next round's train replies, if it competes
                meta = {**asdict(rlog), "validated": False}
            self.ckpt.save(kind, fold, rlog.round, weights_from_record(arrays), meta)
            self._record(kind, fold, session, rlog.round, validated=meta["validated"])
            return None

        if last < total:
            strategy.start(
                grid=self.messenger.grid,
                initial_arrays=weights_record(start_vec),
                num_rounds=total - last,
                timeout=self.messenger.timeout,
                train_config=ConfigRecord(),
                evaluate_config=ConfigRecord(),
                evaluate_fn=after_round,
            )
        best = self.ckpt.select_best(kind, fold, self.cfg.for_model(kind).evaluation.select_from_round)
        log.info(
            "%s fold %d: selected round %d (pooled validation AUC %s)",
            kind,
            fold,
            best["round"],
            best["val_auc"],
        )
        return self._annotated(kind, fold, best)

    def _validation(self, session: FoldSession, rnd: int, stats: dict[str, Any] | None) -> dict[str, Any]:
        """Round ``rnd``'s log with its pooled validation, and the Platt fit on that histogram."""
        meta = {**asdict(session.rounds[rnd]), "validated": True}
        if self.cfg.evaluation.calibrate_folds and stats is not None:
            meta[PLATT_KEY] = list(fit_platt(ClassHistogram.from_arrays(stats)))
        return meta

    def _record(
        self,
        kind: ModelKind,
        fold: int,
        session: FoldSession,
        rnd: int,
        *,
        validated: bool,
        counted: bool = True,
    ) -> None:
        """Round ``rnd``'s entry in the participation record (replacing an earlier one).

        Once its model is validated, or at once if it is never to be, the round's progress
        line (``counted=False``: a round an earlier process trained, already counted as done).
        """
        rlog = session.rounds[rnd]
        logs = self.participation.setdefault(f"{kind}/fold{fold}", [])
        kept = [e for e in logs if e["round"] != rnd]
        logs[:] = sorted([*kept, asdict(rlog)], key=lambda e: e["round"])
        competes = validated_round(self.cfg.for_model(kind), rnd)
        if (validated or not competes) and self.progress is not None:
            self.progress.round(session, rlog, counted=counted, validated=competes)

    def _annotated(self, kind: ModelKind, fold: int, best: dict[str, Any]) -> dict[str, Any]:
        """The selection with its round's calibration (if fitted) and the guard's flag (if any)."""
        platt = self.ckpt.meta(kind, fold, int(best["round"])).get(PLATT_KEY)
        if platt:
            best = {**best, PLATT_KEY: [float(x) for x in platt]}
        problem = selection_problem(best.get("val_auc"))
        if problem:  # scored on its own test fold, left out of the external average
            best = {**best, GUARD_KEY: problem}
            log.warning(
                "%s fold %d: selected model %s; left out of the external average", kind, fold, problem
            )
        return best

    def _restore_round_logs(self, kind: ModelKind, fold: int) -> None:
        """Who took part in the rounds a previous server process finished, from their checkpoints."""
        key = f"{kind}/fold{fold}"
        rounds = self.ckpt.rounds(kind, fold)
        self.participation[key] = [
            {k: v for k, v in self.ckpt.meta(kind, fold, r).items() if k in _ROUNDLOG_FIELDS} for r in rounds
        ]
        self.resumed[key] = len(rounds)
        if self.progress is not None:
            self.progress.resumed(kind, len(rounds))

    def predict_fold(
        self, kind: ModelKind, fold: int, best: dict[str, Any], roles: Sequence[str] = ROLES
    ) -> None:
        """The sites of ``roles`` predict with the selected fold model (rows stay at the sites).

        When the fold's last round is selected, the training sites already scored that
        model at its closing validation and kept the probabilities
        (``EvaluateRequest.stage``): they are sent its digest, and the weights only
        if they ask again (``resend``).
        """
        rnd = int(best["round"])
        vec = self.ckpt.load(kind, fold, rnd)
        platt = best.get(PLATT_KEY)
        dtype = self.cfg.federation.transport_dtype
        for role in roles:
            nodes = list(self.registry.nodes(role))
            req = PredictRequest(
                model=kind,
                fold=fold,
                round=rnd,
                role=role,
                platt=None if not platt else (float(platt[0]), float(platt[1])),
            )
            if nodes and role == ROLE_TRAIN and rnd == self.cfg.for_model(kind).train.rounds:
                nodes = self._predict_kept(nodes, dataclasses.replace(req, staged=model_digest(vec, dtype)))
            if nodes:
                self.messenger.send(
                    nodes, PREDICT, dataclasses.replace(req, weights=vec), dtype=dtype, validate=_predicted
                )

    def _predict_kept(self, nodes: list[int], req: PredictRequest) -> list[int]:
        """Predict from the kept probabilities of the model ``req.staged``; the nodes that asked for its weights."""
        answers = self.messenger.send(nodes, PREDICT, req, validate=_resend_or_predicted)
        resend = [a.node for a in answers if a.body.resend]
        log.info(
            "%s fold %d: %d of %d training site(s) predicted with the probabilities kept at validation%s",
            req.model,
            req.fold,
            len(answers) - len(resend),
            len(nodes),
            f"; sending the model to {', '.join(a.site for a in answers if a.body.resend)}" if resend else "",
        )
        return resend


def _predicted(body: PredictReply) -> None:
    """A reply to a prediction that carried the model: it cannot ask for the model."""
    if body.resend:
        raise ProtocolError("asked for the model's weights in reply to a request that carried them")


def _resend_or_predicted(body: PredictReply) -> None:
    """A reply to a prediction by digest: either rows written or a request for the weights, not both."""
    if body.resend and body.predicted:
        raise ProtocolError(f"asked for the model's weights but also reports {body.predicted} rows predicted")
