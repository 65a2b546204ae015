"""The warm SuperExec's own parts; its work with a real SuperNode is in tests/test_deployment.py."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from client.node import supernode_command, warm_command
from client.warm import preload, preload_client_app, reap, wait_for_exit


def test_preload_imports_into_this_process() -> None:
    sys.modules.pop("colorsys", None)
    assert preload(("colorsys",)) >= 0.0
    assert "colorsys" in sys.modules


def test_a_client_app_that_does_not_import_is_reported_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="flower-client.warm"):
        assert not preload_client_app("client.no_such_module")
    assert any("client.no_such_module does not import" in r.getMessage() for r in caplog.records)
    assert preload_client_app("client.approval")


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


def test_waiting_on_a_working_child_ends_when_it_exits_or_at_the_timeout() -> None:
    """While a ClientApp works the SuperExec waits on it instead of polling the SuperNode."""
    quick, slow = os.fork(), -1
    if quick == 0:
        time.sleep(0.3)
        os._exit(0)
    try:
        t0 = time.monotonic()
        wait_for_exit({quick}, timeout_s=60.0)
        assert time.monotonic() - t0 < 30.0  # woke at the exit, not at the timeout
        os.waitpid(quick, 0)
        slow = os.fork()
        if slow == 0:
            time.sleep(60)
            os._exit(0)
        t0 = time.monotonic()
        wait_for_exit({slow}, timeout_s=0.2)
        assert time.monotonic() - t0 >= 0.15  # still working: the wait ran its course
        wait_for_exit({quick}, timeout_s=60.0)  # already reaped (no such process): returns at once
    finally:
        if slow > 0:
            os.kill(slow, 9)
            os.waitpid(slow, 0)


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


def _script(tmp_path: Path, name: str, body: str) -> list[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return [sys.executable, str(path)]


def test_one_superexec_serves_every_supernode_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A hospital's SuperNode that loses the server is restarted; its SuperExec (the imports) is not."""
    from client.node import supervise

    starts = tmp_path / "starts"
    node = _script(tmp_path, "node", "import time; time.sleep(0.3)")  # loses the server at once, every time
    warm = _script(tmp_path, "warm", f"open({str(starts)!r}, 'a').write('x'); import time; time.sleep(60)")
    rc = supervise(node, warm, dict(os.environ), time.monotonic() + 2.5, "c1", retry_s=0.5, check_s=0.1)
    assert rc == 1  # gave up once --max-wait was over (the SuperNode's own code was 0)
    out = capsys.readouterr()
    assert out.out.count("rejoining in") >= 2 and "giving up" in out.err
    assert starts.read_text() == "x"  # started once for three SuperNodes, and stopped at the end


def test_a_superexec_that_dies_is_started_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from client.node import supervise

    starts = tmp_path / "starts"
    node = _script(tmp_path, "node", "import time; time.sleep(1.5)")
    warm = _script(tmp_path, "warm", f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)")
    supervise(node, warm, dict(os.environ), time.monotonic(), "c1", retry_s=0.1, check_s=0.1)
    assert len(starts.read_text()) >= 3
    assert "c1: the SuperExec exited with code 3; starting it again" in capsys.readouterr().out
