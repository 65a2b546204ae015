"""A Grid that counts the bytes each site sends and receives, and waits for replies promptly.

Wraps the Grid Flower hands the ServerApp and delegates everything to it;
the counts are payload bytes (arrays, metrics, config values), which is what
a hospital's network carries beyond a constant gRPC/HTTP overhead, in total
and per message type (so per-round figures need no guessing).

On a deployment, ``send_and_receive`` is its own push-then-poll loop:
Flower's ``HttpGrid`` sleeps 3 s between polls for replies, which adds
1.5 s on average to every exchange.  Here the wait starts at
``poll_interval_s`` after each reply (the other sites' replies tend to
follow soon) and grows to ``max_poll_interval_s`` while none comes: each
poll is a request the SuperLink answers, CPU the sites' training shares.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.superlink.grid.http_grid import HttpGrid


def payload_bytes(content: RecordDict) -> int:
    """Bytes of the arrays, metric values and config values a message carries."""
    total = 0
    for rec in content.array_records.values():
        total += sum(len(arr.data) for arr in rec.values())
    for mrec in content.metric_records.values():
        for mv in mrec.values():
            total += 8 * (len(mv) if isinstance(mv, list) else 1)
    for crec in content.config_records.values():
        for v in crec.values():
            total += len(v) if isinstance(v, str | bytes) else 8
    return total


def next_poll_interval(current: float, replied: bool, floor: float, ceiling: float, growth: float = 1.5) -> float:
    """The wait before the next poll: ``floor`` after a reply, else ``current`` grown by ``growth`` up to ``ceiling``."""
    return floor if replied else min(ceiling, max(floor, current * growth))


class MeteredGrid(Grid):
    """Delegating Grid that tallies payload bytes per destination/source node and message type."""

    def __init__(self, inner: Grid, poll_interval_s: float = 0.05, max_poll_interval_s: float = 0.5) -> None:
        self.inner = inner
        self.poll_interval_s = poll_interval_s
        self.max_poll_interval_s = max_poll_interval_s
        self.sent: dict[int, int] = defaultdict(int)  # server -> node
        self.received: dict[int, int] = defaultdict(int)  # node -> server
        # node -> message type -> [messages to the node, bytes to it, bytes from it]
        self.by_type: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0, 0]))

    def _count_out(self, m: Message) -> None:
        n = payload_bytes(m.content)
        self.sent[m.metadata.dst_node_id] += n
        tally = self.by_type[m.metadata.dst_node_id][m.metadata.message_type]
        tally[0] += 1
        tally[1] += n

    def _count_in(self, m: Message) -> None:
        if m.has_error():
            return
        n = payload_bytes(m.content)
        self.received[m.metadata.src_node_id] += n
        self.by_type[m.metadata.src_node_id][m.metadata.message_type][2] += n

    def traffic(self, node: int) -> dict[str, dict[str, int]]:
        """Per message type, from the site's side: messages, bytes it received and sent."""
        return {
            t: {"messages": v[0], "bytes_received": v[1], "bytes_sent": v[2]} for t, v in sorted(self.by_type[node].items())
        }

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.inner.get_nodes()  # with each node's public key (server/identity.py)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for m in messages:
            self._count_out(m)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        for m in replies:
            self._count_in(m)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's exchange, except on the deployment grid: push, then poll (``next_poll_interval``)."""
        if not isinstance(self.inner, HttpGrid):  # simulation polls every 0.1 s already
            messages = list(messages)
            for m in messages:
                self._count_out(m)
            replies = list(self.inner.send_and_receive(messages, timeout=timeout))
            for m in replies:
                self._count_in(m)
            return replies
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        received: list[Message] = []
        wait = self.poll_interval_s
        while pending:
            got = list(self.pull_messages(pending))
            received += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            wait = next_poll_interval(wait, bool(got), self.poll_interval_s, self.max_poll_interval_s)
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            time.sleep(wait)
        return received
