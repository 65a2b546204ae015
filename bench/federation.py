"""Run one benchmark experiment three ways: plain loop, Flower simulation, loopback deployment.

All three read the same preprocessed arrays: every site is preprocessed
once into ``<cache>/<site>/cache`` (timed, reported apart), and the
federated runs start with that cache linked into their site folders, so
the comparison is training and federation, not preprocessing.  Each run is
timed from process start to exit by the caller, and its process tree's
memory is sampled meanwhile (:mod:`bench.proctree`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .proctree import TreeSampler

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class RunError(RuntimeError):
    """A benchmark run failed; the message names it and where its log is."""


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What the federated runs train: DenseNet121 3D at the quick preset's 32^3, one fold, ``rounds`` rounds."""

    rounds: int = 3
    folds_run: int = 1
    transport: str = "float32"
    threads: int = 1
    arch: str = "densenet121"

    def config(self, cohort_dir: Path, name: str) -> dict[str, Any]:
        """The experiment YAML (``base: quick``) for the sites of ``cohort_dir``."""
        from common.configfile import load_config

        info = json.loads((cohort_dir / "cohort.json").read_text())
        # the preset's selection window, inside the bench's rounds (quick's round 3 would refuse --rounds 2)
        select_from = min(load_config("quick").evaluation.select_from_round, self.rounds)
        return {
            "base": "quick",
            "name": name,
            "run_folds": list(range(self.folds_run)),
            "cohort": {
                "synthetic": True,
                "dir": str(cohort_dir),
                "scale": info["scale"],
                "seed": info["seed"],
            },
            "sites": [{"name": n, "data_dir": str(cohort_dir / d)} for n, d in info["sites"].items()],
            "models": {
                # the bench's own rounds, not the preset's per-network budget
                "densenet3d": {"enabled": True, "arch": self.arch, "rounds": 0, "select_from_round": 0},
                "densenet2d": {"enabled": False},
                "radiomics": False,
            },
            "train": {"rounds": self.rounds, "local_epochs": 1, "threads": self.threads},
            "evaluation": {"select_from_round": select_from},
            "federation": {"transport_dtype": self.transport},
        }

    def write(self, cohort_dir: Path, path: Path, name: str) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.config(cohort_dir, name), sort_keys=False))
        return path


def prepare_caches(config_path: Path, cache_root: Path) -> dict[str, Any]:
    """Check and preprocess every site once (cold unless done before); the seconds of each.

    The file check is ``flower-client run``'s own (``common.validation``), remembered in the memo
    it reads beside the cache: a hospital whose cases were preprocessed has had them checked.
    """
    from common.checkmemo import site_memo
    from common.configfile import load_config
    from common.dataset import preprocess_site
    from common.validation import validate_site

    cfg = load_config(config_path)
    out: dict[str, Any] = {"sites": {}}
    for s in cfg.sites:
        cache = cache_root / s.name / "cache"
        cold = not any(cache.glob("*.npz"))
        t0 = time.perf_counter()
        arrays = preprocess_site(Path(s.data_dir), cfg.preprocess, cache, site=s.name)
        t1 = time.perf_counter()
        preprocess_site(
            Path(s.data_dir), cfg.preprocess, cache, site=s.name
        )  # a warm load, as each message does
        t2 = time.perf_counter()
        # resolved, as flower-client run resolves it: the memo's keys hold the path
        validate_site(Path(s.data_dir).resolve(), memo=site_memo(cache_root / s.name))
        out["sites"][s.name] = {
            "patients": len(arrays),
            "cold": cold,
            "seconds": t1 - t0,
            "warm_load_s": t2 - t1,
            "check_s": time.perf_counter() - t2,
        }
    return out


def link_caches(cache_root: Path, sites: Sequence[str], site_out: Path) -> None:
    """Hard-link each site's warm cache into ``site_out/<site>/cache`` (where a site run looks), with a copy of its file-check memo."""
    from common.checkmemo import memo_path

    for name in sites:
        src, dest = cache_root / name / "cache", site_out / name / "cache"
        dest.mkdir(parents=True, exist_ok=True)
        for f in src.glob("*.npz"):
            if not (dest / f.name).exists():
                os.link(f, dest / f.name)
        memo = memo_path(cache_root / name)
        if memo.is_file():  # a copy: the run rewrites its own
            shutil.copyfile(memo, memo_path(site_out / name))


def fresh(folder: Path) -> None:
    """Remove what an interrupted attempt left in a run's folder (a finished run is memoised, not rerun)."""
    if folder.exists():
        shutil.rmtree(folder)


def _site_names(config_path: Path) -> list[str]:
    data = yaml.safe_load(config_path.read_text())
    return [s["name"] for s in data["sites"]]


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} not written)"


