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


def add_app_digest(sub: Subparsers) -> None:
    """Register ``app-digest``."""
    from .node import add_app_digest as register

    register(sub)


def add_predict(sub: Subparsers) -> None:
    """Register ``predict --bundle B (--image CT --mask ROI | --manifest CSV | --site DIR)``."""
    p = sub.add_parser(
        "predict",
        help="probability of malignancy for new patients, with a Grad-CAM heatmap (CPU or GPU)",
        description="Predict one patient (--image, --mask) or a batch (--manifest, --site) with a model "
        "bundle; exit status 1 if any patient could not be predicted.",
    )
    p.add_argument("--bundle", required=True, help="model bundle from `flower-server bundle`")
    p.add_argument(
        "--trusted-key",
        required=True,
        help="the coordinating site's bundle-signing public key (KEY.pub); a bundle it did not sign is refused",
    )
    p.add_argument("--image", help="one patient's CT (NIfTI, Hounsfield units)")
    p.add_argument("--mask", help="that patient's tumour ROI mask (NIfTI, same grid as the CT)")
    p.add_argument("--radiologist-score", type=int, help="the radiologist's 9-point malignancy score (1-9, not 5)")
    p.add_argument("--patient-id", help="name used in outputs (default: the image file name)")
    p.add_argument("--manifest", help="batch: a CSV with patient_id, image, mask[, radiologist_score]")
    p.add_argument("--site", help="batch: a site folder (its manifest.csv)")
    p.add_argument("--out", default="predictions", help="output folder (default: ./predictions)")
    p.add_argument("--ensemble", help="use this ensemble (default: best validation AUC among the usable ones)")
    p.add_argument("--no-heatmap", action="store_true", help="skip Grad-CAM")
    p.add_argument("--cam-layer", help="Grad-CAM layer of the 3D model (default: chosen for the input size)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: all)")
    p.add_argument(
        "--device",
        default="auto",
        help="auto (default: the first CUDA GPU if any, else the CPU), cpu, cuda or cuda:N",
    )
    p.set_defaults(handler=lazy_handler("client.predict_cli", "predict_cli"))


def add_ingest(sub: Subparsers) -> None:
    """Register ``ingest --cases CSV SITE_DIR``."""
    p = sub.add_parser(
        "ingest",
        help="convert DICOM CT series (dcm2niix) and ROI masks into the site format, de-identified",
        description="Convert each row of a cases CSV (patient_id, dicom, mask, label, radiologist_score, "
        "age, sex, series, segment) into SITE_DIR/images, masks and manifest.csv; exit status 1 if any "
        "row failed (the others are kept).",
    )
    p.add_argument("site_dir", metavar="SITE_DIR", help="site folder to create or update")
    p.add_argument("--cases", required=True, help="cases CSV (paths relative to its folder)")
    p.set_defaults(handler=lazy_handler("client.ingest", "ingest_cli"))


COMMANDS: tuple[Registrar, ...] = (add_validate, add_run, add_keygen, add_app_digest, add_ingest, add_predict)


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
