"""Flower's object pulls retried sooner (``common.objectpull``): the retry waits, on the modules that pull."""

from __future__ import annotations

import functools
import importlib
import threading
from types import ModuleType
from typing import ClassVar

import flwr
import pytest
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects

from common.objectpull import (
    PULL_BACKOFF_CAP_S,
    PULL_BACKOFF_S,
    SERVERAPP_MODULE,
    SUPERNODE_MODULE,
    prompt_object_pulls,
)

MODULES = (SUPERNODE_MODULE, SERVERAPP_MODULE)


def _module(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    module = importlib.import_module(name)
    monkeypatch.setattr(module, "pull_objects", pull_objects)  # Flower's own, restored after the test
    return module


class RecordingEvent(threading.Event):
    """``pull_objects`` sleeps between tries by waiting on its stop event: record how long, wait none."""

    waits: ClassVar[list[float]] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            RecordingEvent.waits.append(timeout)
        return super().wait(0)


def _waits_while_an_object_uploads(pull: functools.partial[dict[str, bytes]] | object) -> list[float]:
    tries = {"n": 0}

    def pull_one(object_id: str) -> bytes:
        tries["n"] += 1
        if tries["n"] <= 3:  # three tries while it still uploads behind its message
            raise ObjectUnavailableError(object_id)
        return b"chunk"

    RecordingEvent.waits = []
    assert callable(pull)
    assert pull(["obj"], pull_object_fn=pull_one) == {"obj": b"chunk"}
    return list(RecordingEvent.waits)


@pytest.mark.parametrize("name", MODULES)
def test_the_pulls_of_supernode_and_serverapp_retry_within_tenths_of_a_second(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = _module(name, monkeypatch)
    monkeypatch.setattr(threading, "Event", RecordingEvent)
    stock = _waits_while_an_object_uploads(module.pull_objects)
    assert len(stock) == 3 and stock[0] >= 0.8 and stock[2] >= 3.2  # Flower's: 1, 2, 4 s (+-20%)
    assert prompt_object_pulls(name)
    prompt = module.pull_objects
    assert isinstance(prompt, functools.partial) and prompt.func is pull_objects
    waits = _waits_while_an_object_uploads(prompt)
    assert len(waits) == 3 and all(w <= PULL_BACKOFF_CAP_S * 1.2 for w in waits)
    assert PULL_BACKOFF_S * 0.8 <= waits[0] <= PULL_BACKOFF_S * 1.2
    assert prompt_object_pulls(name) and module.pull_objects is prompt  # a second call wraps nothing twice


def test_an_unchecked_flower_keeps_its_own_pulls(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    module = _module(SUPERNODE_MODULE, monkeypatch)
    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    assert not prompt_object_pulls(SUPERNODE_MODULE)
    assert module.pull_objects is pull_objects and "not checked" in caplog.text
