"""``flower-client run``: validate the site, then join the federation as a SuperNode.

The hospital's data never leaves this process tree: the SuperNode runs the
project's ClientApp (``client.app``) against the local site folder and
talks to the coordinating site's SuperLink over gRPC, with TLS unless
``--insecure`` is given explicitly.

A site with no usable patient still joins, in report-only mode: its
ClientApp reads no data and answers every message "unavailable" with the
kinds and counts of the validation errors (never a patient id or a path),
so the coordinating site learns why the site is out instead of waiting for
it or never hearing of it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from common.checkmemo import site_memo
from common.hosts import host_of, is_loopback
from common.processes import exit_on_sigterm, flower_env, free_port, terminate_group
from common.validation import SiteReport, validate_site

log = logging.getLogger(__name__)
RETRY_S = 10.0
REPO = Path(__file__).resolve().parents[1]


def approved_app(explicit: str | None) -> str:
    """The app digest this site runs: ``--approve-app``, else this installation's own ('' after an error)."""
    from common.appdigest import AppDigestError, local_app_digest

    from .approval import DIGEST

    if explicit:
        if not DIGEST.fullmatch(explicit):
            print(f"error: --approve-app {explicit!r}: an app digest is 64 hex digits (`flower-client app-digest`)", file=sys.stderr)
            return ""
        print(f"approved app: {explicit} (--approve-app); runs of any other app are refused", flush=True)
        return explicit
    try:
        digest = local_app_digest(REPO)
    except AppDigestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ""
    print(f"approved app: {digest} (this installation's code); runs of any other app are refused", flush=True)
    return digest


def app_digest_cli(args: argparse.Namespace) -> int:
    """Print the app digest of this installation: what the coordinating site's `flower-server run` must show."""
    from common.appdigest import AppDigestError, local_app_digest

    try:
        print(local_app_digest(REPO))
    except AppDigestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def unavailable_reason(report: SiteReport) -> str:
    """Why a site with no usable patient is out, for the server: counts of error kinds only."""
    agg = report.aggregate()
    kinds = ", ".join(f"{code} x{n}" for code, n in agg["errors_by_code"].items()) or "none recorded"
    return f"site data failed validation: {agg['n_valid']} of {agg['n_total']} patients usable (errors: {kinds})"


def supernode_command(
    *,
    site: str,
    data_dir: Path,
    out_dir: Path,
    server: str,
    root_cert: Path | None,
    threads: int,
    port: int,
    auth_key: Path | None = None,
    max_wait_s: float = 0.0,
    unavailable: str = "",
) -> list[str]:
    """The SuperNode command line for one hospital (``unavailable``: report-only mode, why)."""
    entries = [f"site={_q(site)}", f"data-dir={_q(str(data_dir))}", f"out-dir={_q(str(out_dir))}", f"threads={threads}"]
    if unavailable:  # Flower's node-config parser allows no double quote inside a value
        entries.append(f"unavailable={_q(unavailable.replace(chr(34), chr(39)))}")
    node_config = " ".join(entries)
    cmd = [
        sys.executable,
        "-m",
        "client.supernode",  # Flower's flower-supernode, polling every 0.2 s instead of 3 s (client/supernode.py)
        "--superlink",
        server,
        "--node-config",
        node_config,
        "--isolation",
        "process",  # the ClientApp processes come from client.warm (see warm_command)
        "--port",
        str(port),
    ]
    if max_wait_s > 0:  # otherwise keep retrying: the server may start later or restart
        cmd += ["--max-wait-time", str(max_wait_s)]
    cmd += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key)]
    return cmd


def warm_command(port: int, parent_pid: int, approved: str) -> list[str]:
    """The SuperExec beside the SuperNode: libraries imported once, one forked process per message, approved app only.

    It serves every SuperNode this ``flower-client`` (``parent_pid``) starts on ``port``, restarts included.
    """
    address = f"127.0.0.1:{port}"  # the runtime API listens on loopback only
    return [sys.executable, "-m", "client.warm", "--runtime-api-address", address, "--parent-pid", str(parent_pid),
            "--approved-app", approved]  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    """Check the flags, validate the site, then run the SuperNode until it exits or this process is stopped."""
    site_dir = Path(args.site_dir).resolve()
    out_dir = Path(args.out or f"site-output/{args.site}").resolve()
    if args.insecure and args.root_cert:
        print("error: --insecure and --root-cert exclude each other", file=sys.stderr)
        return 2
    if not args.insecure and not args.root_cert:
        print("error: TLS is on by default: give --root-cert CA.crt (or --insecure for a local test)", file=sys.stderr)
        return 2
    if args.insecure and not is_loopback(host_of(args.server)):
        print(f"error: --insecure is for a test on this machine only: refused for --server {args.server}", file=sys.stderr)
        return 2
    approved = approved_app(args.approve_app)
    if not approved:
        return 2
    root_cert = Path(args.root_cert).resolve() if args.root_cert else None
    if root_cert is not None and not root_cert.is_file():
        print(f"error: {root_cert}: CA certificate not found", file=sys.stderr)
        return 2
    # Flags first: a mistyped flag is refused before the images are read.  A restart reads only
    # the cases whose files changed since the last start (memo beside the preprocessing cache).
    report = validate_site(site_dir, memo=site_memo(out_dir))
    for problem in report.problems:
        print(problem)
    print(report.summary())
    unavailable = "" if report.valid_ids else unavailable_reason(report)
    if unavailable:
        print(
            f"error: {site_dir} has no valid patient: joining in report-only mode, the server is told: {unavailable}",
            file=sys.stderr,
        )
    elif report.errors:
        print(f"joining with the {len(report.valid_ids)} valid patient(s); the others are refused (listed above)")
    out_dir.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    cmd = supernode_command(
        site=args.site,
        data_dir=site_dir,
        out_dir=out_dir,
        server=args.server,
        root_cert=root_cert,
        threads=args.threads,
        port=port,
        auth_key=Path(args.auth_key).resolve() if args.auth_key else None,
        max_wait_s=args.max_wait,
        unavailable=unavailable,
    )
    flwr_home = out_dir / "flower"
    flwr_home.mkdir(parents=True, exist_ok=True)
    print(f"{args.site}: joining {args.server} ({'TLS' if root_cert else 'INSECURE'}); outputs in {out_dir}", flush=True)
    # SIGTERM/SIGINT unwind through the ``finally`` below, which stops the SuperNode.  (Waiting
    # on it inside a signal handler instead would contend for the lock ``proc.wait()`` holds.)
    exit_on_sigterm()
    deadline = time.monotonic() + args.max_wait if args.max_wait > 0 else float("inf")
    # One warm SuperExec for the life of this command: it imports the libraries once and serves
    # every SuperNode started below (same runtime API port), so a rejoin costs no imports.
    return supervise(cmd, warm_command(port, os.getpid(), approved), flower_env(flwr_home), deadline, args.site)


