"""Who may speak for a site: each node's declared site checked against the key it authenticated with.

A SuperNode declares its site in its node config, which it writes itself.
The SuperLink knows which key each node authenticated with (Flower's
``NodeInfo.public_key``, seen by the ServerApp through ``Grid.get_nodes()``),
and the enrolment registry (``server/enrolment.py``) binds each key to one
site.  A node is admitted for a site only if its key was enrolled for that
site, and only while no other connected node holds the site: a hospital
whose SuperNode restarts keeps its node id (the key maps to it), so a
second node for a connected site is an impostor or a misconfigured twin.
With open enrolment (tests, simulation) there is no registry; the
one-node-per-connected-site rule still holds.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from flwr.serverapp import Grid

from .enrolment import Enrolment, EnrolmentError, key_fingerprint

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Claim:
    """A node saying which site it is, with the public key the SuperLink authenticated it by."""

    node_id: int
    site: str
    public_key: bytes


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    accepted: bool
    reason: str = ""


def decide(
    claims: Sequence[Claim], enrolment: Enrolment | None, held: Mapping[str, int], online: Collection[int]
) -> list[Verdict]:
    """Admit or refuse each claim (same order).

    ``enrolment``: the registry, None for open enrolment. ``held``: site ->
    node id already admitted for it; ``online``: node ids connected now.
    Within one batch the lowest node id claiming a site wins.
    """
    taken = {site: node for site, node in held.items() if node in online}
    verdicts: list[Verdict | None] = [None] * len(claims)
    for i in sorted(range(len(claims)), key=lambda i: claims[i].node_id):
        claim = claims[i]
        reason = ""
        if enrolment is not None:
            try:
                enrolled_for = (
                    enrolment.site_of(key_fingerprint(claim.public_key)) if claim.public_key else None
                )
            except EnrolmentError:
                enrolled_for = None
            if enrolled_for is None:
                reason = "its key is not enrolled"
            elif enrolled_for != claim.site:
                reason = f"its key is enrolled for site {enrolled_for}, not {claim.site}"
        if not reason and taken.get(claim.site, claim.node_id) != claim.node_id:
            reason = f"site {claim.site} is already connected as node {taken[claim.site]}"
        if not reason:
            taken[claim.site] = claim.node_id
        verdicts[i] = Verdict(claim, not reason, reason)
    return [v for v in verdicts if v is not None]


class SiteGate:
    """The ServerApp's check of every site claim; re-reads the registry each time (keys enrolled mid-run count)."""

    def __init__(self, enrolment_file: Path | None) -> None:
        self.enrolment_file = enrolment_file
        self.refused: list[dict[str, object]] = []

    def admit(
        self, grid: Grid, found: Sequence[tuple[int, str, T]], held: Mapping[str, int]
    ) -> list[tuple[int, str, T]]:
        """The ``(node, site, payload)`` entries whose claim holds; the others are logged and recorded."""
        if not found:
            return []
        nodes = {n.node_id: n for n in grid.get_nodes()}
        enrolment = Enrolment.load(self.enrolment_file) if self.enrolment_file is not None else None
        claims = [
            Claim(node, site, bytes(nodes[node].public_key) if node in nodes else b"")
            for node, site, _ in found
        ]
        admitted = []
        for entry, verdict in zip(found, decide(claims, enrolment, held, set(nodes)), strict=True):
            if verdict.accepted:
                admitted.append(entry)
                continue
            log.warning("refused node %d claiming site %s: %s", entry[0], entry[1], verdict.reason)
            self.refused.append({"node": entry[0], "claimed_site": entry[1], "reason": verdict.reason})
        return admitted
