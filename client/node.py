"""``flower-client run``: validate the site, then join the federation as a SuperNode.

The hospital's data never leaves this process tree: the SuperNode runs the
project's ClientApp (``client.app``) against the local site folder and
talks to the coordinating site's SuperLink over gRPC, with TLS unless
``--insecure`` is given explicitly.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from common.processes import flower_env, free_port, terminate_group
from common.validation import validate_site

log = logging.getLogger(__name__)


def _q(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
) -> list[str]:
    """The ``flower-supernode`` command line for one hospital."""
    node_config = " ".join(
        [f"site={_q(site)}", f"data-dir={_q(str(data_dir))}", f"out-dir={_q(str(out_dir))}", f"threads={threads}"]
    )
    cmd = [
        str(Path(sys.executable).parent / "flower-supernode"),
        "--superlink",
        server,
        "--node-config",
        node_config,
        "--isolation",
        "subprocess",
        "--port",
        str(port),
        "--max-retries",
        "0",
    ]
    cmd += ["--insecure"] if root_cert is None else ["--root-certificates", str(root_cert)]
    if auth_key is not None:
        cmd += ["--auth-supernode-private-key", str(auth_key), "--auth-supernode-public-key", str(auth_key) + ".pub"]
    return cmd


def run_cli(args: argparse.Namespace) -> int:
    """Validate, then run the SuperNode until it exits or this process is stopped."""
    site_dir = Path(args.site_dir).resolve()
    report = validate_site(site_dir)
    for problem in report.problems:
        print(problem)
    print(report.summary())
    if not report.valid_ids:
        print(f"error: {site_dir} has no valid patient: not joining the federation", file=sys.stderr)
        return 1
    if report.errors:
        print(f"joining with the {len(report.valid_ids)} valid patient(s); the others are refused (listed above)")
    if args.insecure and args.root_cert:
        print("error: --insecure and --root-cert exclude each other", file=sys.stderr)
        return 2
    if not args.insecure and not args.root_cert:
        print("error: TLS is on by default: give --root-cert CA.crt (or --insecure for a local test)", file=sys.stderr)
        return 2
    root_cert = Path(args.root_cert).resolve() if args.root_cert else None
    if root_cert is not None and not root_cert.is_file():
        print(f"error: {root_cert}: CA certificate not found", file=sys.stderr)
        return 2
    out_dir = Path(args.out or f"site-output/{args.site}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = supernode_command(
        site=args.site,
        data_dir=site_dir,
        out_dir=out_dir,
        server=args.server,
        root_cert=root_cert,
        threads=args.threads,
        port=args.port or free_port(),
        auth_key=Path(args.auth_key).resolve() if args.auth_key else None,
    )
    flwr_home = out_dir / "flower"
    flwr_home.mkdir(parents=True, exist_ok=True)
    print(f"{args.site}: joining {args.server} ({'TLS' if root_cert else 'INSECURE'}); outputs in {out_dir}", flush=True)
    proc = subprocess.Popen(cmd, env=flower_env(flwr_home), start_new_session=True)

    def stop(signum: int, frame: FrameType | None) -> None:
        terminate_group(proc)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return proc.wait()
    finally:
        terminate_group(proc)


def add_run(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="validate the site, then join the federation (a Flower SuperNode)")
    p.add_argument("site_dir", metavar="SITE_DIR")
    p.add_argument("--site", required=True, help="this hospital's name in the federation")
    p.add_argument("--server", required=True, help="the SuperLink's fleet address, HOST:PORT")
    p.add_argument("--root-cert", help="the federation's CA certificate (TLS, the default)")
    p.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    p.add_argument("--auth-key", help="this hospital's enrolled private key (SuperNode authentication)")
    p.add_argument("--out", help="where this site's outputs go (default site-output/SITE)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training")
    p.add_argument("--port", type=int, default=0, help="local port of the SuperNode's runtime API (default: free)")
    p.set_defaults(handler=run_cli)
