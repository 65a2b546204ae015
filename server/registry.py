"""Which node is which hospital: discovery, rejoin after a restart, roles.

The site registry is the server's only map from Flower node ids to sites.
Discovery asks every connected node who it is (``query.siteinfo``); a node
that connects later is asked once, and takes the place (and role) of the
site it says it is, so a SuperNode restarted without an enrolled key
rejoins under its new node id.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common.config import ExperimentConfig, SiteConfig, with_sites
from common.protocol import ROLE_TRAIN, SITEINFO, Empty, SiteInfoReply
from common.replycheck import reported

from .identity import SiteGate

if TYPE_CHECKING:
    from flwr.serverapp import Grid

    from .messenger import Messenger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteNode:
    node_id: int
    site: str
    role: str
    patients: int
    benign: int
    malignant: int
    environment: dict[str, Any] = field(default_factory=dict, compare=False)  # what its numbers depend on
    device: dict[str, str] = field(default_factory=dict, compare=False)  # where it trains (common.device)


class SiteRegistry:
    """Node id -> site, the nodes already asked, the sites unavailable and why."""

    def __init__(self, cfg: ExperimentConfig, gate: SiteGate | None = None) -> None:
        self.cfg = cfg
        self.gate = gate if gate is not None else SiteGate(None)  # who may speak for which site (server/identity.py)
        self.sites: dict[int, SiteNode] = {}
        self.asked: set[int] = set()  # nodes asked who they are
        self.unavailable: dict[str, str] = {}

    def site_of(self, node: int) -> str:
        return self.sites[node].site if node in self.sites else f"node-{node}"

    def nodes(self, role: str) -> dict[int, str]:
        """Node id -> site of the sites with ``role``, in site order."""
        return {n: s.site for n, s in sorted(self.sites.items(), key=lambda t: t[1].site) if s.role == role}

    def discover(self, messenger: Messenger, expected: int, wait_s: float) -> dict[int, SiteNode]:
        """Ask every connected node who it is; wait up to ``wait_s`` for ``expected`` nodes."""
        grid = messenger.grid
        deadline = time.monotonic() + wait_s
        while len(list(grid.get_node_ids())) < expected and time.monotonic() < deadline:
            time.sleep(1.0)
        nodes = sorted(grid.get_node_ids())
        log.info("%d node(s) connected: asking for site information", len(nodes))
        self.asked.update(nodes)
        found = self._siteinfo(messenger, nodes)
        declared = {s.name: s for s in self.cfg.sites}
        ordered = [declared.get(name, SiteConfig(name=name)) for _, name, _ in found]
        if declared:
            ordered.sort(key=lambda s: list(declared).index(s.name) if s.name in declared else len(declared))
        cfg = with_sites(self.cfg, tuple(ordered))
        roles = {s.name: s.role for s in cfg.sites}
        for node, name, m in found:
            self.sites[node] = SiteNode(
                node_id=node,
                site=name,
                role=roles[name],
                patients=m.patients,
                benign=m.benign,
                malignant=m.malignant,
                environment=m.environment or {},
                device=reported(m.device) if isinstance(m.device, dict) else {},
            )
        left_out = [n for n in nodes if n not in self.sites]
        if left_out:
            log.warning("%d node(s) left out of this run (unavailable or no reply, see above)", len(left_out))
        for s in sorted(self.sites.values(), key=lambda s: s.site):
            log.info(
                "site %-10s role %-8s patients %4d (benign %d, malignant %d)",
                s.site,
                s.role,
                s.patients,
                s.benign,
                s.malignant,
            )
        return self.sites

    def held(self) -> dict[str, int]:
        """Site -> the node identified as it."""
        return {s.site: s.node_id for s in self.sites.values()}

    def claim_holds(self, grid: Grid, node: int, site: str) -> bool:
        """Whether ``node`` may speak for ``site`` (enrolled key, site not held by another node online)."""
        return bool(self.gate.admit(grid, [(node, site, None)], held=self.held()))

    def _siteinfo(
        self, messenger: Messenger, nodes: list[int], timeout: float | None = None
    ) -> list[tuple[int, str, SiteInfoReply]]:
        """(node, site, patient counts) of the nodes that answered ``siteinfo``, by site name."""
        found = [(a.node, a.site, a.body) for a in messenger.send(nodes, SITEINFO, Empty(), timeout=timeout)]
        found = self.gate.admit(messenger.grid, found, held=self.held())
        return sorted(found, key=lambda t: t[1])

    def rejoin(self, messenger: Messenger) -> dict[int, str]:
        """The training nodes, after identifying nodes that connected since discovery.

        A hospital whose SuperNode restarted without an enrolled key comes
        back under a new node id; it takes its old place (and role).  A site
        not in the run is left out.  Each node is asked once, and for at most
        a minute: the round waits meanwhile.
        """
        new = sorted(set(messenger.grid.get_node_ids()) - self.asked)
        if new:
            self.asked.update(new)
            by_name = {s.site: s for s in self.sites.values()}
            for node, name, _ in self._siteinfo(messenger, new, timeout=min(messenger.timeout, 60.0)):
                old = by_name.get(name)
                if old is None:
                    log.warning("site %s connected after discovery: left out of this run", name)
                    continue
                del self.sites[old.node_id]
                self.sites[node] = dataclasses.replace(old, node_id=node)
                self.unavailable.pop(name, None)
                log.info("site %s rejoined (node %d, was %d)", name, node, old.node_id)
        return self.nodes(ROLE_TRAIN)
