"""Peak memory of a whole process tree (a simulation or a deployment), read from /proc.

A federated run is many processes (SuperLink, ServerApp, Ray workers or
SuperNodes and their ClientApps), so the figure users pay is the tree's
total.  RSS counts shared pages once per process (forked or Ray workers
share the interpreter and libraries), so the total is the proportional set
size (PSS, ``/proc/PID/smaps_rollup``) summed over the tree, sampled
periodically; the largest single process's RSS is kept beside it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROC = Path("/proc")
MAX_SAMPLER_SHARE = 0.02  # of one core: the most CPU the sampling may take from the run it measures


def parse_ppid(stat: str) -> int:
    """The parent pid from ``/proc/PID/stat`` (the command name may hold spaces and parentheses)."""
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def parse_kib(text: str, field: str) -> int:
    """``field:  N kB`` from a /proc status-like text, in KiB (0 when absent)."""
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def descendants(root: int, parents: Mapping[int, int]) -> set[int]:
    """``root`` and every process below it, from a pid -> parent pid map."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.add(pid)
        todo += children.get(pid, [])
    return out


def parent_map(proc: Path = PROC) -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            out[int(entry.name)] = parse_ppid((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
    return out


def process_memory_kib(pid: int, proc: Path = PROC) -> tuple[int, int]:
    """(PSS, RSS) of one process in KiB; (0, 0) when it is gone."""
    try:
        rss = parse_kib((proc / str(pid) / "status").read_text(), "VmRSS")
    except OSError:
        return 0, 0
    try:
        pss = parse_kib((proc / str(pid) / "smaps_rollup").read_text(), "Pss")
    except OSError:
        pss = rss
    return pss or rss, rss


@dataclass(frozen=True)
class TreePeak:
    """Peaks over the samples: total PSS of the tree, largest single RSS, most processes at once, each root's tree."""

    total_pss_mib: float
    largest_rss_mib: float
    max_processes: int
    samples: int
    per_root_pss_mib: dict[str, float] = field(default_factory=dict)
    sampler_cpu_s: float = 0.0  # CPU the sampling itself took, away from the run it measured

    def to_dict(self) -> dict[str, Any]:
        return {
            "peak_total_pss_gib": round(self.total_pss_mib / 1024, 3),
            "peak_process_rss_gib": round(self.largest_rss_mib / 1024, 3),
            "max_processes": self.max_processes,
            "samples": self.samples,
            "peak_pss_gib_by_root": {k: round(v / 1024, 3) for k, v in self.per_root_pss_mib.items()},
            "sampler_cpu_s": round(self.sampler_cpu_s, 2),
        }


def tree_sample(roots: Iterable[int], proc: Path = PROC) -> tuple[float, float, int]:
    """(total PSS MiB, largest RSS MiB, process count) of the trees below ``roots`` now."""
    total, largest, count, _ = _sample({r: str(r) for r in roots}, proc)
    return total, largest, count


def _sample(roots: Mapping[int, str], proc: Path = PROC) -> tuple[float, float, int, dict[str, float]]:
    """Like :func:`tree_sample`, plus the PSS (MiB) of each labelled root's own tree."""
    parents = parent_map(proc)
    trees = {label: descendants(root, parents) for root, label in roots.items()}
    pids = set().union(*trees.values()) if trees else set()
    memory = {pid: process_memory_kib(pid, proc) for pid in pids}
    per_root = {label: sum(memory[p][0] for p in tree) / 1024 for label, tree in trees.items()}
    total = sum(pss for pss, _ in memory.values()) / 1024
    largest = max((rss for _, rss in memory.values()), default=0) / 1024
    return total, largest, len(pids), per_root


def sampling_wait(interval_s: float, cost_s: float, max_share: float) -> float:
    """Seconds until the next sample: ``interval_s``, longer where a sample's CPU ``cost_s`` would exceed ``max_share``."""
    return max(interval_s, cost_s / max_share)


class TreeSampler:
    """Samples the trees below some pids in a background thread until stopped (a context manager).

    Each root may carry a label (a site, the server): its own tree's peak is kept too.  Reading
    PSS walks each process's page tables (about 20 ms for a 1.5 GiB process on these cores), so
    a deployment's twenty processes sampled every second took 10% of a core away from the run
    it measured; the wait grows so that sampling takes at most ``max_share`` of one core.
    """

    def __init__(self, interval_s: float = 1.0, max_share: float = MAX_SAMPLER_SHARE) -> None:
        self.roots: dict[int, str] = {}
        self.interval_s = interval_s
        self.max_share = max_share
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tree-sampler", daemon=True)
        self._peak = [0.0, 0.0, 0]
        self._per_root: dict[str, float] = {}
        self._samples = 0
        self._cpu_s = 0.0

    def add(self, pid: int, label: str = "") -> None:
        self.roots[pid] = label or str(pid)

    def _loop(self) -> None:
        while not self._stop.is_set():
            t0 = time.thread_time()
            self.sample()
            cost = time.thread_time() - t0
            self._cpu_s += cost
            self._stop.wait(sampling_wait(self.interval_s, cost, self.max_share))

    def sample(self) -> None:
        if not self.roots:
            return
        total, largest, count, per_root = _sample(dict(self.roots))
        self._peak = [max(self._peak[0], total), max(self._peak[1], largest), max(int(self._peak[2]), count)]
        for label, mib in per_root.items():
            self._per_root[label] = max(self._per_root.get(label, 0.0), mib)
        self._samples += 1

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def peak(self) -> TreePeak:
        return TreePeak(
            self._peak[0], self._peak[1], int(self._peak[2]), self._samples, dict(self._per_root), self._cpu_s
        )
