"""The deployment grid's reply polling: prompt after a reply, backing off while none comes."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import pytest
from flwr.app import Message, RecordDict
from flwr.superlink.grid.http_grid import HttpGrid

from server import meteredgrid
from server.meteredgrid import MeteredGrid, next_poll_interval


def test_poll_interval_resets_after_a_reply_and_grows_to_the_ceiling() -> None:
    waits, w = [], 0.2
    for replied in (False, False, False, False, False, False, True, False):
        w = next_poll_interval(w, replied, floor=0.2, ceiling=1.0)
        waits.append(round(w, 4))
    assert waits == [0.3, 0.45, 0.675, 1.0, 1.0, 1.0, 0.2, 0.3]
    assert next_poll_interval(0.05, False, floor=0.2, ceiling=1.0) == 0.2  # never below the floor


class _ScriptedGrid(HttpGrid):
    """An HttpGrid whose SuperLink is a script: which replies each pull returns (no network)."""

    def __init__(self, script: list[list[str]]) -> None:  # not HttpGrid.__init__, which connects
        self.script = script
        self.pulls = 0

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return [f"id{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        batch = self.script[self.pulls] if self.pulls < len(self.script) else []
        self.pulls += 1
        out = []
        for mid in batch:
            m = Message(RecordDict(), dst_node_id=1, message_type="query")
            m.metadata.__dict__["_reply_to_message_id"] = mid
            out.append(m)
        return out


@pytest.mark.usefixtures("task_identity")
def test_send_and_receive_polls_fast_after_each_reply_and_slower_between(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(meteredgrid.time, "sleep", waits.append)
    inner = _ScriptedGrid([[], [], [], ["id0"], [], ["id1"]])
    grid = MeteredGrid(inner, poll_interval_s=0.2, max_poll_interval_s=1.0)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in (1, 2)]
    replies = list(grid.send_and_receive(msgs, timeout=None))
    assert sorted(m.metadata.reply_to_message_id for m in replies) == ["id0", "id1"]
    assert inner.pulls == 6  # stops at the last reply
    assert [round(w, 4) for w in waits] == [0.3, 0.45, 0.675, 0.2, 0.3]


def test_the_default_polls_see_a_short_exchanges_reply_within_a_quarter_second() -> None:
    """The plan's evaluation exchanges take about 0.5 s at a site; training rounds seconds."""
    grid = MeteredGrid(_ScriptedGrid([]))
    w, t, polls = grid.poll_interval_s, 0.0, [0.0]
    while t < 10:
        w = next_poll_interval(w, False, grid.poll_interval_s, grid.max_poll_interval_s)
        t += w
        polls.append(t)
    for reply_at, lag in ((0.3, 0.25), (0.5, 0.25), (0.8, 0.25), (1.5, 0.5), (6.0, 0.5)):
        seen = min(p for p in polls if p >= reply_at)
        assert seen - reply_at <= lag, (reply_at, seen)
    late = [b - a for a, b in itertools.pairwise(polls) if a >= 2]
    assert late and all(g == pytest.approx(grid.max_poll_interval_s) for g in late)  # a long round: 2 polls a second
    assert grid.max_poll_interval_s == 0.5
