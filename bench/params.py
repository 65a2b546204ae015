"""What one benchmark invocation measures: the knobs every section reads, as one frozen value."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

SECTIONS = ("throughput", "overhead", "comm", "quality", "e2e", "scaling")


@dataclass(frozen=True)
class BenchParams:
    """Sizes chosen so the default run of every section fits 20 minutes on 2 CPU cores.

    Federated sections train DenseNet121 3D at 32^3 (the quick preset's
    input) on the benchmark cohort (``patients`` synthetic patients, split
    into 3 sites, or 6 and 12 for scaling), fold 0 of 5, ``rounds`` rounds
    of one local epoch.
    """

    patients: int = 192
    rounds: int = 3
    folds_run: int = 1
    arch: str = "densenet121"
    site_threads: int = 1
    plain_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    scaling_sites: tuple[int, ...] = (3, 6, 12)
    # Overhead: blocks of (plain, simulation, deployment, hospitals running), each bracketed by the
    # plain loop before and after it; the targets are judged on the medians over the blocks.
    repeats: int = 1

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> BenchParams:
        data: dict[str, Any] = json.loads(text)
        for key in ("scaling_sites", "kinds"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
