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
from typing import TYPE_CHECKING

import numpy as np

from common.processes import exit_on_sigterm

if TYPE_CHECKING:  # the command's imports stay lazy: `flower-server --help` loads none of them
    from .enrolment import Enrolment
    from .proxy import FleetProxy
    from .superlink import SuperLinkSpec, TLSFiles

log = logging.getLogger("flower-server")
REPO = Path(__file__).resolve().parents[1]


def cmd_certs(args: argparse.Namespace) -> int:
    from .certs import make_certificates

    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    try:
        paths = make_certificates(Path(args.out), hosts=hosts, days=args.days, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"CA certificate (give to every hospital): {paths.ca_cert}")
    print(f"server certificate for {', '.join(hosts)}: {paths.server_cert}")
    print(f"private keys (keep at the coordinating site, mode 0600): {paths.ca_key}, {paths.server_key}")
    return 0


class _Refused(Exception):
    """A ``flower-server run`` option that cannot be honoured: printed as ``error: ...``, exit 2."""


def _tls(args: argparse.Namespace) -> TLSFiles | None:
    """The public listener's certificate (TLS is on by default)."""
    from .certs import existing
    from .superlink import TLSFiles

    if args.insecure:
        return None
    if not args.certs:
        raise _Refused("TLS is on by default: give --certs DIR (see `flower-server certs`) or --insecure")
    try:
        c = existing(Path(args.certs))
    except FileNotFoundError as exc:
        raise _Refused(str(exc)) from exc
    return TLSFiles(ca_cert=c.ca_cert.resolve(), cert=c.server_cert.resolve(), key=c.server_key.resolve())


def _enrolment(args: argparse.Namespace) -> Enrolment | None:
    """The hospitals' enrolled keys (``--enroll``), or ``None`` under ``--open-enrolment``."""
    from .enrolment import Enrolment, EnrolmentError

    if args.open_enrolment == bool(args.enroll):
        raise _Refused(
            "enrolment is on by default: give --enroll DIR (one <site>.pub per hospital, from "
            "`flower-client keygen --site <site>`), or --open-enrolment for a local test (not both)"
        )
    if not args.enroll:
        return None
    try:
        registry = Enrolment.from_key_dir(Path(args.enroll))
    except (EnrolmentError, OSError) as exc:
        raise _Refused(f"--enroll {args.enroll}: {exc}") from exc
    if not registry.sites:
        raise _Refused(f"--enroll {args.enroll}: no <site>.pub key found")
    return registry


def _exposure(args: argparse.Namespace, nginx: Path | None) -> None:
    """Refuse a public listener that would expose the SuperLink's control API, or go without TLS."""
    from common.hosts import is_loopback

    local_only = is_loopback(args.host)
    if args.insecure and not local_only:
        raise _Refused(f"--insecure is for a test on this machine only: refused with --host {args.host}")
    if nginx is None and not local_only:
        raise _Refused(
            f"nginx not found: refusing to expose the SuperLink on {args.host} (its control API, which starts "
            "runs and registers keys, would be public). Install nginx (Debian: apt-get install nginx-light), "
            "or use --host 127.0.0.1 for a test on this machine."
        )


def _listeners(
    args: argparse.Namespace, tls: TLSFiles | None, auth: bool, nginx: Path | None, flwr_home: Path
) -> tuple[SuperLinkSpec, FleetProxy | None]:
    """The SuperLink on loopback and, with nginx, the public proxy that forwards the Fleet API alone.

    The SuperLink serves its Fleet, Control and Runtime APIs on one port, so it
    never listens beyond loopback when nginx is there (``server/proxy.py``).
    """
    from .certs import make_certificates
    from .proxy import FleetProxy
    from .superlink import SuperLinkSpec, TLSFiles, free_port

    if nginx is None:
        link = SuperLinkSpec(host="127.0.0.1", port=args.port, tls=tls, supernode_auth=auth)
        log.warning("nginx not found: SuperLink serves every API on %s (loopback test mode)", link.address)
        return link, None
    inner = make_certificates(flwr_home / "loopback-tls", hosts=("localhost", "127.0.0.1"), days=30, force=True)
    inner_tls = TLSFiles(ca_cert=inner.ca_cert, cert=inner.server_cert, key=inner.server_key)
    link = SuperLinkSpec(host="127.0.0.1", port=free_port(), tls=inner_tls, supernode_auth=auth)
    return link, FleetProxy(args.host, args.port, link.port, tls, backend_ca=inner.ca_cert)


