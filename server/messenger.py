"""Send a request to some sites and keep the usable replies: the server's one messaging path.

Every exchange outside Flower's round loop goes through :meth:`Messenger.send`
(the round loop's own replies reach :meth:`Messenger.check` through the
strategy), so timeouts, error replies, ``unavailable`` sites, malformed
replies and reply validation are handled in one place.  Validators are pure
functions ``(spec, body, cfg) -> None`` that raise :class:`ProtocolError`
(or ``ValueError``) to reject a reply; :meth:`Messenger.check` is the single
call point, listed in :data:`REPLY_CHECKS`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from common.protocol import (
    Header,
    MessageSpec,
    ProtocolError,
    reply_node,
    status_of,
)

from .meteredgrid import MeteredGrid
from .registry import SiteRegistry
from .replyguard import REPLY_CHECKS, ReplyCheck, ReplyContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """A usable reply: the node and site it stands for, and its decoded body."""

    node: int
    site: str
    body: Any


class Messenger:
    """Requests out, decoded and validated replies in, every problem logged against its site."""

    def __init__(
        self,
        grid: MeteredGrid,
        registry: SiteRegistry,
        header: Header,
        timeout: float,
        checks: Sequence[ReplyCheck] = REPLY_CHECKS,
    ) -> None:
        self.grid = grid
        self.registry = registry
        self.header = header
        self.timeout = timeout
        self.checks = tuple(checks)
        self.rejected: dict[str, list[str]] = {}  # site -> replies dropped by the checks, with why

    def check(self, spec: MessageSpec, body: Any, site: str | None = None) -> None:
        """Run every reply validator on a decoded reply; raises :class:`ProtocolError` to reject it.

        ``site``: the sender, whose declared patients bound its counts (unknown during discovery).
        """
        declared = next((s.patients for s in self.registry.sites.values() if s.site == site), None)
        ctx = ReplyContext(self.registry.cfg, declared)
        for fn in self.checks:
            try:
                fn(spec, body, ctx)
            except ProtocolError:
                raise
            except ValueError as exc:
                raise ProtocolError(str(exc)) from exc

    def reject(self, site: str, step: str, reason: object) -> None:
        """Record that ``site``'s reply to ``step`` was dropped and why (in the summary); the run goes on."""
        self.rejected.setdefault(site, []).append(f"{step}: {reason}")
        log.warning("%s: %s reply rejected: %s", site, step, reason)

    def send(
        self,
        nodes: Iterable[int],
        spec: MessageSpec,
        body: Any,
        *,
        timeout: float | None = None,
        dtype: str = "float32",
        validate: Callable[[Any], None] | None = None,
    ) -> list[Answer]:
        """Send one request to each node; the node, site and decoded body of every usable reply.

        ``validate``: a check that needs the request (e.g. the reply covers exactly what was asked).
        """
        msgs = spec.messages(self.header, body, nodes, dtype=dtype)
        timeout = self.timeout if timeout is None else timeout
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        good: list[Answer] = []
        answered = set()
        for r in replies:
            node = reply_node(r, msgs)
            answered.add(node)
            site = self.registry.site_of(node)
            if r.has_error():
                log.warning("%s: %s failed: %s", site, spec.type, r.error.reason)
                continue
            status = status_of(r)
            if status is not None and node not in self.registry.sites:  # discovery: the reply says who it is
                site = status.site or site
            if status is not None and not status.ok:
                if node not in self.registry.sites and not self.registry.claim_holds(self.grid, node, site):
                    continue  # a node reports only its own site unavailable (refusal logged by the gate)
                log.warning("%s: %s unavailable: %s", site, spec.type, status.reason)
                self.registry.unavailable.setdefault(site, status.reason)
                continue
            try:
                decoded = spec.read_reply(r)
                self.check(spec, decoded, site)
                if validate is not None:
                    validate(decoded)
            except (ProtocolError, ValueError) as exc:
                self.reject(site, spec.name or spec.action, exc)
                continue
            good.append(Answer(node, site, decoded))
        good.sort(key=lambda a: (a.site, a.node))  # pooled in site order, whatever order they answered in
        for n in {m.metadata.dst_node_id for m in msgs} - answered:
            log.warning("%s: no reply to %s within %.0f s", self.registry.site_of(n), spec.type, timeout)
        return good
