"""The warm SuperExec's own parts; its work with a real SuperNode is in tests/test_deployment.py."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from client.node import supernode_command, warm_command
from client.warm import preload, reap


def test_preload_imports_into_this_process() -> None:
    sys.modules.pop("colorsys", None)
    assert preload(("colorsys",)) >= 0.0
    assert "colorsys" in sys.modules


def test_reap_collects_finished_children_and_logs_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    children: set[int] = set()
    for code in (0, 3):
        pid = os.fork()
        if pid == 0:
            os._exit(code)
        children.add(pid)
    with caplog.at_level(logging.WARNING, logger="flower-client.warm"):
        for _ in range(200):
            reap(children)
            if not children:
                break
            time.sleep(0.01)
    assert not children
    assert [r.message for r in caplog.records if "exited with 3" in r.message]


def test_the_supernode_leaves_the_clientapp_processes_to_the_warm_superexec(tmp_path: Path) -> None:
    cmd = supernode_command(
        site="c1",
        data_dir=tmp_path,
        out_dir=tmp_path,
        server="127.0.0.1:9092",
        root_cert=None,
        threads=1,
        port=9555,
    )
    assert cmd[cmd.index("--isolation") + 1] == "process" and cmd[cmd.index("--port") + 1] == "9555"
    warm = warm_command(9555, 1234, "a" * 64)
    assert warm[1:3] == ["-m", "client.warm"]
    assert warm[warm.index("--approved-app") + 1] == "a" * 64
    assert warm[warm.index("--runtime-api-address") + 1] == "127.0.0.1:9555"
    assert warm[warm.index("--parent-pid") + 1] == "1234"