def cmd_run(args: argparse.Namespace) -> int:
    from common.appdigest import local_app_digest
    from common.config import ConfigError
    from common.configfile import load_config

    from .launch import REPO, RunLaunch, finish, timed_launch, write_config
    from .proxy import find_nginx

    try:
        cfg = load_config(args.config)
        nginx = find_nginx()
        _exposure(args, nginx)
        registry = _enrolment(args)
        tls = _tls(args)
    except (ConfigError, _Refused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir or f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}-server").resolve()
    write_config(run_dir, cfg)
    expected = args.expected_sites or len(cfg.sites) or 1
    run_config: dict[str, object] = {
        "config-path": str(run_dir / "config.yaml"),
        "run-dir": str(run_dir),
        "run-id": run_dir.name,
        "expected-sites": expected,
        "discovery-timeout": float(args.discovery_timeout),
    }
    if registry is not None:
        registry.save(run_dir / "enrolment.json")
        run_config["enrolment-file"] = str(run_dir / "enrolment.json")
    else:
        (run_dir / "enrolment.json").unlink(missing_ok=True)
        log.warning("OPEN ENROLMENT: any SuperNode may join and claim any site not yet connected (tests only)")
        print(
            "flower-server: WARNING: --open-enrolment: any node may join and name itself; for tests only",
            file=sys.stderr,
            flush=True,
        )
    link, proxy = _listeners(args, tls, registry is not None, nginx, run_dir / "flower")
    public = f"{proxy.listen} (nginx: fleet API only)" if proxy else f"{link.address} (no proxy: loopback test mode)"
    say = lambda line: print(f"flower-server: {line}", flush=True)  # noqa: E731
    say(f"hospitals connect to {public}, {'TLS' if tls else 'INSECURE'}; SuperLink on {link.address}")
    say(f"app digest {local_app_digest(REPO)} (hospitals approve it: `flower-client app-digest`)")
    say(f"waiting for {expected} site(s); run folder {run_dir}")
    keys = tuple((Path(args.enroll) / f"{site}.pub").resolve() for site in registry.sites) if registry else ()
    launch = RunLaunch(
        run_dir,
        link,
        "federation",
        run_config,
        keys=keys,
        timeout_s=args.run_timeout or None,
        proxy=proxy,
        nginx=nginx,
    )
    rc, seconds = timed_launch(launch, say)
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
        if (side := d / f"round{rounds[-1]}.validation.json").is_file():  # validated by the next round
            meta.update(json.loads(side.read_text()))
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
    """Enrol one more hospital key with a server started with ``--enroll`` (same run folder).

    The key file's name is the site it speaks for (``<site>.pub``); the site
    is bound to it in the run's ``enrolment.json`` before the SuperLink
    learns the key, so the node is admitted only under that name.
    """
    from .enrolment import Enrolment, EnrolmentError
    from .superlink import SuperLinkError, enroll

    run_dir, key = Path(args.run_dir), Path(args.public_key).resolve()
    registry_file = run_dir / "enrolment.json"
    if not registry_file.is_file():
        print(f"error: {registry_file} not found: the server in {run_dir} does not run with --enroll", file=sys.stderr)
        return 1
    try:
        Enrolment.load(registry_file).with_key(key.stem, key.read_bytes()).save(registry_file)
        enroll(run_dir / "flower", "federation", key)
    except (EnrolmentError, OSError, SuperLinkError) as exc:
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
    r.add_argument(
        "--host", default="127.0.0.1",
        help="address of the public fleet port (nginx); 0.0.0.0 for every interface. The SuperLink itself stays on 127.0.0.1",
    )
    r.add_argument("--port", type=int, default=9092, help="the public fleet port (hospitals connect here)")
    r.add_argument("--certs", help="folder with ca.crt, server.crt, server.key (TLS, the default)")
    r.add_argument("--insecure", action="store_true", help="no TLS (a test on this machine only: needs a loopback --host)")
    r.add_argument("--enroll", help="folder of hospitals' public keys, <site>.pub: only these may join, each as its site")
    r.add_argument(
        "--open-enrolment", action="store_true",
        help="TESTS ONLY: no enrolment; any node may join and claim any site not yet connected",
    )
    r.add_argument("--expected-sites", type=int, default=0, help="wait for this many sites (default: the config's sites)")
    r.add_argument("--discovery-timeout", type=float, default=300.0, help="seconds to wait for the sites to connect")
    r.add_argument("--run-timeout", type=float, default=0.0, help="give up on the whole run after this many seconds")
    r.set_defaults(handler=cmd_run)
    c = sub.add_parser("certs", help="make the federation's CA and the server certificate")
    c.add_argument("--out", required=True)
    c.add_argument("--hosts", default="localhost,127.0.0.1", help="names/addresses hospitals use to reach the server")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--force", action="store_true", help="replace existing certificates and keys (ca.key included)")
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
