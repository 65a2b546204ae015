"""The one version gate for the Flower internals this project replaces (``common.flowerpatch``)."""

from __future__ import annotations

from types import ModuleType

import flwr
import pytest

from common.flowerpatch import flower_checked, replace_checked


def _stock() -> str:
    return "flower's"


def _ours() -> str:
    return "ours"


def _module() -> ModuleType:
    m = ModuleType("fake_flower_module")
    m.wait = _stock  # type: ignore[attr-defined]
    return m


def test_the_stock_attribute_is_replaced_once_on_a_checked_flower() -> None:
    assert flower_checked()  # the installed, pinned Flower is the one that was read
    m = _module()
    assert replace_checked(m, "wait", _stock, _ours, "left as is")
    assert m.wait is _ours
    assert replace_checked(m, "wait", _stock, _ours, "left as is") and m.wait is _ours  # a second call changes nothing


def test_an_unchecked_flower_or_a_foreign_attribute_is_left_alone(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m = _module()
    monkeypatch.setattr(flwr, "__version__", "1.99.0")
    assert not flower_checked()
    assert not replace_checked(m, "wait", _stock, _ours, "stays Flower's") and m.wait is _stock
    monkeypatch.undo()

    def someone_elses() -> str:
        return "theirs"

    m.wait = someone_elses  # type: ignore[attr-defined]
    assert not replace_checked(m, "wait", _stock, _ours, "stays Flower's") and m.wait is someone_elses
    assert caplog.text.count("was not checked; stays Flower's") == 2