def supervise(
    node_cmd: list[str],
    warm_cmd: list[str],
    env: dict[str, str],
    deadline: float,
    site: str,
    retry_s: float = RETRY_S,
    check_s: float = 1.0,
) -> int:
    """Run the SuperNode and the warm SuperExec; rejoin whenever the SuperNode exits, until ``deadline``.

    The SuperExec is started once and only started again if it dies (checked every ``check_s``);
    both are stopped when this returns or is interrupted.  Returns the SuperNode's last exit code.
    """
    warm: subprocess.Popen[bytes] | None = None
    try:
        while True:
            proc = subprocess.Popen(node_cmd, env=env, start_new_session=True)
            try:
                rc = None
                while rc is None:
                    if warm is not None and warm.poll() is not None:
                        print(f"{site}: the SuperExec exited with code {warm.returncode}; starting it again", flush=True)
                    if warm is None or warm.returncode is not None:
                        warm = subprocess.Popen(warm_cmd, env=env, start_new_session=True)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        rc = proc.wait(timeout=check_s)
            finally:
                terminate_group(proc)
            # A SuperNode only exits on its own when it lost the federation: the server was down
            # too long, its key is not enrolled (yet), or a restarted server forgot this node (it
            # then exits 0).  Rejoin, until --max-wait runs out.
            if time.monotonic() + retry_s > deadline:
                print(f"{site}: SuperNode exited with code {rc}; --max-wait is over: giving up", file=sys.stderr)
                return rc or 1
            print(
                f"{site}: SuperNode exited with code {rc} (server down or restarted, or this site's key "
                f"not enrolled yet); rejoining in {retry_s:.0f} s",
                flush=True,
            )
            time.sleep(retry_s)
    finally:
        if warm is not None:
            terminate_group(warm)


def add_run(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="validate the site, then join the federation (a Flower SuperNode)")
    p.add_argument("site_dir", metavar="SITE_DIR")
    p.add_argument("--site", required=True, help="this hospital's name in the federation")
    p.add_argument("--server", required=True, help="the SuperLink's fleet address, HOST:PORT")
    p.add_argument("--root-cert", help="the federation's CA certificate (TLS, the default)")
    p.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    p.add_argument("--auth-key", help="this hospital's enrolled private key (SuperNode authentication)")
    p.add_argument("--out", help="where this site's outputs go (default site-output/SITE)")
    p.add_argument(
        "--threads", type=int, default=0,
        help="torch threads for training (default 0: all cores; 1 per site when sites share a machine, as on loopback)",
    )
    p.add_argument("--port", type=int, default=0, help="local port of the SuperNode's runtime API (default: free)")
    p.add_argument("--max-wait", type=float, default=0.0, help="give up connecting after this many seconds (default: keep retrying)")
    p.add_argument(
        "--approve-app", metavar="DIGEST",
        help="run only this app (its digest, 64 hex digits); default: this installation's own (`flower-client app-digest`)",
    )
    p.set_defaults(handler=run_cli)


def keygen_cli(args: argparse.Namespace) -> int:
    from .keys import make_keypair

    try:
        private, public = make_keypair(Path(args.out), args.site)
    except (FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"private key (keep at this hospital): {private}")
    print(f"public key (send to the coordinating site for enrolment): {public}")
    return 0


def add_keygen(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("keygen", help="make this hospital's SuperNode key pair (the .pub is enrolled by the server)")
    p.add_argument("--out", required=True)
    p.add_argument("--site", required=True)
    p.set_defaults(handler=keygen_cli)


def add_app_digest(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "app-digest",
        help="print this installation's app digest (compare it with the one `flower-server run` prints)",
    )
    p.set_defaults(handler=app_digest_cli)
