"""A Grid that counts the bytes each site sends and receives.

Wraps the Grid Flower hands the ServerApp and delegates everything to it;
the counts are payload bytes (arrays, metrics, config values), which is what
a hospital's network carries beyond a constant gRPC/HTTP overhead.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


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


class MeteredGrid(Grid):
    """Delegating Grid that tallies payload bytes per destination/source node."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner
        self.sent: dict[int, int] = defaultdict(int)  # server -> node
        self.received: dict[int, int] = defaultdict(int)  # node -> server

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

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        for m in messages:
            self.sent[m.metadata.dst_node_id] += payload_bytes(m.content)
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.inner.pull_messages(message_ids))
        for m in replies:
            if not m.has_error():
                self.received[m.metadata.src_node_id] += payload_bytes(m.content)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        for m in messages:
            self.sent[m.metadata.dst_node_id] += payload_bytes(m.content)
        replies = list(self.inner.send_and_receive(messages, timeout=timeout))
        for m in replies:
            if not m.has_error():
                self.received[m.metadata.src_node_id] += payload_bytes(m.content)
        return replies
