"""The federated runs the benchmark's sections share, each made once per work folder.

A run's result is kept in ``DIR/memo/<name>.json`` (``memo``), so a run that
several sections read is trained once (the 3-site float16 simulation: overhead
and communication; the float32 one: communication, quality and scaling), and a
section run again with the same ``--work`` reuses what is done.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import figures
from .cohort import CohortRequest, ensure_cohort
from .federation import REPO, Experiment, prepare_caches, run_simulation
from .params import BenchParams

log = logging.getLogger("bench")

COHORT_ROOT = REPO / "data" / "bench"
RUN_TIMEOUT_S = 1200.0  # one federated run; the section's own timeout is the real budget


def memo(work: Path, key: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``fn()``'s result, computed once per work folder (``work/memo/<key>.json``)."""
    path = work / "memo" / f"{key}.json"
    if path.is_file():
        log.info("reusing %s", path)
        result: dict[str, Any] = json.loads(path.read_text())
        return result
    result = fn()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    return result


def experiment(p: BenchParams, transport: str = "float32") -> Experiment:
    return Experiment(
        rounds=p.rounds, folds_run=p.folds_run, transport=transport, threads=p.site_threads, arch=p.arch
    )


def describe(p: BenchParams, n_sites: int = 3) -> str:
    return (
        f"{'DenseNet121' if p.arch == 'densenet121' else 'small DenseNet'} 3D at 32^3, batch 8, {p.rounds} rounds x 1 local epoch, fold 0 of 5"
        f"{f' and {p.folds_run - 1} more' if p.folds_run > 1 else ''}; synthetic benchmark cohort of "
        f"{p.patients} patients in {n_sites} sites; {p.site_threads} torch thread(s) per site"
    )


def prepared(p: BenchParams, work: Path, n_sites: int) -> dict[str, Any]:
    """The cohort of ``n_sites`` sites, its experiment YAMLs and warm per-site caches."""

    def make() -> dict[str, Any]:
        t0 = time.perf_counter()
        cohort = ensure_cohort(COHORT_ROOT, CohortRequest(p.patients), n_sites)
        cohort_s = time.perf_counter() - t0
        configs = {
            t: str(
                experiment(p, t).write(
                    cohort, work / "configs" / f"sites{n_sites}-{t}.yaml", f"bench-{n_sites}sites-{t}"
                )
            )
            for t in ("float32", "float16")
        }
        cache = work / "cache" / f"sites{n_sites}"
        prep = prepare_caches(Path(configs["float32"]), cache)
        return {
            "cohort": str(cohort),
            "cohort_s": cohort_s,
            "configs": configs,
            "cache": str(cache),
            "preprocess": prep,
        }

    return memo(work, f"prepare-sites{n_sites}", make)


def fed_result(run: dict[str, Any]) -> dict[str, Any]:
    """What the sections read from a federated run (the summary itself stays in its run folder)."""
    s = run["summary"]
    return {
        "wall_s": run["wall_s"],
        "memory": run["memory"],
        "run_dir": run["run_dir"],
        "plan_s": s.get("wall_seconds"),
        "round_s": figures.round_seconds(s),
        "communication": s.get("communication", {}),
        "auc": figures.pooled_auc(s),
        "sites": s.get("sites", {}),
    }


def simulation(
    p: BenchParams, work: Path, n_sites: int = 3, transport: str = "float32", suffix: str = ""
) -> dict[str, Any]:
    """One simulation run of the experiment; ``suffix`` names a repeat (its own run folder and memo)."""
    prep = prepared(p, work, n_sites)
    name = f"sim-sites{n_sites}-{transport}{suffix}"

    def make() -> dict[str, Any]:
        return fed_result(
            run_simulation(Path(prep["configs"][transport]), Path(prep["cache"]), work / "runs" / name, RUN_TIMEOUT_S)
        )

    return memo(work, name, make)


def timed(run: dict[str, Any]) -> dict[str, Any]:
    rs = run["round_s"]
    return {**run, "steady_round_s": figures.steady_mean(rs)}
