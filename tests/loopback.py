"""Real ``flower-server`` and ``flower-client`` processes on loopback, for the deployment tests.

A :class:`Loopback` makes a throwaway CA and server certificate, one key
pair per hospital (enrolled with the server), a tiny experiment YAML, and
starts the project's own commands as an operator would.  Every process it
starts carries a marker in its environment, inherited by everything below
it (SuperLink, ServerApp, SuperNodes, ClientApps), so a test can kill one
machine's whole tree (a crash: nothing gets to clean up) and can find any
process left running afterwards, orphans included.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from client.keys import make_keypair
from common.processes import free_port
from server.certs import make_certificates

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
MARKER = "SACRAL_FL_TEST_PROCESS"


def tiny_experiment(
    sites: list[str], rounds: int, round_timeout_s: float, min_sites: int = 1
) -> dict[str, Any]:
    """The tiny preset cut to one fold of the 3D model: a full plan in a few minutes on 2 cores."""
    cfg: dict[str, Any] = yaml.safe_load((REPO / "common/presets/tiny.yaml").read_text())
    cfg["models"]["densenet2d"]["enabled"] = False
    cfg["models"]["radiomics"] = False
    cfg["train"].update(rounds=rounds, local_epochs=1)
    cfg["run_folds"] = [0]
    cfg["federation"].update(round_timeout_s=round_timeout_s, min_sites=min_sites)
    cfg["sites"] = [{"name": s} for s in sites]
    return cfg


def wait_for(what: str, ready: Callable[[], bool], timeout_s: float, poll_s: float = 0.5) -> None:
    """Poll ``ready`` until it holds; fail the test saying what never happened."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(poll_s)


class Loopback:
    """One coordinating site and its hospitals on 127.0.0.1, TLS and SuperNode authentication on."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tag = uuid.uuid4().hex
        self.port = free_port()
        self.certs = root / "certs"
        self.keys = root / "keys"
        self.enrolled = root / "enrolled"
        self.logs = root / "logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        make_certificates(self.certs)
        self.enrolled.mkdir(parents=True)
        self.logs.mkdir()

    def keygen(self, *names: str, enroll: bool = True) -> None:
        """Key pairs for these hospitals (``flower-client keygen``'s); the server enrols the public keys."""
        for name in names:
            _, pub = make_keypair(self.keys, name)
            if enroll:
                (self.enrolled / pub.name).write_bytes(pub.read_bytes())

    # -- starting ------------------------------------------------------------------------
    def write_config(self, cfg: dict[str, Any], name: str = "experiment.yaml") -> Path:
        path = self.root / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    def _start(self, role: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ, **{MARKER: f"{self.tag}/{role}"})
        with (self.logs / f"{role}.log").open("ab") as out:  # appended: a restarted role keeps one log
            proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs[role] = proc
        return proc

    def server(
        self, config: Path, run_dir: Path, *extra: str, expected: int = 3, discovery_s: float = 180.0, enrol: bool = True
    ) -> subprocess.Popen[bytes]:
        """``flower-server run`` on this loopback's port, enrolling every hospital key made here (or ``--open-enrolment``)."""
        enrolment = ["--enroll", str(self.enrolled)] if enrol else ["--open-enrolment"]
        cmd = [str(BIN / "flower-server"), "run", "--config", str(config), "--run-dir", str(run_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--certs", str(self.certs), *enrolment,
               "--expected-sites", str(expected), "--discovery-timeout", str(discovery_s), *extra]  # fmt: skip
        return self._start("server", cmd)

    def client(
        self, site: str, data: Path, *extra: str, key: str | None = None, role: str | None = None
    ) -> subprocess.Popen[bytes]:
        """``flower-client run`` as ``site`` with the key pair ``key`` (default: the site's own, made by
        :meth:`keygen`); ``role`` names the process and its output folder (default: the site)."""
        role = role or site
        # one torch thread per hospital: here they all share this machine's cores
        cmd = [str(BIN / "flower-client"), "run", str(data), "--site", site, "--server", f"127.0.0.1:{self.port}",
               "--root-cert", str(self.certs / "ca.crt"), "--auth-key", str(self.keys / (key or site)),
               "--out", str(self.site_out(role)), "--threads", "1", *extra]  # fmt: skip
        return self._start(role, cmd)

    def site_out(self, site: str) -> Path:
        return self.root / "sites" / site

    def log(self, role: str) -> str:
        path = self.logs / f"{role}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def wait(self, role: str, timeout_s: float) -> int | None:
        """The exit code of ``role``'s command, or None if it is still running after ``timeout_s``."""
        try:
            return self.procs[role].wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def finished(self, run_dir: Path, timeout_s: float) -> dict[str, Any]:
        """Wait for ``flower-server``; it must exit 0 having written the run's summary, which is returned."""
        rc = self.wait("server", timeout_s)
        log = run_dir / "flower.log"
        assert rc == 0, (
            f"flower-server exited {rc}:\n{self.log('server')[-3000:]}\n{log.read_text(errors='replace')[-5000:] if log.is_file() else ''}"
        )
        summary: dict[str, Any] = json.loads((run_dir / "summary.json").read_text())
        return summary

    # -- processes, found by their marker ---------------------------------------------------
    def running(self, role: str | None = None) -> dict[int, str]:
        """Live processes started here (of ``role``, or any), pid -> command line; zombies excluded."""
        want = f"{MARKER}={self.tag}/{role or ''}".encode()
        found: dict[int, str] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if not any(v.startswith(want) for v in (d / "environ").read_bytes().split(b"\0")):
                    continue
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
                found[int(d.name)] = (
                    (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                )
            except (OSError, IndexError):  # gone meanwhile, or not ours to read
                continue
        if role in (None, "server"):
            found.update(self._nginx())
        return found

    def _nginx(self) -> dict[int, str]:
        """The server's nginx: it rewrites its environment (its process title), so find it by its folder."""
        masters: dict[int, str] = {}
        parents: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if stat[0] == "Z":
                continue
            parents[int(d.name)] = int(stat[1])
            if cmd.startswith("nginx: master process") and str(self.root) in cmd:
                masters[int(d.name)] = cmd
        workers = {pid: "nginx: worker process" for pid, ppid in parents.items() if ppid in masters}
        return masters | workers

    def crash(self, role: str) -> None:
        """SIGKILL every process of ``role`` at once, as when its machine or container dies."""
        for _ in range(20):
            pids = self.running(role)
            if not pids:
                return
            for pid in pids:  # stop first, so nothing reacts or spawns while the tree is killed
                _signal(pid, signal.SIGSTOP)
            for pid in self.running(role) | pids:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.2)
        raise AssertionError(f"{role}: processes survive SIGKILL: {self.running(role)}")

    def stop(self) -> dict[int, str]:
        """SIGTERM every command started here (as an operator stopping it), then return what is left.

        Waits up to 45 s for the whole trees to go; what is still running then
        is returned (and killed, so one failing test does not slow the next).
        """
        for proc in self.procs.values():
            if proc.poll() is None:
                _signal(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 45
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        left = self.running()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self.running()
        for pid in left:
            _signal(pid, signal.SIGKILL)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        return left


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
