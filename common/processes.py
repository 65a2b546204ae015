"""Process helpers for the Flower processes the commands start (no Flower import here).

Shared by ``flower-server`` (SuperLink), ``flower-client`` (SuperNode) and
``flower-simulation``: each command stops what it starts, process group and all.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's range for outgoing connections' source ports (Linux default where unreadable)."""
    try:
        lo, hi = (int(v) for v in path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return (lo, hi) if 0 < lo <= hi <= 65535 else (32768, 60999)


def free_port(rng: random.Random | None = None) -> int:
    """A loopback TCP port free now, chosen outside the kernel's ephemeral range.

    A port from ``bind(0)`` comes from the ephemeral range, where any outgoing
    connection (a SuperNode's, Ray's) may take it before our process binds it:
    seen once as "127.0.0.1:35903 is in use" when a benchmark's proxy started.
    Outside that range only another listener can take it.
    """
    rng = rng or random.SystemRandom()
    lo, hi = ephemeral_range()
    candidates = [r for r in ((10000, lo - 1), (hi + 1, 65535)) if r[1] - r[0] >= 100]
    for _ in range(100 if candidates else 0):
        a, b = rng.choice(candidates)
        port = rng.randint(a, b)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # every range taken: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, no update check, no runtime installs."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    # No usage events to flower.ai from a hospital; each Flower process also waits up to 4 s on exit
    # for that request, which a firewall that drops packets turns into 4 s per message.
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    # numpy's OpenBLAS pool: the Flower processes' only BLAS calls are dot products over a model
    # (aggregation), where a second thread saves nothing and its spin-wait afterwards cost the
    # ServerApp 0.5 s of CPU per bench deployment (perf); the training threads are torch's own
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    # the venv's console scripts first, so child processes find flwr-serverapp & co
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def terminate_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit`` so ``finally`` blocks stop the processes we started.

    Without it, a command killed by its supervisor (a shell, Kubernetes)
    would leave its SuperLink and the simulation engine running.
    """

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
