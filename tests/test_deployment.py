"""A real deployment on loopback: `flower-server` and three `flower-client` processes over TLS.

Real Flower SuperLink/SuperNode processes, real HTTPS with a throwaway CA
made here, SuperNode authentication with the three hospitals' keys
enrolled, a tiny model, two rounds, one fold, end to end.  A fourth client
with an unenrolled key must be refused.  The test fails if any process it
started is still running afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from client.keys import make_keypair
from common.processes import free_port
from server.certs import make_certificates

pytestmark = pytest.mark.deployment
BIN = Path(sys.executable).parent


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


def test_tls_deployment_server_and_three_hospitals(tiny_cohort: Path, tmp_path: Path) -> None:
    cohort = tiny_cohort
    certs = tmp_path / "certs"
    make_certificates(certs)
    enrolled, keys = tmp_path / "enrolled", tmp_path / "keys"
    enrolled.mkdir()
    for i in (1, 2, 3):
        _, pub = make_keypair(keys, f"centre{i}")
        (enrolled / pub.name).write_bytes(pub.read_bytes())
    make_keypair(keys, "intruder")
    cfg = yaml.safe_load(Path("common/presets/tiny.yaml").read_text())
    cfg["models"]["densenet2d"]["enabled"] = False
    cfg["models"]["radiomics"] = False
    cfg["train"].update(rounds=2, local_epochs=1)
    cfg["run_folds"] = [0]
    cfg["federation"]["round_timeout_s"] = 240.0
    cfg["sites"] = [{"name": f"centre{i}"} for i in (1, 2, 3)]
    cfg_path = tmp_path / "experiment.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    port = free_port()
    run_dir = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = subprocess.Popen(
            [str(BIN / "flower-server"), "run", "--config", str(cfg_path), "--run-dir", str(run_dir),
             "--host", "127.0.0.1", "--port", str(port), "--certs", str(certs), "--enroll", str(enrolled), "--expected-sites", "3",
             "--discovery-timeout", "120", "--run-timeout", "540"],
            stdout=(logs / "server.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        procs.append(server)
        for i, name in ((1, "centre1"), (2, "centre2"), (3, "centre3"), (4, "intruder")):
            data = cohort / (name if i < 4 else "centre3")
            procs.append(
                subprocess.Popen(
                    [str(BIN / "flower-client"), "run", str(data), "--site", name, "--server", f"127.0.0.1:{port}",
                     "--root-cert", str(certs / "ca.crt"), "--auth-key", str(keys / name), "--out", str(tmp_path / f"site{i}")],
                    stdout=(logs / f"client{i}.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                )
            )
        try:
            rc = server.wait(timeout=600)
        except subprocess.TimeoutExpired:
            rc = -1
        server_log = (logs / "server.log").read_text()
        assert rc == 0, f"flower-server exited {rc}:\n{server_log[-3000:]}\n{(run_dir / 'flower.log').read_text()[-4000:] if (run_dir / 'flower.log').exists() else ''}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert set(summary["sites"]) == {"centre1", "centre2", "centre3"}
        # the unenrolled hospital was refused at every attempt and never took part
        assert "Failed to activate SuperNode" in (logs / "client4.log").read_text()
        assert "intruder" not in json.dumps(summary)
        assert not (tmp_path / "site4" / run_dir.name).exists()
        assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] > 0
        rounds = summary["rounds"]["densenet3d/fold0"]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(sorted(r["trained"]) == ["centre1", "centre2", "centre3"] for r in rounds)
        assert all(summary["communication"][s]["bytes_sent"] > 0 for s in summary["sites"])
        # per-patient predictions stay at each site
        assert (tmp_path / "site1" / run_dir.name / "predictions" / "densenet3d_fold0.csv").is_file()
        assert not list(run_dir.rglob("predictions"))
    finally:
        _stop(procs)
        left = [p.pid for p in procs if _alive(p.pid)]
        assert not left, f"process groups still running: {left}"
