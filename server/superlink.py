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
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.processes import flower_env, free_port, port_open, terminate_group

log = logging.getLogger(__name__)

TASK_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # read by the SuperExec the SuperLink spawns
TASK_POLL_S = 0.25
"""How often the SuperLink's SuperExec asks for a run to start: Flower's default 1 s started the
ServerApp 0.5 s late on average; four small local requests a second cost next to nothing."""

__all__ = ["SuperLinkError", "SuperLinkSpec", "TLSFiles", "flower_env", "flwr_run", "free_port", "local_spec", "superlink", "terminate_group", "write_connection"]


class SuperLinkError(RuntimeError):
    """The SuperLink could not start or a run could not be launched."""


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
    """One SuperLink. Flower 1.42 serves the Fleet, Control and Runtime APIs on one HTTP port."""

    host: str = "127.0.0.1"
    port: int = 9092
    simulation: bool = False
    tls: TLSFiles | None = None
    supernode_auth: bool = False
    database: str = ":flwr-in-memory:"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self, log_file: Path) -> list[str]:
        cmd = [
            _bin("flower-superlink"),
            "--host",
            self.host,
            "--port",
            str(self.port),
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
        if self.supernode_auth:
            cmd += ["--enable-supernode-auth"]
        return cmd


def local_spec(simulation: bool, tls: TLSFiles | None = None) -> SuperLinkSpec:
    """A loopback SuperLink on free ports (simulation, tests)."""
    return SuperLinkSpec(port=free_port(), simulation=simulation, tls=tls)


@contextlib.contextmanager
def superlink(spec: SuperLinkSpec, flwr_home: Path, start_timeout_s: float = 60.0) -> Iterator[subprocess.Popen[bytes]]:
    """Run a SuperLink for the duration of the ``with`` block; always stopped afterwards."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    log_file = flwr_home / "superlink.log"
    out = (flwr_home / "superlink.stdout").open("wb")
    env = flower_env(flwr_home)
    env.setdefault(TASK_POLL_ENV, str(TASK_POLL_S))
    proc = subprocess.Popen(spec.command(log_file), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not port_open(spec.host, spec.port):
            if proc.poll() is not None:
                raise SuperLinkError(f"flower-superlink exited with code {proc.returncode}; see {flwr_home / 'superlink.stdout'}")
            if time.monotonic() > deadline:
                raise SuperLinkError(f"flower-superlink did not open {spec.address} within {start_timeout_s:.0f} s")
            time.sleep(0.05)
        log.info("SuperLink up on %s", spec.address)
        yield proc
    finally:
        terminate_group(proc)
        out.close()


def write_connection(flwr_home: Path, name: str, spec: SuperLinkSpec) -> None:
    """The ``flwr`` CLI's connection to this SuperLink, in ``$FLWR_HOME/config.toml``."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{spec.address}"']
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


APP_PACKAGES = ("common", "client", "server")  # what the ServerApp and the ClientApp import
APP_SUFFIXES = (".py", ".yaml", ".toml", ".md", ".json")  # Flower's FAB keeps only these kinds of file


def stage_app(repo: Path, dest: Path, packages: tuple[str, ...] = APP_PACKAGES) -> Path:
    """A folder holding only the Flower app: ``pyproject.toml`` and the packages the apps import.

    ``flwr run DIR`` walks all of ``DIR`` to build the app bundle (FAB) before
    filtering; run on the repository it walked the virtual environment, the
    data and every earlier run (65,000 files: about a minute on 2 busy
    cores, and growing with each run), at every start of a simulation or a
    server.  The staged folder is a few hundred kilobytes of source.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    shutil.copy2(repo / "pyproject.toml", dest / "pyproject.toml")
    for pkg in packages:
        for src in sorted((repo / pkg).rglob("*")):
            if src.is_file() and src.suffix in APP_SUFFIXES and "__pycache__" not in src.parts:
                target = dest / src.relative_to(repo)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, target)
    return dest


def flwr_run(
    app_dir: Path,
    flwr_home: Path,
    connection: str,
    run_config: Mapping[str, object],
    log_path: Path,
    federation_config: Mapping[str, object] | None = None,
    timeout_s: float | None = None,
) -> int:
    """``flwr run APP CONNECTION --stream`` on the app staged from ``app_dir``; output goes to ``log_path``."""
    app = stage_app(app_dir, flwr_home / "app")
    cmd = [_bin("flwr"), "run", str(app), connection, "--stream"]
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


def enroll(flwr_home: Path, connection: str, public_key: Path) -> None:
    """Register a hospital's public key with the running SuperLink (``flwr supernode register``)."""
    if not public_key.is_file():
        raise SuperLinkError(f"{public_key}: public key not found")
    cmd = [_bin("flwr"), "supernode", "register", str(public_key), connection, "--name", public_key.stem]
    res = subprocess.run(cmd, env=flower_env(flwr_home), capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise SuperLinkError(f"enrolling {public_key} failed: {(res.stdout + res.stderr).strip()[-500:]}")
    log.info("enrolled %s", public_key)

