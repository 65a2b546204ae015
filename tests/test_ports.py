"""Loopback ports for the Flower processes: free, and outside the range outgoing connections draw from."""

from __future__ import annotations

import random
import socket
from pathlib import Path

from common.processes import ephemeral_range, free_port


def test_a_free_port_lies_outside_the_ephemeral_range_and_can_be_bound() -> None:
    lo, hi = ephemeral_range()
    for _ in range(20):
        port = free_port()
        assert not lo <= port <= hi and port >= 10000
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


class _Scripted(random.Random):
    """Draws the given ports first (a taken one among them), then behaves as a seeded Random."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(0)
        self.ports = ports

    def randint(self, a: int, b: int) -> int:
        return self.ports.pop(0) if self.ports else super().randint(a, b)


def test_a_taken_port_is_skipped() -> None:
    lo, _ = ephemeral_range()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        port = free_port(_Scripted([taken, 10001 if lo > 10101 else 65000]))
        assert port != taken
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))


def test_an_unreadable_or_odd_range_falls_back_to_linux_defaults(tmp_path: Path) -> None:
    f = tmp_path / "range"
    assert ephemeral_range(f) == (32768, 60999)  # missing
    for text in ("", "abc def", "50000 40000", "0 70000", "1 2 3"):
        f.write_text(text)
        assert ephemeral_range(f) == (32768, 60999), text
    f.write_text("20000\t40000\n")
    assert ephemeral_range(f) == (20000, 40000)
