"""The ServerApp runtimes' exit flush (``server.exitflush``): the same wait for the log queue, 0.2 s not 1 s after."""

from __future__ import annotations

import importlib
import time
from queue import Queue

import flwr
import pytest
from flwr.supercore.logger import flush_logs

from server import exitflush
from server.exitflush import RUNTIME_MODULES, SETTLE_S, prompt_exit_flush, prompt_flush


def _slept(monkeypatch: pytest.MonkeyPatch, module: object) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(module, "time", _Clock(waits))
    return waits


class _Clock:
    """``time`` whose ``sleep`` records instead of waiting (the monotonic clock is the real one)."""

    def __init__(self, waits: list[float]) -> None:
        self.waits = waits

    def sleep(self, s: float) -> None:
        self.waits.append(s)

    def monotonic(self) -> float:
        return time.monotonic()


def test_flowers_flush_waits_a_whole_second_after_the_queue_empties(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supercore.logger as flogger

    waits = _slept(monkeypatch, flogger)
    assert flush_logs(Queue())
    assert waits == [1]  # the wait this module removes (the uploader's push is milliseconds on loopback)


def test_the_prompt_flush_waits_for_the_queue_then_one_upload_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    q: Queue[str | None] = Queue()
    q.put("last line")
    waits: list[float] = []

    class Uploader(_Clock):  # the uploader takes the line while the flush waits
        def sleep(self, s: float) -> None:
            super().sleep(s)
            if not q.empty():
                q.get_nowait()

    monkeypatch.setattr(exitflush, "time", Uploader(waits))
    assert prompt_flush(q)
    assert q.empty() and waits[-1] == SETTLE_S and sum(waits) < 0.5


def test_a_queue_that_never_drains_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    q: Queue[str | None] = Queue()
    q.put("stuck")
    assert not prompt_flush(q, timeout=0.05)


@pytest.fixture
def runtimes(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Both runtime modules loaded, each with Flower's own flush (restored after the test)."""
    modules = [importlib.import_module(name) for name in RUNTIME_MODULES]
    for module in modules:
        monkeypatch.setattr(module, "flush_logs", flush_logs)
    return modules


def test_the_loaded_runtimes_get_the_prompt_flush_once(runtimes: list[object]) -> None:
    assert prompt_exit_flush() == list(RUNTIME_MODULES)
    assert all(m.flush_logs is prompt_flush for m in runtimes)  # type: ignore[attr-defined]
    assert prompt_exit_flush() == list(RUNTIME_MODULES)  # a second call changes nothing


def test_an_unchecked_flower_keeps_its_flush(
    runtimes: list[object], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    assert prompt_exit_flush() == []
    assert all(m.flush_logs is flush_logs for m in runtimes) and "not checked" in caplog.text  # type: ignore[attr-defined]


def test_a_runtime_not_loaded_is_not_imported(runtimes: list[object], monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.delitem(sys.modules, RUNTIME_MODULES[1])  # a deployment never loads the simulation's runtime
    assert prompt_exit_flush() == [RUNTIME_MODULES[0]]
    assert RUNTIME_MODULES[1] not in sys.modules
