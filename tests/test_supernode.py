"""The SuperNode entry point's polling change; its work with a real SuperLink is in tests/test_deployment.py."""

from __future__ import annotations

import time
from pathlib import Path

import flwr
import flwr.supernode.start_client_internal as loop
import pytest

from client.node import supernode_command
from client.supernode import (
    LOCAL_WAIT_S,
    RECONNECT_MAX_S,
    PollingClock,
    cap_reconnect_backoff,
    shorten_polling,
    split_args,
)


def test_the_clock_cuts_every_wait_to_the_poll_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(time, "sleep", waits.append)
    clock = PollingClock(0.2)
    clock.sleep(3)  # Flower's idle pause between pulls from the SuperLink
    clock.sleep(0.5)  # its wait on its own state for the ClientApp's reply
    clock.sleep(0.01)
    assert waits == [0.2, LOCAL_WAIT_S, 0.01]
    assert LOCAL_WAIT_S < 0.2
    assert clock.monotonic is time.monotonic and clock.time is time.time  # the rest is the real module


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_the_clock_refuses_a_poll_interval_that_is_not_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="poll interval"):
        PollingClock(bad)


def test_the_poll_interval_is_ours_and_everything_else_goes_to_flower() -> None:
    assert split_args(["--superlink", "h:1", "--insecure"]) == (0.2, ["--superlink", "h:1", "--insecure"])
    assert split_args(["--poll-interval", "0.5", "--superlink", "h:1"]) == (0.5, ["--superlink", "h:1"])
    assert split_args(["--superlink", "h:1", "--poll-interval=1"]) == (1.0, ["--superlink", "h:1"])


@pytest.mark.parametrize(
    "argv",
    [["--poll-interval"], ["--poll-interval", "fast"], ["--poll-interval", "0"], ["--poll-interval=-1"], ["--poll-interval", "5"]],
)
def test_a_bad_poll_interval_stops_before_flower_starts(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="poll-interval"):
        split_args(argv)


def test_flowers_supernode_loop_polls_faster_on_the_checked_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "time", time)  # undone after the test
    assert shorten_polling(0.25)
    assert isinstance(loop.time, PollingClock) and loop.time.poll_s == 0.25


def test_an_unchecked_flower_version_runs_the_stock_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    assert not shorten_polling(0.2)
    assert loop.time is time
    assert "not checked" in caplog.text


def test_reconnect_backoff_stops_growing_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's backoff reaches 20 s; capped, a SuperNode waiting for a (re)started server tries every 2 s."""
    import flwr.supercore.retry.grpc_retry as grpc_retry
    import flwr.supercore.retry.http_retry as http_retry

    for module in (http_retry, grpc_retry):
        monkeypatch.setattr(module, "MAX_RETRY_DELAY", module.MAX_RETRY_DELAY)  # restored after the test
    waits = http_retry.make_simple_http_retry_invoker().wait_gen_factory()
    assert max(next(waits) for _ in range(12)) > RECONNECT_MAX_S  # the stock backoff
    assert sorted(cap_reconnect_backoff()) == sorted([http_retry.__name__, grpc_retry.__name__])
    waits = http_retry.make_simple_http_retry_invoker().wait_gen_factory()
    assert max(next(waits) for _ in range(12)) == RECONNECT_MAX_S
    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    assert cap_reconnect_backoff() == []  # an unchecked Flower is left as it is


def test_flower_client_starts_this_supernode(tmp_path: Path) -> None:
    cmd = supernode_command(
        site="c1", data_dir=tmp_path, out_dir=tmp_path, server="127.0.0.1:9092", root_cert=None, threads=1, port=9555
    )
    assert cmd[1:3] == ["-m", "client.supernode"]
    assert "--poll-interval" not in cmd  # the default interval; everything after is Flower's own arguments
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:9092"
