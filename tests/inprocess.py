"""An in-process Grid for unit tests of the plan: messages go straight to the real ClientApp.

No SuperLink, no network: the plan logic (who trains, who predicts, model
selection, resume) is tested against the project's real ``client.app`` in
one process.  The transport itself is covered by the simulation and the
loopback deployment tests.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from client.app import app as client_app


class Interrupted(RuntimeError):
    """Raised to simulate the server process dying mid-run."""


class InProcessGrid(Grid):
    def __init__(
        self,
        sites: dict[str, Path],
        out_dir: Path,
        *,
        silent: Iterable[str] = (),
        fail_after_train: int | None = None,
        reconnect_after_train: Mapping[str, int] | None = None,
    ) -> None:
        """``reconnect_after_train``: site -> train messages (all sites) after which that site's
        node comes back under a new node id, as a SuperNode restarted without an enrolled key."""
        self.nodes = {100 + i: name for i, name in enumerate(sites)}
        self.reconnect = dict(reconnect_after_train or {})
        self.node_config = {
            nid: {"site": name, "data-dir": str(sites[name]), "out-dir": str(out_dir / name), "threads": 1}
            for nid, name in self.nodes.items()
        }
        self.silent = {nid for nid, name in self.nodes.items() if name in set(silent)}
        self.fail_after_train = fail_after_train
        self.calls: Counter[tuple[str, str]] = Counter()
        self._run = Run.create_empty(run_id=1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise AssertionError("the plan uses send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise AssertionError("the plan uses send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        trained = sum(v for (_, t), v in self.calls.items() if t == "train")
        for site, after in list(self.reconnect.items()):
            if trained >= after:
                old = next(n for n, name in self.nodes.items() if name == site)
                self.nodes[old + 1000] = self.nodes.pop(old)
                self.node_config[old + 1000] = self.node_config.pop(old)
                del self.reconnect[site]
        for msg in messages:
            nid = msg.metadata.dst_node_id
            mtype = msg.metadata.message_type
            if nid not in self.nodes:
                continue  # a node that is gone never answers
            trained = sum(v for (_, t), v in self.calls.items() if t == "train")
            if mtype == "train" and self.fail_after_train is not None and trained >= self.fail_after_train:
                raise Interrupted("server killed")
            self.calls[(self.nodes[nid], mtype)] += 1
            if nid in self.silent and mtype != "query.siteinfo":
                continue  # the site never answers: its reply is lost
            ctx = Context(run_id=1, node_id=nid, node_config=self.node_config[nid], state=RecordDict(), run_config={})
            replies.append(client_app(msg, ctx))
        return replies
