"""One phase's replies read for the strategy: which site each stands for, what is usable, why the rest is not.

Every reply is another party's input.  A reply is attributed to the site the
message went to (a dead node's reply comes from the SuperLink: see
``common.protocol.reply_node``), decoded by its ``MessageSpec``, checked by the
messenger's validators and its patient count; anything unusable is dropped
with its reason in the round's log, never raised.  Results are in site order,
so the aggregate does not depend on the order the sites answered in.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import Message

from common.gridstats import ClassHistogram
from common.protocol import EVALUATE, TRAIN, MessageSpec, ProtocolError, reply_node, status_of
from common.replycheck import check_num_examples

from .session import FoldSession, RoundLog

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Updates:
    """A round's usable train replies, index-aligned, in site order."""

    vectors: list[np.ndarray] = dataclasses.field(default_factory=list)
    weights: list[float] = dataclasses.field(default_factory=list)  # patients, as checked
    names: list[str] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    validation: list[tuple[str, ClassHistogram]] = dataclasses.field(default_factory=list)


class ReplyReader:
    """Reads the replies to the messages ``sent`` in one phase of a fold's round."""

    def __init__(self, session: FoldSession, sent: Sequence[Message]) -> None:
        self.session = session
        self.sent = tuple(sent)

    def site(self, reply: Message) -> str:
        """The site a reply stands for."""
        return self.session.site_of(reply_node(reply, self.sent))

    def missing(self, replies: Sequence[Message]) -> list[str]:
        """Sites sent a message that did not answer (the round timeout passed)."""
        answered = {self.site(m) for m in replies}
        return sorted({self.session.site_of(m.metadata.dst_node_id) for m in self.sent} - answered)

    def _check(self, spec: MessageSpec, body: object, site: str) -> None:
        """The messenger's reply validators (raise ProtocolError or ValueError to drop the reply)."""
        if self.session.check is not None:
            self.session.check(spec, body, site)

    def answered(self, rlog: RoundLog, replies: Iterable[Message], phase: str) -> list[Message]:
        """The replies that carry an answer: not an error, not a site saying it is unavailable."""
        ok: list[Message] = []
        for msg in replies:
            site = self.site(msg)
            if msg.has_error():
                rlog.dropped[site] = f"{phase}: error reply: {msg.error.reason}"
                log.warning("[round %d] %s dropped (%s error: %s)", rlog.round, site, phase, msg.error.reason)
                continue
            status = status_of(msg)
            if status is not None and not status.ok:
                rlog.dropped[site] = f"{phase}: site unavailable: {status.reason}"
                log.warning("[round %d] %s unavailable: %s", rlog.round, site, status.reason)
                continue
            ok.append(msg)
        return ok

    def updates(self, rlog: RoundLog, good: list[Message], vlog: RoundLog | None) -> Updates:
        """Decode and check each train reply, in site order.

        A malformed reply is dropped whole, its validation statistics too;
        ``vlog`` (the log of the round whose model these replies validated,
        when they were asked to) notes every site that gave none.
        """
        out = Updates()
        for msg in sorted(good, key=self.site):
            site = self.site(msg)
            try:
                update = TRAIN.read_reply(msg)
                self._check(TRAIN, update, site)  # the validation statistics too: a bad part drops the reply
                n = check_num_examples(update.num_examples, self.session.site_patients.get(site))
            except (ProtocolError, ValueError) as exc:
                rlog.dropped[site] = f"train: malformed reply ({exc})"
                log.warning("[round %d] %s dropped: malformed reply (%s)", rlog.round, site, exc)
                if vlog is not None:
                    note(vlog, site, f"evaluate: malformed train reply ({exc})")
                continue
            if vlog is not None:
                if update.validation is None:
                    note(vlog, site, "evaluate: the train reply has no validation statistics")
                else:
                    out.validation.append((site, update.validation))
            out.vectors.append(update.weights)
            out.weights.append(n)
            out.names.append(site)
            if update.epsilon is not None:
                rlog.epsilon[site] = finite_or_nan(update.epsilon)
            out.losses.append(finite_or_nan(update.loss))
        return out

    def statistics(self, rlog: RoundLog, good: list[Message]) -> list[tuple[str, ClassHistogram]]:
        """Each evaluate reply's validation histogram, in site order; a malformed one is noted and left out."""
        val: list[tuple[str, ClassHistogram]] = []
        for msg in sorted(good, key=self.site):
            site = self.site(msg)
            try:
                stats = EVALUATE.read_reply(msg)
                self._check(EVALUATE, stats, site)
            except (ProtocolError, ValueError) as exc:
                note(rlog, site, f"evaluate: malformed statistics ({exc})")
                log.warning("[round %d] %s dropped: malformed statistics (%s)", rlog.round, site, exc)
                continue
            val.append((site, stats.histogram))
        return val


def note(rlog: RoundLog, site: str, reason: str) -> None:
    """Record why a site is out of a round's step, keeping an earlier reason (e.g. its update was dropped too)."""
    earlier = rlog.dropped.get(site)
    rlog.dropped[site] = f"{earlier}; {reason}" if earlier else reason


def finite_or_nan(value: object) -> float:
    """A reported diagnostic (loss, epsilon) as a float; anything else becomes NaN."""
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")
    return x if np.isfinite(x) else float("nan")
