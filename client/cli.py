"""``flower-client``: the hospital's command.

Subcommands are registered by the functions in ``COMMANDS``; each one adds a
subparser and sets ``handler`` (``(argparse.Namespace) -> int``, the exit
status).  Handlers import their heavy modules (nibabel, torch, Flower) only
when called, through ``lazy_handler`` or a local import, so that
``flower-client --help`` stays fast.  To add ``run``, ``ingest`` or
``predict``, write a registrar such as::

    def add_run(sub: Subparsers) -> None:
        p = sub.add_parser("run", help="join a federation")
        p.set_defaults(handler=lazy_handler("client.node", "run_cli"))

and append it to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    Subparsers: TypeAlias = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    Subparsers = argparse._SubParsersAction

Handler: TypeAlias = Callable[[argparse.Namespace], int]
Registrar: TypeAlias = Callable[["Subparsers"], None]

logger = logging.getLogger(__name__)


def lazy_handler(module: str, name: str) -> Handler:
    """A handler that imports ``module.name`` on first call, not when the parser is built."""

    def handler(args: argparse.Namespace) -> int:
        target: Handler = getattr(importlib.import_module(module), name)
        return target(args)

    handler.__qualname__ = f"lazy_handler({module}.{name})"
    return handler


def _validate(args: argparse.Namespace) -> int:
    """Print every problem of a site folder, then a summary; exit 1 on any error."""
    from common.validation import validate_site  # lazy: nibabel and scipy

    report = validate_site(Path(args.site_dir), check_images=not args.no_images, workers=args.workers)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for problem in report.problems:
            print(problem)
        print(report.summary())
    return 0 if report.ok else 1


def add_validate(sub: Subparsers) -> None:
    """Register ``validate SITE_DIR [--json] [--no-images] [--workers N]``."""
    p = sub.add_parser(
        "validate",
        help="check a site folder (manifest, CT volumes, masks, reader study)",
        description="List every problem of a site folder; exit status 1 if any is an error "
        "(warnings alone exit 0).",
    )
    p.add_argument("site_dir", metavar="SITE_DIR", help="folder holding manifest.csv")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--no-images", action="store_true", help="check the CSV files only, read no volume")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="cases read in parallel (default 1)")
    p.set_defaults(handler=_validate)


def add_run(sub: Subparsers) -> None:
    """Register ``run SITE_DIR --site NAME --server HOST:PORT [--root-cert CA | --insecure]``."""
    from .node import add_run as register

    register(sub)


def add_keygen(sub: Subparsers) -> None:
    """Register ``keygen --out DIR --site NAME``."""
    from .node import add_keygen as register

    register(sub)


COMMANDS: tuple[Registrar, ...] = (add_validate, add_run, add_keygen)


def build_parser(commands: Sequence[Registrar] = COMMANDS) -> argparse.ArgumentParser:
    """The ``flower-client`` parser, one subcommand per registrar in ``commands``."""
    parser = argparse.ArgumentParser(
        prog="flower-client", description="Hospital side of the federated sacral tumour study."
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="diagnostics on stderr (default WARNING)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in commands:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``flower-client``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
