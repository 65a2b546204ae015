"""common.heap: collection paused around a process's big imports, the result frozen, the setting restored."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from common.heap import imports_frozen


@pytest.fixture(autouse=True)
def _restore_collector() -> Iterator[None]:
    enabled = gc.isenabled()
    yield
    gc.unfreeze()  # the test process's objects go back to the collector
    if enabled:
        gc.enable()
    else:
        gc.disable()


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_paused_inside_frozen_after_and_enabled_again() -> None:
    gc.enable()
    gc.unfreeze()
    with imports_frozen():
        assert not gc.isenabled()
        made = Node()
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
    assert not any(o is made for o in gc.get_objects())  # frozen: no generation a collection visits holds it


def test_a_disabled_collector_stays_disabled() -> None:
    gc.disable()
    with imports_frozen():
        pass
    assert not gc.isenabled()


def test_a_failed_import_still_restores_the_collector() -> None:
    gc.enable()
    with pytest.raises(ImportError), imports_frozen():
        import common.no_such_module  # type: ignore[import-not-found]  # noqa: F401
    assert gc.isenabled()


def test_cycles_made_after_the_freeze_are_still_collected() -> None:
    gc.enable()
    with imports_frozen():
        pass
    a, b = Node(), Node()
    a.other, b.other = b, a
    del a, b
    assert gc.collect() >= 2
