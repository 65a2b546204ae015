"""The public port forwards the Fleet API only: the generated nginx config, and real nginx in front of a loopback HTTPS backend.

The backend stands in for the SuperLink (which serves /v1/control, /v1/fleet,
/v1/runtime, /health, /docs on one port): it records every path that reaches
it.  nginx is the real one flower-server starts (`make venv` installs it);
without it these tests fail rather than skip, as flower-server refuses a
public --host without it.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from common.processes import free_port
from server.certs import make_certificates
from server.proxy import FLEET_PATH, FleetProxy, ProxyError, find_nginx, fleet_proxy
from server.superlink import TLSFiles
from tests.loopback import wait_for

REPO = Path(__file__).resolve().parents[1]

CONTROL = [
    "/v1/control/register-node",
    "/v1/control/list-nodes",
    "/v1/control/list-runs",
    "/v1/control/start-run",
]
ELSEWHERE = ["/v1/runtime/get-nodes", "/health", "/docs", "/openapi.json", "/"]
SMUGGLED = [
    "/v1/fleet/../control/start-run",
    "/v1/fleet/%2e%2e/control/list-runs",
    "/v1/fleet/pull-messages/../../control/register-node",
    "/v1/fleet/%2E%2E%2Fcontrol%2Flist-nodes",
    "/v1/fleet/pull-messages%2F..%2F..%2Fcontrol%2Fstart-run",
    "/v1//control/list-runs",
]


def _proxy(tmp: Path, backend_port: int) -> tuple[FleetProxy, TLSFiles]:
    public = make_certificates(tmp / "public")
    inner = make_certificates(tmp / "inner", hosts=("localhost", "127.0.0.1"))
    tls = TLSFiles(public.ca_cert, public.server_cert, public.server_key)
    backend = TLSFiles(inner.ca_cert, inner.server_cert, inner.server_key)
    return FleetProxy("127.0.0.1", free_port(), backend_port, tls, backend_ca=inner.ca_cert), backend


def test_config_forwards_one_location_post_only_with_the_normalised_path(tmp_path: Path) -> None:
    proxy, _ = _proxy(tmp_path, 4444)
    conf = proxy.config(tmp_path / "w")
    assert conf.count("proxy_pass") == 1 and "proxy_pass https://superlink$uri;" in conf
    assert f"location ~ {FLEET_PATH} {{" in conf and FLEET_PATH == r"^/v1/fleet/[a-z][a-z-]*$"
    assert "limit_except POST" in conf and "return 404;" in conf
    assert "server 127.0.0.1:4444;" in conf and "proxy_ssl_verify on;" in conf
    assert proxy.tls is not None and f"ssl_certificate_key {proxy.tls.key};" in conf
    assert "/v1/control" not in conf and "/v1/runtime" not in conf


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[int, list[str], TLSFiles]]:
    """A loopback HTTPS server for ``localhost`` that answers every path and records it."""
    seen: list[str] = []
    inner = make_certificates(tmp_path / "backend", hosts=("localhost", "127.0.0.1"))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.path)
            size = len(self.rfile.read(int(self.headers.get("content-length", 0))))
            body = (f"backend: {self.path}" + (f" ({size} bytes)" if size > 1 else "")).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(inner.server_cert, inner.server_key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen, TLSFiles(inner.ca_cert, inner.server_cert, inner.server_key)
    finally:
        server.shutdown()
        server.server_close()


def _request(port: int, ca: Path, method: str, path: str, size: int = 1) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request(
            method, path, body=b"x" * size if method == "POST" else None
        )  # the path goes out as written
        res = conn.getresponse()
        return res.status, res.read().decode(errors="replace")
    finally:
        conn.close()


def test_real_nginx_forwards_the_fleet_api_and_nothing_else(
    tmp_path: Path, backend: tuple[int, list[str], TLSFiles]
) -> None:
    nginx = find_nginx()
    assert nginx is not None, (
        "nginx is not installed: `make venv` installs it (Debian: apt-get install nginx-light)"
    )
    port, seen, inner = backend
    public = make_certificates(tmp_path / "public")
    proxy = FleetProxy(
        "127.0.0.1",
        free_port(),
        port,
        TLSFiles(public.ca_cert, public.server_cert, public.server_key),
        inner.ca_cert,
    )
    with fleet_proxy(proxy, tmp_path / "nginx", nginx):
        status, body = _request(proxy.port, public.ca_cert, "POST", "/v1/fleet/pull-messages")
        assert (status, body) == (200, "backend: /v1/fleet/pull-messages")
        # a model-sized body (far above nginx's in-memory buffer) goes through too, even when the
        # nginx workers (nobody, under root) cannot enter this test's private folder
        status, body = _request(proxy.port, public.ca_cert, "POST", "/v1/fleet/push-object", 6_000_000)
        assert (status, body) == (200, "backend: /v1/fleet/push-object (6000000 bytes)")
        assert _request(proxy.port, public.ca_cert, "POST", "/v1/fleet/push-object?debug=1") == (
            200,
            "backend: /v1/fleet/push-object",  # no query string reaches the SuperLink
        )
        refused = {
            p: _request(proxy.port, public.ca_cert, "POST", p)[0] for p in CONTROL + ELSEWHERE + SMUGGLED
        }
        assert set(refused.values()) <= {400, 404}, refused
        assert _request(proxy.port, public.ca_cert, "GET", "/v1/fleet/pull-messages")[0] == 403
    assert seen == ["/v1/fleet/pull-messages", "/v1/fleet/push-object", "/v1/fleet/push-object"], seen
    access = (tmp_path / "nginx" / "access.log").read_text()
    assert "/v1/control/start-run" in access  # refused requests are on record at the coordinating site


def test_a_port_held_by_another_process_is_an_error_never_taken_for_the_proxy(tmp_path: Path) -> None:
    proxy, _ = _proxy(tmp_path, 4444)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", proxy.port))
        squatter.listen()
        with (
            pytest.raises(ProxyError, match="in use by another process"),
            fleet_proxy(proxy, tmp_path / "nginx", port_free_wait_s=0.5),
        ):
            pass


def test_nginx_goes_when_flower_server_is_killed(tmp_path: Path) -> None:
    """SIGKILL of the process that started nginx (a crashed flower-server) takes nginx and its port with it."""
    proxy, _ = _proxy(tmp_path, 4444)
    assert proxy.tls is not None
    tls = proxy.tls
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from server.proxy import FleetProxy, fleet_proxy
        from server.superlink import TLSFiles
        tls = TLSFiles(Path({str(tls.ca_cert)!r}), Path({str(tls.cert)!r}), Path({str(tls.key)!r}))
        proxy = FleetProxy("127.0.0.1", {proxy.port}, 4444, tls, Path({str(proxy.backend_ca)!r}))
        with fleet_proxy(proxy, Path({str(tmp_path / "nginx")!r})):
            print("ready", flush=True)
            time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        master = int((tmp_path / "nginx" / "nginx.pid").read_text())
        assert Path(f"/proc/{master}").exists()
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        wait_for("nginx gone with its parent", lambda: not _alive(master), 30, poll_s=0.2)
        wait_for("the port released", lambda: not _listening(proxy.port), 30, poll_s=0.2)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(timeout=10)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