def run_plain(config_path: Path, cache_root: Path, threads: int, timeout_s: float) -> dict[str, Any]:
    """``python -m bench.plain`` in its own process: wall time from spawn to exit, and its own figures."""
    cmd = [
        sys.executable,
        "-m",
        "bench.plain",
        str(config_path),
        "--cache",
        str(cache_root),
        "--threads",
        str(threads),
    ]
    t0 = time.perf_counter()
    launched = time.time()
    with TreeSampler(interval_s=1.0) as mem:
        proc = subprocess.Popen(
            [*cmd, "--launched", repr(launched)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        mem.add(proc.pid, "run")
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RunError(f"plain loop: did not finish within {timeout_s:.0f} s") from None
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RunError(f"plain loop exited {proc.returncode}:\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["memory"] = mem.peak.to_dict()
    return result


def run_simulation(config_path: Path, cache_root: Path, run_dir: Path, timeout_s: float) -> dict[str, Any]:
    """``flower-simulation run`` on the experiment; wall time, memory and its ``summary.json``."""
    fresh(run_dir)
    link_caches(cache_root, _site_names(config_path), run_dir / "sites")
    cmd = [str(BIN / "flower-simulation"), "run", "--config", str(config_path), "--out", str(run_dir)]
    log_path = run_dir / "bench-simulation.log"
    t0 = time.perf_counter()
    with TreeSampler(interval_s=1.0) as mem, log_path.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        mem.add(proc.pid, "run")
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _stop([proc])
            raise RunError(f"simulation: did not finish within {timeout_s:.0f} s; see {log_path}") from None
        finally:
            _stop([proc])
    wall = time.perf_counter() - t0
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        raise RunError(f"simulation exited {rc}; see {log_path}:\n{_tail(log_path)}")
    return {
        "wall_s": wall,
        "memory": mem.peak.to_dict(),
        "summary": json.loads(summary_path.read_text()),
        "run_dir": str(run_dir),
    }


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    from common.processes import terminate_group

    for p in procs:
        terminate_group(p)


def _wait_ready(logs: Path, sites: Sequence[str], procs: Sequence[subprocess.Popen[bytes]], timeout_s: float) -> None:
    """Until every hospital's warm SuperExec has imported its libraries (its log says ``preloaded``)."""
    deadline = time.monotonic() + timeout_s
    waiting = list(sites)
    while waiting:
        waiting = [s for s in waiting if "flower-client.warm: preloaded" not in _tail(logs / f"{s}.log", 100_000)]
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise RunError(f"deployment: a hospital exited before the run: {dead}; see {logs}")
        if waiting and time.monotonic() > deadline:
            raise RunError(f"deployment: {', '.join(waiting)} not ready within {timeout_s:.0f} s; see {logs}")
        time.sleep(0.2)


def run_deployment(
    config_path: Path, cache_root: Path, work: Path, timeout_s: float, *, standing: bool = False
) -> dict[str, Any]:
    """``flower-server run`` (TLS) and one ``flower-client run`` per site on loopback, all real processes.

    ``standing``: the hospitals' ``flower-client run`` starts first, as a hospital keeps it running between
    runs, and the clock starts with ``flower-server run`` once every site has imported its libraries.
    Otherwise every process starts with the clock.
    """
    from common.processes import free_port
    from server.certs import make_certificates

    fresh(work)
    sites = _site_names(config_path)
    data = yaml.safe_load(config_path.read_text())
    dirs = {s["name"]: s["data_dir"] for s in data["sites"]}
    certs = work / "certs"
    make_certificates(certs)
    link_caches(cache_root, sites, work / "sites")
    run_dir, logs = work / "run", work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server_cmd = [
        str(BIN / "flower-server"),
        "run",
        "--config",
        str(config_path),
        "--run-dir",
        str(run_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--certs",
        str(certs),
        "--open-enrolment",  # a measurement on loopback: the hospitals here have no enrolled keys
        "--expected-sites",
        str(len(sites)),
        "--discovery-timeout",
        "120",
        "--run-timeout",
        str(int(timeout_s)),
    ]

    def start(cmd: list[str], name: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=(logs / f"{name}.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
        procs.append(proc)
        mem.add(proc.pid, name)
        return proc

    def start_hospitals() -> None:
        for name in sites:
            client_cmd = [
                str(BIN / "flower-client"),
                "run",
                dirs[name],
                "--site",
                name,
                "--server",
                f"127.0.0.1:{port}",
                "--root-cert",
                str(certs / "ca.crt"),
                "--out",
                str(work / "sites" / name),
                "--threads",
                str(data["train"]["threads"]),
            ]
            start(client_cmd, name)

    procs: list[subprocess.Popen[bytes]] = []
    try:
        with TreeSampler(interval_s=1.0) as mem:
            if standing:
                start_hospitals()
                _wait_ready(logs, sites, procs, timeout_s=300.0)
            t0 = time.perf_counter()
            server = start(server_cmd, "server")
            if not standing:
                start_hospitals()
            try:
                rc = server.wait(timeout=timeout_s + 60)
            except subprocess.TimeoutExpired:
                raise RunError(
                    f"deployment: flower-server did not finish within {timeout_s:.0f} s; see {logs}"
                ) from None
            wall = time.perf_counter() - t0
    finally:
        _stop(procs)
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.is_file():
        raise RunError(
            f"deployment: flower-server exited {rc}; see {logs}:\n{_tail(logs / 'server.log')}\n{_tail(run_dir / 'flower.log')}"
        )
    return {
        "wall_s": wall,
        "memory": mem.peak.to_dict(),
        "summary": json.loads(summary_path.read_text()),
        "run_dir": str(run_dir),
    }
