"""``flower-server``: the coordinating site's command.

``run`` starts a Flower SuperLink (TLS unless ``--insecure``), launches the
experiment plan on it with ``flwr run``, waits for the hospitals' SuperNodes,
and stops the SuperLink when the run ends.  It exits non-zero when the run
did not produce its ``summary.json`` (``flwr run --stream`` itself can exit
0 on a failed run).  ``certs`` makes the federation's CA and server
certificate.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from common.processes import exit_on_sigterm

log = logging.getLogger("flower-server")
REPO = Path(__file__).resolve().parents[1]


def cmd_certs(args: argparse.Namespace) -> int:
    from .certs import make_certificates

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    paths = make_certificates(Path(args.out), hosts=hosts, days=args.days)
    print(f"CA certificate (give to every hospital): {paths.ca_cert}")
    print(f"server certificate for {', '.join(hosts)}: {paths.server_cert}")
    print(f"private keys (keep at the coordinating site, mode 0600): {paths.ca_key}, {paths.server_key}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from common.config import ConfigError, load_config

    from .certs import existing
    from .launch import RunLaunch, finish, timed_launch, write_config
    from .superlink import SuperLinkSpec, TLSFiles

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tls = None
    if not args.insecure:
        if not args.certs:
            print("error: TLS is on by default: give --certs DIR (see `flower-server certs`) or --insecure", file=sys.stderr)
            return 2
        try:
            c = existing(Path(args.certs))
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        tls = TLSFiles(ca_cert=c.ca_cert.resolve(), cert=c.server_cert.resolve(), key=c.server_key.resolve())
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}-server").resolve()
    write_config(run_dir, cfg)
    keys = sorted(Path(args.enroll).glob("*.pub")) if args.enroll else []
    if args.enroll and not keys:
        print(f"error: --enroll {args.enroll}: no *.pub key found", file=sys.stderr)
        return 2
    spec = SuperLinkSpec(host=args.host, port=args.port, tls=tls, supernode_auth=bool(keys))
    expected = args.expected_sites or len(cfg.sites) or 1
    run_config = {
        "config-path": str(run_dir / "config.yaml"),
        "run-dir": str(run_dir),
        "run-id": run_dir.name,
        "expected-sites": expected,
        "discovery-timeout": float(args.discovery_timeout),
    }
    print(f"flower-server: SuperLink on {spec.address} ({'TLS' if tls else 'INSECURE'}); waiting for {expected} site(s); run folder {run_dir}", flush=True)
    connect = SuperLinkSpec(host="127.0.0.1" if args.host in ("0.0.0.0", "") else args.host, port=args.port, tls=tls)
    launch = RunLaunch(run_dir, spec, "federation", run_config, connect=connect, keys=tuple(keys), timeout_s=args.run_timeout or None)
    rc, seconds = timed_launch(launch, lambda line: print(f"flower-server: {line}", flush=True))
    data = finish(run_dir, rc, seconds)
    if data is None:
        return 1
    print(f"flower-server: run finished in {seconds:.0f} s; sites: {', '.join(data.get('sites', {}))}")
    if data.get("plan") != "loco":
        from common.report import render_report

        print(f"report: {render_report(run_dir)}")
    print(run_dir / "summary.json")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Progress of a run at a glance, from its checkpoints (works while the run is going)."""
    import re

    run_dir = Path(args.run_dir)
    root = run_dir / "checkpoints"
    if not root.is_dir():
        print(f"error: {root} not found: no round has finished in {run_dir}", file=sys.stderr)
        return 2
    print(f"run {run_dir.name}: {'finished' if (run_dir / 'summary.json').is_file() else 'in progress'}")
    for d in sorted(root.iterdir()):
        rounds = sorted(int(m.group(1)) for p in d.glob("round*.npz") if (m := re.fullmatch(r"round(\d+)\.npz", p.name)))
        if not rounds:
            continue
        with np.load(d / f"round{rounds[-1]}.npz") as z:
            meta = json.loads(bytes(z["meta"]).decode())
        sel = json.loads((d / "selected.json").read_text()) if (d / "selected.json").is_file() else None
        auc = meta.get("val_auc")
        line = f"  {d.name:22s} rounds done {rounds[-1]:3d}; last: sites {','.join(meta.get('trained', [])) or '-'}"
        line += f", validation AUC {auc:.4f}" if isinstance(auc, float) else ""
        if meta.get("dropped"):
            line += f", dropped {meta['dropped']}"
        if sel:
            line += f"; selected round {sel['round']}"
        print(line)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from common.report import render_report

    run_dir = Path(args.run_dir)
    if not (run_dir / "summary.json").is_file():
        print(f"error: {run_dir / 'summary.json'} not found: not a finished run folder", file=sys.stderr)
        return 2
    print(render_report(run_dir))
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    """Enrol one more hospital key with a server started with ``--enroll`` (same run folder)."""
    from .superlink import SuperLinkError, enroll

    try:
        enroll(Path(args.run_dir) / "flower", "federation", Path(args.public_key).resolve())
    except SuperLinkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"enrolled {args.public_key}")
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    """Export a finished run as one model bundle for `flower-client predict`."""
    from common.bundle import BundleError

    from .bundle import export_bundle

    try:
        path = export_bundle(Path(args.run_dir), Path(args.out), Path(args.signing_key))
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"model bundle: {path} ({path.stat().st_size / 1e6:.1f} MB); give it to the hospitals with `flower-client predict --bundle`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flower-server", description="Coordinating site of the federated sacral tumour study.")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="start the SuperLink and run the experiment plan")
    r.add_argument("--config", required=True, help="experiment YAML or preset name")
    r.add_argument("--run-dir", help="results folder (default: a new folder under runs/)")
    r.add_argument("--host", default="0.0.0.0", help="address the SuperLink listens on")
    r.add_argument("--port", type=int, default=9092, help="the SuperLink's port (hospitals connect here)")
    r.add_argument("--certs", help="folder with ca.crt, server.crt, server.key (TLS, the default)")
    r.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    r.add_argument("--enroll", help="folder of hospitals' public keys (*.pub): only these SuperNodes may join")
    r.add_argument("--expected-sites", type=int, default=0, help="wait for this many sites (default: the config's sites)")
    r.add_argument("--discovery-timeout", type=float, default=300.0, help="seconds to wait for the sites to connect")
    r.add_argument("--run-timeout", type=float, default=0.0, help="give up on the whole run after this many seconds")
    r.set_defaults(handler=cmd_run)
    c = sub.add_parser("certs", help="make the federation's CA and the server certificate")
    c.add_argument("--out", required=True)
    c.add_argument("--hosts", default="localhost,127.0.0.1", help="names/addresses hospitals use to reach the server")
    c.add_argument("--days", type=int, default=365)
    c.set_defaults(handler=cmd_certs)
    en = sub.add_parser("enroll", help="enrol a hospital's public key with the running server")
    en.add_argument("public_key", metavar="KEY.pub")
    en.add_argument("--run-dir", required=True, help="the running server's run folder")
    en.set_defaults(handler=cmd_enroll)
    st = sub.add_parser("status", help="progress of a run (rounds done, sites, validation AUC) from its checkpoints")
    st.add_argument("run_dir", metavar="RUN_DIR")
    st.set_defaults(handler=cmd_status)
    rp = sub.add_parser("report", help="(re)generate a run's HTML report from its summary and statistics")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    rp.set_defaults(handler=cmd_report)
    bd = sub.add_parser("bundle", help="export a finished run's selected models, ensembles and config as one model bundle")
    bd.add_argument("run_dir", metavar="RUN_DIR")
    bd.add_argument("--out", required=True, help="bundle file to write (e.g. sacral-model.zip)")
    bd.add_argument("--signing-key", required=True, help="Ed25519 private key (PEM) that signs the bundle; created with KEY.pub if missing (hospitals get KEY.pub)")
    bd.set_defaults(handler=cmd_bundle)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    exit_on_sigterm()
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
