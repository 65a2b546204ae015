"""FedAvg for the sacral plan: site-aware sampling, guarded aggregation, pooled validation.

Overrides only the four hooks Flower's ``Strategy.start()`` calls; the loop
itself is Flower's.  FedProx, FedAdam and FedYogi reuse these hooks by
cooperative inheritance (``class X(FedAdam, GuardedFedAvg)``): FedOpt's
``aggregate_train`` calls ``super()``, which lands here.

One model exchange per round: round r+1's train message asks each site to
validate the model it carries (round r's aggregate) before training on it,
and the statistics come back with the update; they are pooled and put down
to round r.  Only the last round's aggregate needs an evaluate exchange of
its own: ``configure_evaluate`` sends nothing in earlier rounds (Flower's
``start()`` then exchanges no message and ``aggregate_evaluate`` gets no
reply).  R rounds cost R+1 model downloads per site instead of 2R; the sites keep the
last model's predictions, so when it is selected the prediction sends no model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, TypeVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.gridstats import ClassHistogram, pooled_metrics
from common.protocol import (
    EVALUATE,
    NUM_EXAMPLES,
    PROXIMAL_MU,
    TRAIN,
    EvaluateRequest,
    MessageSpec,
    RoundRequest,
    TrainRequest,
)
from common.records import metric_record, weights_from_record, weights_record

from .aggregation import robust_aggregate, screen_updates
from .replies import ReplyReader
from .session import FoldSession, RoundLog

log = logging.getLogger(__name__)
R = TypeVar("R", bound=RoundRequest)


class FederationError(RuntimeError):
    """The federation cannot continue (e.g. fewer sites than the configured minimum)."""


class GuardedFedAvg(FedAvg):
    """FedAvg over the plan's training sites only, never crashing on one bad reply."""

    session: FoldSession
    _round_started: float = 0.0
    _global: np.ndarray | None = None  # the round's global vector: reference for the norm bound
    _replies: ReplyReader  # this phase's messages and the reading of their replies

    def bind(self, session: FoldSession) -> GuardedFedAvg:
        self.session = session
        return self

    # -- which nodes take part ------------------------------------------------
    def _live_train_nodes(self, grid: Grid) -> list[int]:
        if self.session.refresh is not None:
            self.session.train_nodes = self.session.refresh()
        connected = set(grid.get_node_ids())
        nodes = [n for n in self.session.train_nodes if n in connected]
        if len(nodes) < self.session.min_sites:
            raise FederationError(
                f"only {len(nodes)} training site(s) connected "
                f"({[self.session.site_of(n) for n in nodes]}), minimum is {self.session.min_sites}"
            )
        return nodes

    def _messages(self, spec: MessageSpec, request: RoundRequest, nodes: list[int]) -> list[Message]:
        s = self.session
        sent = spec.messages(s.header, request, nodes, dtype=s.transport_dtype)
        self._replies = ReplyReader(s, sent)  # Flower sets the messages' ids when it pushes them
        return sent

    def _request(
        self, cls: type[R], server_round: int, arrays: ArrayRecord, config: ConfigRecord, **extra: Any
    ) -> R:
        """A round's request of type ``cls`` (train or evaluate) with its own ``extra`` fields."""
        s = self.session
        mu = config.get(PROXIMAL_MU, 0.0)  # FedProx's configure_train puts its mu here
        return cls(
            weights=weights_from_record(arrays),
            model=s.model,
            fold=s.fold,
            server_round=server_round,
            global_round=server_round + s.round_offset,
            total_rounds=s.total_rounds,
            proximal_mu=float(mu),  # type: ignore[arg-type]
            **extra,
        )

    def _validates(self, server_round: int) -> bool:
        """Whether this round's train message validates the model it carries (the previous round's)."""
        s = self.session
        carried = server_round + s.round_offset - 1
        return (server_round > 1 or s.validate_first) and carried >= s.validate_from

    def _last(self, server_round: int) -> bool:
        return server_round + self.session.round_offset >= self.session.total_rounds

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._round_started = time.perf_counter()
        nodes = self._live_train_nodes(grid)
        rlog = self.session.log_for(server_round)
        for node, site in self.session.train_nodes.items():
            if node not in nodes:
                rlog.dropped[site] = "not connected when the round started"
                log.warning("[round %d] %s not connected: left out of this round", rlog.round, site)
        request = self._request(TrainRequest, server_round, arrays, config, validate=self._validates(server_round))
        self._global = request.weights
        log.info(
            "[%s fold %d round %d/%d] training at %s%s",
            self.session.model,
            self.session.fold,
            server_round + self.session.round_offset,
            self.session.total_rounds,
            ", ".join(self.session.site_of(n) for n in nodes),
            f" (validating round {rlog.round - 1} first)" if request.validate else "",
        )
        return self._messages(TRAIN, request, nodes)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Only after the last round: earlier aggregates are validated by the next train message.

        The sites keep this model's predictions (``stage``): when it is the one selected,
        the fold's prediction names it by digest instead of sending it again.
        """
        if not self._last(server_round):
            return []
        nodes = self._live_train_nodes(grid)
        return self._messages(EVALUATE, self._request(EvaluateRequest, server_round, arrays, config, stage=True), nodes)

    # -- aggregation ------------------------------------------------------------
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        rlog = self.session.log_for(server_round)
        reader = self._replies
        rlog.missing = reader.missing(replies)
        for site in rlog.missing:
            log.warning("[round %d] no reply from %s within the round timeout: left out", rlog.round, site)
        vlog = self.session.log_for(server_round - 1) if self._validates(server_round) else None
        updates = reader.updates(rlog, reader.answered(rlog, replies, "train"), vlog)
        rlog.seconds = time.perf_counter() - self._round_started
        if vlog is not None:
            self._pool(vlog, updates.validation)
        if not updates.vectors:
            log.error("[round %d] no usable training update: the global model is unchanged", rlog.round)
            return None, None
        screen = screen_updates(
            updates.vectors,
            self._reference(updates.vectors[0].shape),
            norm_bound_factor=self.session.norm_bound_factor,
            max_norm=self.session.max_update_norm,
            names=updates.names,
        )
        for i, reason in screen.dropped.items():
            rlog.dropped[updates.names[i]] = f"train: {reason}"
            log.warning("[round %d] update dropped: %s", rlog.round, reason)
        if not screen.kept:
            log.error("[round %d] every update was dropped: the global model is unchanged", rlog.round)
            return None, None
        kept_w = [updates.weights[i] for i in screen.kept]
        agg = robust_aggregate(
            [updates.vectors[i] for i in screen.kept], kept_w, self.session.robust, self.session.trim_fraction
        )
        rlog.trained = [updates.names[i] for i in screen.kept]
        rlog.train_loss = float(np.average([updates.losses[i] for i in screen.kept], weights=kept_w))
        return weights_record(agg), MetricRecord({NUM_EXAMPLES: int(sum(kept_w)), "loss": rlog.train_loss})

    def _reference(self, shape: tuple[int, ...]) -> np.ndarray:
        ref = getattr(self, "_global", None)
        if ref is None or ref.shape != shape:
            return np.zeros(shape, np.float32)
        return np.asarray(ref)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The last round's validation (earlier rounds exchange nothing here: see ``configure_evaluate``)."""
        if not self._last(server_round):
            return None
        rlog = self.session.log_for(server_round)
        reader = self._replies
        val = reader.statistics(rlog, reader.answered(rlog, replies, "evaluate"))
        rlog.seconds = time.perf_counter() - self._round_started
        return self._pool(rlog, val)

    def _pool(self, rlog: RoundLog, val: list[tuple[str, ClassHistogram]]) -> MetricRecord | None:
        """Pool the sites' validation histograms of round ``rlog.round``'s model (in site order)."""
        val = sorted(val, key=lambda sv: sv[0])  # order-free result
        rlog.evaluated = [site for site, _ in val]
        if not val:
            self.session.validated[rlog.round] = None
            log.warning("[round %d] no usable validation statistics", rlog.round)
            return None
        total = ClassHistogram.aggregate([h for _, h in val])
        m = pooled_metrics(total, self.session.threshold)
        rlog.val_auc = None if np.isnan(m.auc) else float(m.auc)
        rlog.val_n = int(m.n)
        self.session.validated[rlog.round] = total.to_arrays()
        log.info(
            "[%s fold %d round %d] pooled validation AUC %.4f (n=%d, sites %s)",
            self.session.model,
            self.session.fold,
            rlog.round,
            m.auc,
            m.n,
            ",".join(rlog.evaluated),
        )
        return metric_record({"val-auc": m.auc if not np.isnan(m.auc) else -1.0, NUM_EXAMPLES: m.n})

