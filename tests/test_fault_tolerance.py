"""Fault tolerance with real processes on loopback: a hospital crashing, the server crashing, a bad site.

Each test runs the project's own ``flower-server`` and ``flower-client``
commands over TLS with enrolled hospital keys (``tests/loopback.py``), on the
tiny 3D model for one fold, and fails if any process it started is still
running at the end.  A crash is simulated as a machine or container going
down: every process of that party gets SIGKILL at once, nothing cleans up.
A few minutes each on two busy cores, hence ``slow`` (CI runs them with
``make test-slow``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.loopback import Loopback, tiny_experiment, wait_for

RUN_S = 1200.0  # one whole run, generous: these tests check behaviour, not speed, on shared cores
pytestmark = [pytest.mark.deployment, pytest.mark.slow, pytest.mark.timeout(3 * RUN_S)]
SITES = ["centre1", "centre2", "centre3"]


def test_hospital_killed_mid_round_is_left_out_and_rejoins(loopback: Loopback, tiny_cohort: Path) -> None:
    lb = loopback
    lb.keygen(*SITES)
    timeout_s = 180.0
    # Enough rounds after round 1 for the restarted hospital to be back (it starts its libraries
    # again, ~10-15 s here): a tiny round takes about a second, and the server does not wait for it.
    rounds = 24
    run_dir = lb.root / "run"
    lb.server(lb.write_config(tiny_experiment(SITES, rounds=rounds, round_timeout_s=timeout_s)), run_dir)
    for site in SITES:
        lb.client(site, tiny_cohort / site)
    flower_log = run_dir / "flower.log"
    wait_for(
        "round 1 training started",
        lambda: (
            flower_log.is_file()
            and f"round 1/{rounds}] training at centre1, centre2, centre3" in flower_log.read_text()
        ),
        RUN_S,
    )
    # The hospital's machine goes down while it trains.  A tiny round takes about a second, so
    # centre3 may already have answered round 1 when the kill lands: the round it misses is the
    # first one it cannot answer, found from the log rather than assumed to be round 1.
    lb.crash("centre3")
    left_out = re.compile(r"\[round (\d+)\] (?:no reply from centre3|centre3 (?:dropped|unavailable|not connected))")
    wait_for(
        "a round finished without centre3",
        lambda: left_out.search(flower_log.read_text(errors="replace")) is not None,
        2 * timeout_s + 60,
    )
    found = left_out.search(flower_log.read_text(errors="replace"))
    assert found is not None
    lb.client("centre3", tiny_cohort / "centre3")  # back up: the hospital restarts its container
    summary = lb.finished(run_dir, RUN_S)

    logged = summary["rounds"]["densenet3d/fold0"]
    assert [r["round"] for r in logged] == list(range(1, rounds + 1))
    missed = next(i for i, r in enumerate(logged) if "centre3" not in r["trained"])
    assert logged[missed]["round"] == int(found.group(1)), logged[: missed + 1]  # the log and summary agree
    assert all("centre3" in r["trained"] for r in logged[:missed])  # alive until the kill
    first = logged[missed]
    assert sorted(first["trained"]) == ["centre1", "centre2"]
    assert "centre3" in first["missing"] or "centre3" in first["dropped"], first  # recorded, with why
    assert first["seconds"] < 2 * timeout_s  # train and evaluate each wait at most the round timeout
    assert "centre3" in logged[-1]["trained"], logged  # it rejoined for a later round
    assert set(summary["sites"]) == set(SITES)
    # the rejoined site predicted its fold-0 test patients: 10 per site
    assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] == 30
    assert all({"centre1", "centre2"} <= set(r["trained"]) for r in logged)  # the others never missed one
    assert "node-" not in json.dumps(logged)  # every absence is put down to its site


def test_server_killed_mid_run_resumes_from_its_last_round(loopback: Loopback, tiny_cohort: Path) -> None:
    lb = loopback
    sites = SITES[:2]
    lb.keygen(*sites)
    run_dir = lb.root / "run"
    cfg = lb.write_config(tiny_experiment(sites, rounds=3, round_timeout_s=180.0))
    lb.server(cfg, run_dir, expected=2)
    for site in sites:
        lb.client(site, tiny_cohort / site)
    ckpt = run_dir / "checkpoints" / "densenet3d_fold0"
    wait_for("round 1 checkpoint", lambda: (ckpt / "round1.npz").is_file(), RUN_S)
    lb.crash("server")  # the coordinating site goes down mid-run
    client_logs = {site: len(lb.log(site)) for site in sites}
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.glob("round*.npz")}
    assert not (run_dir / "summary.json").exists() and len(before) < 3
    log_offset = (run_dir / "flower.log").stat().st_size

    lb.server(cfg, run_dir, expected=2)  # the operator starts the same command again
    summary = lb.finished(run_dir, RUN_S)

    done = len(before)
    after = {p.name: p.stat().st_mtime_ns for p in ckpt.glob("round*.npz")}
    assert sorted(after) == ["round1.npz", "round2.npz", "round3.npz"]
    assert all(after[name] == mtime for name, mtime in before.items()), "a finished round was redone"
    resumed_log = (run_dir / "flower.log").read_text(errors="replace")[log_offset:]
    assert f"resuming after round {done} of 3" in resumed_log
    trained = [int(m) for m in re.findall(r"round (\d+)/3\] training at", resumed_log)]
    assert trained == list(range(done + 1, 4)), trained  # only the rounds not finished before the crash
    assert summary["resumed"] == {"densenet3d/fold0": done}
    rounds = summary["rounds"]["densenet3d/fold0"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(sorted(r["trained"]) == sites for r in rounds)  # both hospitals rejoined by themselves
    for site in sites:  # the hospitals' SuperNodes lost the server and were restarted by flower-client
        assert "rejoining in 10 s" in lb.log(site)[client_logs[site] :]
        # one warm SuperExec served both SuperNodes: the libraries were imported once (client/warm.py)
        assert lb.log(site).count("preloaded ") == 1, site
    assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] == 20


def test_site_with_invalid_data_is_reported_and_excluded(
    loopback: Loopback, tiny_cohort: Path, tmp_path: Path
) -> None:
    lb = loopback
    lb.keygen(*SITES)
    bad = tmp_path / "centre3-corrupt"
    shutil.copytree(tiny_cohort / "centre3", bad)
    for image in (bad / "images").iterdir():
        image.write_bytes(b"\x1f\x8b truncated export")  # every CT unreadable
    patient_ids = [line.split(",")[0] for line in (bad / "manifest.csv").read_text().splitlines()[1:]]
    run_dir = lb.root / "run"
    lb.server(lb.write_config(tiny_experiment(SITES, rounds=1, round_timeout_s=180.0)), run_dir)
    lb.client("centre1", tiny_cohort / "centre1")
    lb.client("centre2", tiny_cohort / "centre2")
    lb.client("centre3", bad)
    summary = lb.finished(run_dir, RUN_S)

    reason = summary["unavailable_sites"]["centre3"]
    assert reason.startswith("site data failed validation: 0 of 20 patients usable"), reason
    assert "corrupt_nifti x20" in reason, reason
    text = json.dumps(summary) + (run_dir / "flower.log").read_text(errors="replace")
    assert not any(pid in text for pid in patient_ids)  # no patient detail reached the server
    assert str(bad) not in text
    assert set(summary["sites"]) == {"centre1", "centre2"}
    assert all(sorted(r["trained"]) == ["centre1", "centre2"] for r in summary["rounds"]["densenet3d/fold0"])
    assert summary["models"]["densenet3d"]["internal"]["pooled"]["n"] == 20
    assert "report-only mode" in lb.log("centre3")  # the hospital is told too, with the details
    assert patient_ids[0] in lb.log("centre3")


def test_server_exits_nonzero_when_fewer_sites_than_min_sites_join(
    loopback: Loopback, tiny_cohort: Path
) -> None:
    lb = loopback
    lb.keygen("centre1", "centre2")
    run_dir = lb.root / "run"
    cfg = lb.write_config(
        tiny_experiment(["centre1", "centre2"], rounds=1, round_timeout_s=120.0, min_sites=2)
    )
    lb.server(cfg, run_dir, expected=2, discovery_s=20)
    lb.client("centre1", tiny_cohort / "centre1")  # centre2 never comes
    rc = lb.wait("server", 300)
    assert rc is not None and rc != 0, f"flower-server exit code {rc}"
    out = lb.log("server")  # what the operator sees: that it failed, and why
    assert "error: the run failed" in out
    assert (
        "cause: server.strategy.FederationError: 1 training site(s) available (centre1), federation.min_sites is 2"
        in out
    )
    assert not (run_dir / "summary.json").exists()
