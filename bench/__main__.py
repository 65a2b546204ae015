"""``python -m bench``: measure every configuration in its own process and print the report."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .machine import describe_machine
from .report import format_report
from .throughput import BenchError, Measurement, Spec, measure_in_subprocess

log = logging.getLogger("bench")

KINDS = ("densenet3d", "densenet2d")
# Patients per configuration when --patients is not given: enough for several optimiser
# steps, few enough that the default run stays within ~5 minutes on 2 CPU cores.
DEFAULT_PATIENTS = {"cpu": {"quick": 16, "study": 8}, "cuda": {"quick": 64, "study": 80}}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    cpus = os.cpu_count() or 1
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Training/inference throughput (patients/s), data-loading share and peak RSS of the "
        "3D and 2D DenseNet121 at the quick and study input sizes, through common.engine.",
    )
    p.add_argument(
        "--quick-only", action="store_true", help="skip the study sizes (96^3, 3x224^2): slow on CPU"
    )
    p.add_argument(
        "--patients",
        type=int,
        default=0,
        metavar="N",
        help="patients per configuration (default: quick 16 / study 8 on cpu, quick 64 / study 80 on cuda)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        metavar="B",
        help="training batch size (default: the preset's, quick 8, study 20)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=cpus,
        metavar="T",
        help=f"torch threads (default os.cpu_count() = {cpus})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=-1,
        metavar="W",
        help="DataLoader worker processes (default: the preset's, 0 = load in the training process)",
    )
    p.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (default cpu)"
    )
    p.add_argument(
        "--arch",
        default="densenet121",
        choices=("densenet121", "small"),
        help="network (default densenet121)",
    )
    p.add_argument(
        "--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="which networks (default both)"
    )
    p.add_argument(
        "--json", type=Path, metavar="OUT", help="also write the machine and figures to this JSON file"
    )
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="give up on a configuration after S seconds"
    )
    args = p.parse_args(argv)
    for name in ("patients", "batch", "threads"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    return args


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
        )
        for preset in presets
        for kind in args.kinds
    ]


def gpu_name(device: str) -> str:
    """The CUDA device's name, or an error when CUDA was asked for and is absent (before any subprocess)."""
    if device != "cuda":
        return ""
    import torch  # only here: the CPU report needs no torch import in this process

    if not torch.cuda.is_available():
        raise BenchError(f"--device cuda: CUDA is not available to torch {torch.__version__}")
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    command = shlex.join([sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        gpu = gpu_name(args.device)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    machine = describe_machine(command, gpu=gpu)  # load average and date as the run starts
    results: list[Measurement] = []
    failures: list[str] = []
    for spec in specs(args):
        log.info("measuring %s ...", spec.label)
        t0 = time.perf_counter()
        try:
            results.append(measure_in_subprocess(spec, timeout_s=args.timeout))
        except BenchError as exc:
            failures.append(str(exc))
            log.error("%s", exc)
            continue
        log.info("  done in %.0f s", time.perf_counter() - t0)
    threads_note = f"torch threads: {args.threads} per configuration (os.cpu_count() = {machine.cpu_count})"
    print(format_report(machine, results, failures, threads_note))
    if args.json:
        payload = {
            "machine": {**machine.__dict__, "load_avg": list(machine.load_avg)},
            "results": [r.summary() for r in results],
            "failures": failures,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        log.info("wrote %s", args.json)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
