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
import importlib
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ExperimentConfig, to_dict

from .runfiles import PROGRESS_NAME, SUMMARY_NAME

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
LAUNCH_NAME = "launch.json"
BASELINES_NAME = "baselines.json"
REPORT_MODULES = ("common.report",)  # what rendering the report after a run imports (matplotlib among them)


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
def _every(interval_s: float, tick: Callable[[], bool], name: str) -> Iterator[None]:
    """Call ``tick`` every ``interval_s`` in a thread while the block runs, until it returns True; joined at the end."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval_s):
            if tick():
                return

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def follow(path: Path, echo: Callable[[str], None], interval_s: float = 0.5) -> Iterator[None]:
    """Echo the lines appended to ``path`` while the block runs (and those left when it ends)."""
    pos = path.stat().st_size if path.is_file() else 0

    def drain() -> bool:
        nonlocal pos
        if not path.is_file():
            return False
        with path.open() as fh:
            fh.seek(pos)
            chunk = fh.read()
        complete, _, _ = chunk.rpartition("\n")
        if complete:
            pos += len(complete.encode()) + 1
            for line in complete.splitlines():
                echo(line)
        return False  # until the block ends

    try:
        with _every(interval_s, drain, "progress"):
            yield
    finally:
        drain()


@contextlib.contextmanager
def import_once_written(path: Path, modules: Sequence[str], interval_s: float = 0.1) -> Iterator[None]:
    """Import ``modules`` in a thread as soon as ``path`` is written anew, while the block runs; joined at its end.

    The report follows the run's summary: its libraries (matplotlib and the report's
    modules, 0.5 s) load while the ServerApp exits and the SuperLink stops (about 1 s
    after the summary), not after them.  Nothing else imports in that window (the
    launching thread only waits for processes), so the two threads never import the
    same module at once; a summary left by an earlier run in the folder does not count.
    """

    def stamp() -> tuple[int, int] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_ino

    before = stamp()

    def written() -> bool:
        now = stamp()
        if now is None or now == before:
            return False
        try:
            for name in modules:
                importlib.import_module(name)
        except Exception:  # the report's own import after the run says what is wrong
            log.debug("preloading %s failed", modules, exc_info=True)
        return True

    with _every(interval_s, written, "import-once-written"):
        yield


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
    with import_once_written(spec.run_dir / SUMMARY_NAME, REPORT_MODULES), superlink(spec.listen, flwr_home), public:
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
