"""What machine a benchmark ran on, read without importing the heavy libraries.

Throughput numbers mean nothing without the CPU, core count, memory, library
versions and load they were taken under, so every report starts with this.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("torch", "monai", "flwr")


@dataclass(frozen=True)
class Machine:
    """The facts printed in the report's header."""

    cpu_model: str
    cpu_count: int
    usable_cpus: int
    ram_gib: float
    load_avg: tuple[float, float, float]
    python: str
    versions: dict[str, str]
    date: str
    command: str
    gpu: str = ""

    def lines(self) -> list[str]:
        """Human-readable header lines; the first one starts with ``Machine:``."""
        versions = ", ".join(f"{k} {v}" for k, v in self.versions.items())
        load = " ".join(f"{x:.2f}" for x in self.load_avg)
        out = [
            f"Machine: {self.cpu_model}, {self.cpu_count} cores ({self.usable_cpus} usable), "
            f"{self.ram_gib:.1f} GiB RAM, load average {load}",
            f"Software: Python {self.python}, {versions}",
        ]
        if self.gpu:
            out.append(f"GPU: {self.gpu}")
        out += [f"Date: {self.date}", f"Command: {self.command}"]
        return out


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first ``model name`` of ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ram_gib(meminfo: Path = Path("/proc/meminfo")) -> float:
    """Total RAM in GiB from ``MemTotal`` (NaN when unknown)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_machine(command: str, gpu: str = "") -> Machine:
    """Snapshot of this machine now; ``command`` is the command line to print verbatim."""
    cpus = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    return Machine(
        cpu_model=cpu_model(),
        cpu_count=cpus,
        usable_cpus=usable,
        ram_gib=ram_gib(),
        load_avg=os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3,
        python=platform.python_version(),
        versions={p: package_version(p) for p in PACKAGES},
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        command=command,
        gpu=gpu,
    )
