"""``python -m bench``: every benchmark section, each in its own process, then one report.

Sections (``--only`` picks some): ``throughput`` (patients/s and peak RSS per
network and input size, one subprocess per configuration), ``overhead``
(plain loop vs Flower simulation vs loopback deployment), ``comm`` (bytes per
site, float32 vs float16), ``quality`` (federated vs pooled vs local-only vs
oracle AUC), ``e2e`` (the latest ``make simulate`` and the ensemble's
prediction time per patient) and ``scaling`` (3, 6, 12 sites).  Every
section other than ``throughput`` runs as ``python -m bench.sections NAME``
with a timeout; runs that several sections share are made once per work
folder.  ``--device cuda`` is the GPU section: throughput only (the other
sections are about CPU sites), each configuration with AMP off and with
``train.amp: auto`` (bf16 or fp16), batches augmented on the device, all
through ``common.engine`` as a run would train.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.processes import terminate_group

from .machine import Machine, describe_machine
from .options import bench_params, parse_args, specs
from .params import BenchParams
from .report import format_report
from .throughput import BenchError, Measurement, measure_in_subprocess

log = logging.getLogger("bench")

# Seconds each section may take before it is stopped (and reported as failed); on an idle
# 2-core machine the defaults take about half of this (see docs/benchmarks.md).
SECTION_TIMEOUT_S = {"overhead": 1500.0, "comm": 420.0, "quality": 420.0, "e2e": 300.0, "scaling": 900.0}
REPO = Path(__file__).resolve().parents[1]


def gpu_name(device: str) -> str:
    """The CUDA device's name, or an error when CUDA was asked for and is absent (before any subprocess).

    Resolved by ``common.device`` like ``train.device``, so the bench refuses exactly what a run refuses.
    """
    if device != "cuda":
        return ""
    import torch  # only here: the CPU report needs no torch import in this process

    from common.config import ConfigError
    from common.device import Offer, resolve

    try:
        rt = resolve(device, "off", "auto", offer=Offer.probe(), key="--device")
    except ConfigError as exc:
        raise BenchError(str(exc)) from exc
    props = torch.cuda.get_device_properties(rt.torch_device)
    return f"{props.name}, {props.total_memory / 2**30:.0f} GiB"


def run_section(name: str, params: BenchParams, work: Path, timeout_s: float) -> dict[str, Any]:
    """``python -m bench.sections NAME`` with a timeout; its JSON result, or a ``BenchError``."""
    out = work / "sections" / f"{name}.json"
    logf = work / "sections" / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "bench.sections",
        name,
        "--work",
        str(work),
        "--params",
        params.to_json(),
        "--out",
        str(out),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
    }
    with logf.open("wb") as fh:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            terminate_group(proc)
            raise BenchError(
                f"{name}: stopped after {timeout_s:.0f} s (section timeout); see {logf}"
            ) from None
        finally:
            terminate_group(proc)
    if rc != 0 or not out.is_file():
        tail = logf.read_text(errors="replace").strip().splitlines()[-12:]
        raise BenchError(f"{name}: exited with status {rc}; see {logf}:\n" + "\n".join(tail))
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def measure_throughput(args: argparse.Namespace) -> tuple[list[Measurement], list[str]]:
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
    return results, failures


@dataclass
class Outcome:
    """Everything one invocation measured, for the printed report, the JSON and the Markdown."""

    machine: Machine
    params: BenchParams
    work: Path
    only: tuple[str, ...]
    threads_note: str
    results: list[Measurement] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    section_failures: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    total_s: float = 0.0
    end_load: float = 0.0  # 1-minute load average when the last section ended

    def payload(self) -> dict[str, Any]:
        return {
            "machine": {**self.machine.__dict__, "load_avg": list(self.machine.load_avg)},
            "params": json.loads(self.params.to_json()),
            "work": str(self.work),
            "threads_note": self.threads_note,
            "sections_run": list(self.only),
            "section_seconds": self.seconds,
            "total_seconds": self.total_s,
            "end_load_avg": self.end_load,
            "results": [r.summary() for r in self.results],
            "failures": self.failures,
            "sections": self.sections,
            "section_failures": self.section_failures,
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> Outcome:
        """An earlier invocation's outcome, from its ``bench.json``."""
        fields = {f.name for f in dataclasses.fields(Measurement)}
        return cls(
            Machine(**{**data["machine"], "load_avg": tuple(data["machine"]["load_avg"])}),
            BenchParams.from_json(json.dumps(data["params"])),
            Path(data["work"]),
            tuple(data["sections_run"]),
            data["threads_note"],
            [Measurement(**{k: v for k, v in r.items() if k in fields}) for r in data["results"]],
            data["failures"],
            data["sections"],
            data["section_failures"],
            data["section_seconds"],
            data["total_seconds"],
            data.get("end_load_avg", data["machine"]["load_avg"][0]),
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s", force=True)
    if args.report_from:
        out = Outcome.from_payload(json.loads(args.report_from.read_text()))
        print(render_report(out))
        if args.doc:
            args.doc.write_text(render_report(out, markdown=True))
            log.info("wrote %s", args.doc)
        return 0
    command = shlex.join([sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        gpu = gpu_name(args.device)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    machine = describe_machine(command, gpu=gpu)  # load average and date as the run starts
    work = (args.work or REPO / "runs" / f"bench-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Outcome(
        machine,
        bench_params(args),
        work,
        tuple(args.only),
        f"torch threads: {args.threads} per configuration (os.cpu_count() = {machine.cpu_count})",
    )
    t_all = time.perf_counter()
    for name in out.only:
        t0 = time.perf_counter()
        log.info("[%s] ...", name)
        if name == "throughput":
            out.results, out.failures = measure_throughput(args)
        else:
            # the overhead section's budget is per block of runs (--repeats)
            timeout = args.section_timeout or SECTION_TIMEOUT_S[name] * (out.params.repeats if name == "overhead" else 1)
            try:
                out.sections[name] = run_section(name, out.params, work, timeout)
            except BenchError as exc:
                out.section_failures[name] = str(exc)
                log.error("%s", exc)
        out.seconds[name] = time.perf_counter() - t0
        log.info("[%s] %.0f s", name, out.seconds[name])
    out.total_s = time.perf_counter() - t_all
    out.end_load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    for path in {work / "bench.json", *([args.json] if args.json else [])}:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out.payload(), indent=2) + "\n")
        log.info("wrote %s", path)
    print(render_report(out))
    if args.doc:
        args.doc.parent.mkdir(parents=True, exist_ok=True)
        args.doc.write_text(render_report(out, markdown=True))
        log.info("wrote %s", args.doc)
    return 1 if out.failures or out.section_failures else 0


def render_report(out: Outcome, *, markdown: bool = False) -> str:
    """Machine lines, then one table per section in order, then timings and warnings."""
    from . import tables

    machine = out.machine
    parts: list[str] = []
    if markdown:
        parts.append(tables.DOC_INTRO)
        parts.append("\n".join(f"- {line}" for line in machine.lines()) + "\n")
    else:
        parts.append("\n".join(machine.lines()) + "\n")
    for name in out.only:
        if name in out.section_failures:
            parts.append(tables.failed(name, out.section_failures[name], markdown))
        elif name == "throughput":
            text = format_report(machine, out.results, out.failures, out.threads_note)
            body = (
                text.split("\n\n", 1)[1] if "\n\n" in text else text
            )  # the machine lines are printed once, above
            parts.append(
                f"### Throughput and memory\n\n```\n{out.threads_note}\n\n{body}\n```\n"
                if markdown
                else f"Throughput and memory\n{out.threads_note}\n\n{body}\n"
            )
        else:
            try:
                parts.append(
                    tables.render(tables.section_table(name, out.sections[name], out.params), markdown)
                )
            except (
                KeyError,
                TypeError,
                ValueError,
            ) as exc:  # a result of another version: say so, show the rest
                parts.append(tables.failed(name, f"cannot tabulate this result: {exc!r}", markdown))
    timing = ", ".join(f"{n} {s:.0f} s" for n, s in out.seconds.items())
    parts.append(
        ("- " if markdown else "")
        + f"Bench wall time {out.total_s:.0f} s ({timing}); work folder {out.work}.\n"
    )
    end_load = out.end_load
    if max(machine.load_avg[0], end_load) > machine.usable_cpus:
        parts.append(
            f"{'**' if markdown else ''}WARNING{'**' if markdown else ''}: the machine was busy (1-minute load average"
            f" {machine.load_avg[0]:.1f} at the start, {end_load:.1f} at the end, on {machine.usable_cpus} cores): other"
            " processes shared the CPUs, so every time above is longer than this machine's own, and ratios between"
            " runs taken minutes apart are unreliable.  Rerun on an idle machine for figures to quote.\n"
        )
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
