#!/usr/bin/env python3
"""Container health check of the sacral-fl image (Docker ``HEALTHCHECK``).

Why a check of its own: the Flower processes are children of
``flower-server``/``flower-client``, so a running container does not prove a
running federation process.  ``server`` passes once the public fleet port
(nginx in front of the loopback SuperLink; ``$SACRAL_FL_PORT``, default 9092)
accepts TCP connections; ``client`` passes
while the SuperNode (``python -m client.supernode``) runs in the container (a hospital opens
no port, so there is nothing to connect to).  Standard library only, so that
it stays cheap to run every 30 s; exit status 0 healthy, 1 not (Docker
reserves 2).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def port_accepts(host: str, port: int, timeout_s: float = 3.0) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def process_running(name: str, proc: Path = Path("/proc")) -> bool:
    """Whether a process whose command line mentions ``name`` runs (Linux ``/proc``)."""
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # the process ended while we looked
            continue
        if any(Path(arg.decode(errors="replace")).name == name for arg in argv if arg):
            return True
    return False


def main(argv: list[str]) -> int:
    """``healthcheck.py server|client``: the exit status Docker expects."""
    role = argv[1] if len(argv) == 2 else ""
    if role == "server":
        port = int(os.environ.get("SACRAL_FL_PORT", "9092"))
        ok = port_accepts("127.0.0.1", port)
        detail = f"SuperLink port {port}"
    elif role == "client":
        ok = process_running("client.supernode") or process_running("flower-supernode")
        detail = "SuperNode process"
    else:
        print("usage: healthcheck.py server|client", file=sys.stderr)
        return 1  # Docker reserves exit status 2
    print(f"{detail}: {'up' if ok else 'DOWN'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
