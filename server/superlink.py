"""Start and stop a Flower SuperLink, and launch runs on it with ``flwr run``.

Used by ``flower-server`` (deployment), ``flower-simulation`` (a SuperLink in
simulation mode) and the integration tests.  Whoever starts a SuperLink
stops it: the context manager kills the whole process group, including the
``flwr-serverapp``/``flwr-simulation`` children the SuperLink spawns.
Runtime dependency installation is always off: Flower would otherwise
``uv sync`` the app and download a CUDA build of torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class SuperLinkError(RuntimeError):
    """The SuperLink could not start or a run could not be launched."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: own FLWR_HOME, no update check, no runtime installs."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("RAY_DEDUP_LOGS", "0")
    # the venv's console scripts first, so child processes find flwr-serverapp & co
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise SuperLinkError(f"{name} not found (is flwr installed in this environment?)")
    return found


@dataclass(frozen=True)
class TLSFiles:
    """Server-side TLS material (see ``flower-server certs``)."""

    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class SuperLinkSpec:
    host: str = "127.0.0.1"
    fleet_port: int = 9092
    control_port: int = 9093
    runtime_port: int = 9091
    simulation: bool = False
    tls: TLSFiles | None = None
    auth_keys_csv: Path | None = None
    database: str = ":flwr-in-memory:"

    @property
    def control_address(self) -> str:
        return f"{self.host}:{self.control_port}"

    @property
    def fleet_address(self) -> str:
        return f"{self.host}:{self.fleet_port}"

    def command(self, log_file: Path) -> list[str]:
        cmd = [
            _bin("flower-superlink"),
            "--fleet-api-address",
            self.fleet_address,
            "--control-api-address",
            self.control_address,
            "--host",
            self.host,
            "--port",
            str(self.runtime_port),
            "--disable-runtime-dependency-installation",
            "--isolation",
            "subprocess",
            "--database",
            self.database,
            "--log-file",
            str(log_file),
        ]
        if self.simulation:
            cmd.append("--simulation")
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += [
                "--ssl-ca-certfile",
                str(self.tls.ca_cert),
                "--ssl-certfile",
                str(self.tls.cert),
                "--ssl-keyfile",
                str(self.tls.key),
            ]
        if self.auth_keys_csv is not None:
            cmd += ["--enable-supernode-auth"]
        return cmd


def local_spec(simulation: bool, tls: TLSFiles | None = None) -> SuperLinkSpec:
    """A loopback SuperLink on free ports (simulation, tests)."""
    return SuperLinkSpec(
        fleet_port=free_port(),
        control_port=free_port(),
        runtime_port=free_port(),
        simulation=simulation,
        tls=tls,
    )


def terminate_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left."""
    if proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


@contextlib.contextmanager
def superlink(spec: SuperLinkSpec, flwr_home: Path, start_timeout_s: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run a SuperLink for the duration of the ``with`` block; always stopped afterwards."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_file = flwr_home / "superlink.log"
    out = (flwr_home / "superlink.stdout").open("wb")
    proc = subprocess.Popen(
        spec.command(log_file), env=flower_env(flwr_home), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _port_open(spec.host, spec.control_port):
            if proc.poll() is not None:
                raise SuperLinkError(f"flower-superlink exited with code {proc.returncode}; see {flwr_home / 'superlink.stdout'}")
            if time.monotonic() > deadline:
                raise SuperLinkError(f"flower-superlink did not open {spec.control_address} within {start_timeout_s:.0f} s")
            time.sleep(0.3)
        log.info("SuperLink up: fleet %s, control %s", spec.fleet_address, spec.control_address)
        yield proc
    finally:
        terminate_group(proc)
        out.close()


def write_connection(flwr_home: Path, name: str, spec: SuperLinkSpec) -> None:
    """The ``flwr`` CLI's connection to this SuperLink, in ``$FLWR_HOME/config.toml``."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{spec.control_address}"']
    if spec.tls is None:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{spec.tls.ca_cert}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def flwr_run(
    app_dir: Path,
    flwr_home: Path,
    connection: str,
    run_config: Mapping[str, object],
    log_path: Path,
    federation_config: Mapping[str, object] | None = None,
    timeout_s: float | None = None,
) -> int:
    """``flwr run APP CONNECTION --stream``; output goes to ``log_path``; returns the exit code."""
    cmd = [_bin("flwr"), "run", str(app_dir), connection, "--stream"]
    if run_config:
        cmd += ["--run-config", " ".join(f"{k}={_toml_value(v)}" for k, v in run_config.items())]
    if federation_config:
        cmd += ["--federation-config", " ".join(f"{k}={_toml_value(v)}" for k, v in federation_config.items())]
    with log_path.open("ab") as fh:
        proc = subprocess.Popen(cmd, env=flower_env(flwr_home), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            terminate_group(proc)
            raise SuperLinkError(f"flwr run did not finish within {timeout_s:.0f} s") from None
        finally:
            if proc.poll() is None:
                terminate_group(proc)
