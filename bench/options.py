"""The command line of ``python -m bench``: its options, checked, and what they select.

Three groups: what to measure and where results go, the federated sections'
experiment, and the throughput section's configurations (``specs``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from common.config import NETWORKS

from .params import SECTIONS, BenchParams
from .throughput import Spec

# Patients per configuration when --patients is not given: enough for several optimiser
# steps, few enough that the default run stays within ~5 minutes on 2 CPU cores.
DEFAULT_PATIENTS = {"cpu": {"quick": 16, "study": 8}, "cuda": {"quick": 64, "study": 80}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="What users pay: throughput and memory, federation overhead, bytes on the wire, AUC "
        "against pooled/local/oracle, end-to-end times and scaling; one table per section.",
    )
    cpus = os.cpu_count() or 1
    _run_options(p.add_argument_group("what to measure and where the results go"))
    _federation_options(
        p.add_argument_group("federated sections (overhead, comm, quality, e2e, scaling)"), cpus
    )
    _throughput_options(p.add_argument_group("throughput section"), cpus)
    args = p.parse_args(argv)
    for name in ("patients", "batch", "threads"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    if args.plain_threads < 1:
        p.error("--plain-threads must be >= 1")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.rounds < 2:
        p.error("--rounds must be >= 2 (the steady round is the mean of rounds 2..)")
    if args.only is None:
        args.only = SECTIONS if args.device == "cpu" else ("throughput",)
    if args.amp is None:
        args.amp = ("off",) if args.device == "cpu" else ("off", "auto")
    return args


def _run_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--only",
        type=_sections,
        default=None,
        metavar="S1,S2",
        help=f"comma-separated sections out of {','.join(SECTIONS)} (default: all on cpu, throughput on cuda)",
    )
    g.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)"
    )
    g.add_argument(
        "--arch",
        default="densenet121",
        choices=("densenet121", "small"),
        help="network of every section (default densenet121; small: a quick trial of the bench itself)",
    )
    g.add_argument(
        "--kinds", nargs="+", default=list(NETWORKS), choices=NETWORKS, help="which networks (default both)"
    )
    g.add_argument(
        "--work",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder for the runs, logs and results (default: a new runs/bench-<time>); reusing one reuses "
        "its finished runs, e.g. to add a section",
    )
    g.add_argument(
        "--doc",
        type=Path,
        metavar="MD",
        help="also write the report as Markdown to this file (docs/benchmarks.md)",
    )
    g.add_argument(
        "--json",
        type=Path,
        metavar="OUT",
        help="also write the machine and figures to this JSON file (always written to WORK/bench.json)",
    )
    g.add_argument(
        "--report-from",
        type=Path,
        metavar="JSON",
        help="measure nothing: print (and with --doc write) the report of an earlier run's bench.json",
    )
    g.add_argument(
        "--section-timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop any section after S seconds (default: per section, see bench/__main__.py)",
    )


def _federation_options(g: argparse._ArgumentGroup, cpus: int) -> None:
    g.add_argument(
        "--rounds",
        type=int,
        default=BenchParams.rounds,
        metavar="R",
        help="federated rounds (default %(default)s)",
    )
    g.add_argument(
        "--cohort",
        type=int,
        default=BenchParams.patients,
        metavar="N",
        help="patients in the benchmark cohort, a multiple of 24 (default %(default)s)",
    )
    g.add_argument(
        "--plain-threads",
        type=int,
        default=cpus,
        metavar="T",
        help=f"torch threads of the plain loop in overhead (default os.cpu_count() = {cpus}; on a busy machine 1"
        " can be several times faster)",
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=BenchParams.repeats,
        metavar="N",
        help="overhead: measure every run N times in paired blocks, each between two plain loops, and judge the"
        " targets on the median (default %(default)s; one block takes about 3 minutes on 2 fast cores)",
    )


def _throughput_options(g: argparse._ArgumentGroup, cpus: int) -> None:
    g.add_argument(
        "--quick-only", action="store_true", help="skip the study sizes (96^3, 3x224^2): slow on CPU"
    )
    g.add_argument(
        "--patients",
        type=int,
        default=0,
        metavar="N",
        help="patients per configuration (default: quick 16 / study 8 on cpu, quick 64 / study 80 on cuda)",
    )
    g.add_argument(
        "--batch",
        type=int,
        default=0,
        metavar="B",
        help="training batch size (default: the preset's, quick 8, study 20)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=cpus,
        metavar="T",
        help=f"torch threads (default os.cpu_count() = {cpus})",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=-1,
        metavar="W",
        help="DataLoader worker processes (default: the preset's, 0 = load in the training process)",
    )
    g.add_argument(
        "--amp",
        type=_amps,
        default=None,
        metavar="A1,A2",
        help="train.amp values to measure, out of off,auto,bf16,fp16 (default: off on cpu, off,auto on cuda)",
    )
    g.add_argument(
        "--augment-on",
        default="auto",
        choices=("auto", "workers", "device"),
        help="train.augment_on (default auto: on the device on cuda, in the DataLoader on cpu)",
    )
    g.add_argument(
        "--memory-format",
        type=_formats,
        default=("auto",),
        metavar="F1,F2",
        help="train.memory_format values to measure, out of auto,contiguous,channels_last (default auto: "
        "channels-last for 2D, contiguous for 3D)",
    )
    g.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up on a configuration after S seconds"
    )


def _amps(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or any(n not in ("off", "auto", "bf16", "fp16") for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from off,auto,bf16,fp16")
    return names


def _formats(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names or any(n not in ("auto", "contiguous", "channels_last") for n in names):
        raise argparse.ArgumentTypeError(f"{text!r}: choose from auto,contiguous,channels_last")
    return names


def _sections(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    return tuple(n for n in SECTIONS if n in names)  # always in the report's order


def bench_params(args: argparse.Namespace) -> BenchParams:
    return BenchParams(
        patients=args.cohort,
        rounds=args.rounds,
        arch=args.arch,
        plain_threads=args.plain_threads,
        repeats=args.repeats,
    )


def specs(args: argparse.Namespace) -> list[Spec]:
    presets = ("quick",) if args.quick_only else ("quick", "study")
    return [
        Spec(
            kind=kind,
            preset=preset,
            patients=args.patients or DEFAULT_PATIENTS[args.device][preset],
            arch=args.arch,
            batch=args.batch,
            threads=args.threads,
            device=args.device,
            workers=args.workers,
            amp=amp,
            augment_on=args.augment_on,
            memory_format=fmt,
        )
        for preset in presets
        for kind in args.kinds
        for amp in args.amp
        for fmt in args.memory_format
    ]
