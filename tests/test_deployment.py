"""A real deployment on loopback: `flower-server` and three `flower-client` processes over TLS.

Real Flower SuperLink/SuperNode processes, real HTTPS with a throwaway CA
made here, SuperNode authentication with the three hospitals' keys
enrolled, a tiny model, two rounds, one fold, end to end.  A fourth client
with an unenrolled key must be refused.  The test fails if any process it
started, at any depth, is still running afterwards (``loopback`` fixture).
Crashes, restarts and a bad site: ``test_fault_tolerance.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.loopback import Loopback, tiny_experiment

RUN_S = 1200.0  # generous: two busy cores can make this a 10-minute run
pytestmark = [pytest.mark.deployment, pytest.mark.timeout(RUN_S + 300)]


def test_tls_deployment_server_and_three_hospitals(loopback: Loopback, tiny_cohort: Path) -> None:
    lb = loopback
    sites = ["centre1", "centre2", "centre3"]
    lb.keygen(*sites)
    lb.keygen("intruder", enroll=False)
    run_dir = lb.root / "run"
    cfg = lb.write_config(tiny_experiment(sites, rounds=2, round_timeout_s=240.0))
    lb.server(cfg, run_dir, "--run-timeout", str(RUN_S), discovery_s=120)
    for site in sites:
        lb.client(site, tiny_cohort / site)
    lb.client("intruder", tiny_cohort / "centre3")
    summary = lb.finished(run_dir, RUN_S + 60)

    assert set(summary["sites"]) == set(sites)
    # the unenrolled hospital was refused at every attempt and never took part
    assert "Failed to activate SuperNode" in lb.log("intruder")
    assert "intruder" not in json.dumps(summary)
    assert not (lb.site_out("intruder") / run_dir.name).exists()
    assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] > 0
    rounds = summary["rounds"]["densenet3d/fold0"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["trained"]) == sites for r in rounds)
    assert all(summary["communication"][s]["bytes_sent"] > 0 for s in summary["sites"])
    assert all(summary["communication"][s]["by_message_type"]["train"]["messages"] == 2 for s in sites)
    # every message ran in a fork of the site's warm SuperExec (client.warm), not a fresh interpreter
    assert all("ClientApp process" in lb.log(s) for s in sites)
    # per-patient predictions stay at each site
    assert (lb.site_out("centre1") / run_dir.name / "predictions" / "densenet3d_fold0.csv").is_file()
    assert not list(run_dir.rglob("predictions"))
