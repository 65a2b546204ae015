"""Zero trust on the real network path: real flower-server / flower-client / flwr processes on loopback.

An outsider holding only the federation's public ``ca.crt``, with its own
``flwr`` configuration pointing at the server's public port, tries the four
control actions that were all accepted before (register a node key, list
nodes, list runs, start a run of its own app): none may succeed, whether
hospitals are enrolled or the server runs with open enrolment.  The same
``flwr`` calls made by the coordinating site over its loopback connection do
succeed, so the probe can tell the difference.  Then one run with an enrolled
hospital training normally beside an unenrolled node, a node using another
site's enrolled key under a name not its own, and an enrolled hospital pinned
to another app digest: only the first takes part.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common.processes import flower_env
from tests.loopback import BIN, Loopback, tiny_experiment, wait_for

RUN_S = 1200.0
pytestmark = [pytest.mark.deployment, pytest.mark.slow, pytest.mark.timeout(RUN_S + 300)]

OUTSIDER_APP = {
    "pyproject.toml": """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "outsider"
version = "1.0.0"
description = "code that must never run at the coordinating site"
license = "Apache-2.0"
dependencies = ["flwr>=1.42"]

[tool.flwr.app]
publisher = "outsider"

[tool.flwr.app.components]
serverapp = "outsider_app:server"
clientapp = "outsider_app:client"

[tool.flwr.app.config]
marker = ""
""",
    "outsider_app.py": """from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid, context):
    Path(str(context.run_config["marker"])).write_text("the outsider's code ran on the server")
""",
}


def flwr_json(home: Path, *argv: str) -> dict[str, Any]:
    """One ``flwr ... --format json`` call; its JSON answer (``flwr`` exits 0 even when the call failed)."""
    res = subprocess.run(
        [str(BIN / "flwr"), *argv, "--format", "json"],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=180,
    )
    start = res.stdout.find("{")
    assert start >= 0, (
        f"flwr {argv[0]}: no JSON answer (exit {res.returncode}): {res.stdout[-500:]} {res.stderr[-500:]}"
    )
    answer: dict[str, Any] = json.loads(res.stdout[start:])
    return answer


def control_attempts(
    home: Path, connection: str, key: Path, app: Path, marker: Path
) -> dict[str, dict[str, Any]]:
    """The four control actions against ``connection`` in ``home``'s flwr configuration."""
    return {
        "register a node key": flwr_json(home, "supernode", "register", str(key), connection),
        "list nodes": flwr_json(home, "supernode", "list", connection),
        "list runs": flwr_json(home, "ls", connection),
        "start a run": flwr_json(home, "run", str(app), connection, "--run-config", f'marker="{marker}"'),
    }


@pytest.mark.parametrize("enrolment", ["enrolled hospitals", "open enrolment"])
def test_an_outsider_with_only_the_ca_certificate_can_do_nothing(
    loopback: Loopback, tiny_cohort: Path, enrolment: str
) -> None:
    lb = loopback
    lb.keygen("centre1", "centre2")
    lb.keygen("outsider", enroll=False)
    run_dir = lb.root / "run"
    cfg = lb.write_config(tiny_experiment(["centre1", "centre2"], rounds=1, round_timeout_s=60.0))
    lb.server(cfg, run_dir, expected=2, discovery_s=900, enrol=enrolment == "enrolled hospitals")
    own = run_dir / "flower"
    wait_for(
        "the server's run started", lambda: "Successfully started run" in _read(run_dir / "flower.log"), 300
    )

    outsider = lb.root / "outsider-home"  # another user's home: only ca.crt and its own key and app
    app = outsider / "app"
    app.mkdir(parents=True)
    for name, text in OUTSIDER_APP.items():
        (app / name).write_text(text)
    (outsider / "ca.crt").write_bytes((lb.certs / "ca.crt").read_bytes())
    (outsider / "config.toml").write_text(
        f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "127.0.0.1:{lb.port}"\n'
        f'root-certificates = "{outsider / "ca.crt"}"\n'
    )
    marker = lb.root / "OUTSIDER-CODE-RAN"
    results = control_attempts(outsider, "target", lb.keys / "outsider.pub", app, marker)
    accepted = [action for action, r in results.items() if r.get("success") is not False]
    assert accepted == [], f"accepted for the outsider: {accepted}: {results}"
    for action, r in results.items():
        assert "404" in r.get("error-message", ""), f"{action}: {r}"  # refused by the proxy, not by chance
    assert not marker.exists()

    # the coordinating site itself, over its loopback connection to the SuperLink, is served
    runs = flwr_json(own, "ls", "federation")
    assert runs.get("success") is True and len(runs["runs"]) == 1, (
        runs
    )  # only its own run; none of the outsider's
    nodes = flwr_json(own, "supernode", "list", "federation")
    assert nodes.get("success") is True
    assert len(nodes["nodes"]) == (2 if enrolment == "enrolled hospitals" else 0), nodes  # no outsider key
    access = (own / "proxy" / "access.log").read_text()
    for path in ("register-node", "list-nodes", "list-runs", "start-run"):
        assert re.search(rf'"POST /v1/control/{path} HTTP/1.1" 404 ', access), (
            f"{path} not refused at the proxy"
        )
    if enrolment == "open enrolment":
        assert "--open-enrolment: any node may join" in lb.log("server")


def test_only_enrolled_hospitals_under_their_own_names_running_the_approved_app(
    loopback: Loopback, tiny_cohort: Path
) -> None:
    lb = loopback
    lb.keygen("centre1", "centre2", "centre3")
    lb.keygen("intruder", enroll=False)
    run_dir = lb.root / "run"
    cfg = lb.write_config(
        tiny_experiment(["centre1", "centre2"], rounds=1, round_timeout_s=300.0, min_sites=1)
    )
    lb.server(cfg, run_dir, "--run-timeout", str(RUN_S), expected=3, discovery_s=300)
    lb.client("centre1", tiny_cohort / "centre1")  # enrolled, its own name, the approved app: trains
    lb.client("centre2", tiny_cohort / "centre2", "--approve-app", "0" * 64)  # pinned to another app
    lb.client(
        "centre1", tiny_cohort / "centre3", key="centre3", role="impostor"
    )  # centre3's key, centre1's name
    lb.client("centre3", tiny_cohort / "centre3", key="intruder", role="intruder")  # a key never enrolled
    summary = lb.finished(run_dir, RUN_S + 60)

    assert set(summary["sites"]) == {"centre1"}
    rounds = summary["rounds"]["densenet3d/fold0"]
    assert [r["trained"] for r in rounds] == [["centre1"]], rounds
    assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] > 0
    flower_log = (run_dir / "flower.log").read_text(errors="replace")
    assert re.search(
        r"refused node \d+ claiming site centre1: its key is enrolled for site centre3, not centre1",
        flower_log,
    )
    assert "Failed to activate SuperNode" in lb.log("intruder")
    assert "app not approved at this site" in lb.log("centre2")  # the hospital says why ...
    assert "app not approved at this site" in flower_log  # ... and so does the reply the server logged
    assert not (lb.site_out("centre2") / run_dir.name).exists()  # nothing of the run executed there
    assert (lb.site_out("centre1") / run_dir.name / "predictions" / "densenet3d_fold0.csv").is_file()


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""
