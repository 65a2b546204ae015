"""Launch a run with ``flwr run`` on a SuperLink started here, follow it, check its result.

Shared by ``flower-server run`` (deployment) and ``flower-simulation run``
(a SuperLink in simulation mode): the run folder and its ``config.yaml``, the
SuperLink's lifetime, the progress lines echoed to the console while the
ServerApp runs in its own process, and the exit status (``flwr run --stream``
can exit 0 on a failed run, so a run without ``summary.json`` failed).
What the launching command adds beside the summary (its wall time including
start-up, the cohort's reference figures, the baselines) goes to files of its
own (``launch.json``, ``baselines.json``); ``summary.json`` is written by the
ServerApp alone.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ExperimentConfig, to_dict

from .runfiles import PROGRESS_NAME, SUMMARY_NAME

REPO = Path(__file__).resolve().parents[1]
LAUNCH_NAME = "launch.json"
BASELINES_NAME = "baselines.json"


@dataclass(frozen=True)
class RunLaunch:
    """Where and how to launch: the SuperLink to start, the connection ``flwr`` uses, the run config."""

    run_dir: Path
    listen: Any  # superlink.SuperLinkSpec: what the SuperLink listens on
    connection: str
    run_config: Mapping[str, object]
    connect: Any = None  # what flwr connects to (default: ``listen``)
    federation_config: Mapping[str, object] | None = None
    keys: tuple[Path, ...] = ()  # hospitals' public keys to enrol (SuperNode authentication)
    timeout_s: float | None = None
    proxy: Any = None  # proxy.FleetProxy: nginx on the public port, the Fleet API only (deployment)
    nginx: Path | None = None  # the nginx binary that serves ``proxy``


def write_config(run_dir: Path, cfg: ExperimentConfig) -> Path:
    """The run folder's ``config.yaml``: the exact experiment the ServerApp and the sites load."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


@contextlib.contextmanager
def follow(path: Path, echo: Callable[[str], None], interval_s: float = 0.5) -> Iterator[None]:
    """Echo the lines appended to ``path`` while the block runs (and those left when it ends)."""
    stop = threading.Event()
    pos = path.stat().st_size if path.is_file() else 0

    def drain() -> None:
        nonlocal pos
        if not path.is_file():
            return
        with path.open() as fh:
            fh.seek(pos)
            chunk = fh.read()
        complete, _, _ = chunk.rpartition("\n")
        if complete:
            pos += len(complete.encode()) + 1
            for line in complete.splitlines():
                echo(line)

    def loop() -> None:
        while not stop.wait(interval_s):
            drain()

    thread = threading.Thread(target=loop, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        drain()


def launch(spec: RunLaunch, echo: Callable[[str], None] = print) -> int:
    """Start the SuperLink, enrol keys, ``flwr run`` the plan while echoing its progress; the exit code."""
    from .proxy import fleet_proxy
    from .superlink import enroll, flwr_run, superlink, write_connection

    flwr_home = spec.run_dir / "flower"
    public = (
        fleet_proxy(spec.proxy, flwr_home / "proxy", spec.nginx)
        if spec.proxy is not None and spec.nginx is not None
        else contextlib.nullcontext()
    )
    with superlink(spec.listen, flwr_home), public:
        write_connection(flwr_home, spec.connection, spec.connect or spec.listen)
        for key in spec.keys:
            enroll(flwr_home, spec.connection, key.resolve())
        if spec.keys:
            echo(f"SuperNode authentication on; enrolled {', '.join(k.stem for k in spec.keys)}")
        with follow(spec.run_dir / PROGRESS_NAME, lambda line: echo(f"  {line}")):
            return flwr_run(
                REPO,
                flwr_home,
                spec.connection,
                spec.run_config,
                spec.run_dir / "flower.log",
                spec.federation_config,
                timeout_s=spec.timeout_s,
            )


def failure_cause(log_path: Path) -> str | None:
    """The last exception line the ServerApp logged (``flwr run`` itself may exit 0 on a failed run)."""
    if not log_path.is_file():
        return None
    found = re.findall(
        r"^([\w.]*(?:Error|Exception): .+)$", log_path.read_text(errors="replace"), flags=re.MULTILINE
    )
    return found[-1] if found else None


def finish(
    run_dir: Path, rc: int, seconds: float, extra: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The run's summary with what was written beside it, or ``None`` (said on stderr) when the run failed.

    Writes ``launch.json`` (wall time including start-up, plus ``extra``) beside the summary.
    """
    summary = run_dir / SUMMARY_NAME
    if rc != 0 or not summary.is_file():
        state = "present" if summary.is_file() else "missing"
        print(
            f"error: the run failed (flwr exit code {rc}, summary {state}); see {run_dir / 'flower.log'}",
            file=sys.stderr,
        )
        if cause := failure_cause(run_dir / "flower.log"):
            print(f"cause: {cause}", file=sys.stderr)
        return None
    (run_dir / LAUNCH_NAME).write_text(
        json.dumps({"wall_seconds_total": round(seconds, 1), **(extra or {})}, indent=2)
    )
    from common.report import load_summary

    return load_summary(run_dir)


def timed_launch(spec: RunLaunch, echo: Callable[[str], None] = print) -> tuple[int, float]:
    t0 = time.perf_counter()
    rc = launch(spec, echo)
    return rc, time.perf_counter() - t0
