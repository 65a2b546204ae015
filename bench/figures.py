"""Pure arithmetic on measured runs: steady rounds, ratios, bytes per round, targets.

No I/O and no heavy imports, so these are unit-tested directly and the
report reads them without running anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

# Targets from the issue, and the anchors measured before this benchmark (stack notes).
TARGET_SIM_STEADY = 1.15
TARGET_DEPLOY_WHOLE = 2.0
ANCHORS = {
    "simulation": "1.7x whole run, 1.25x per steady round",
    "deployment": "9.5x state dict as is, 2.65x packed (whole run)",
}
TARGET_BYTES_RATIO = 0.5
TARGET_AUC_DELTA = 0.005
ROUND_TYPE = "train"  # a round's one exchange: it also validates the previous round's model
FOLD_TYPE = "evaluate"  # once per fold, after the last round: the validation of the last round's model


def steady_mean(seconds: Sequence[float], skip: int = 1) -> float:
    """Mean of the rounds after the first ``skip`` (the first pays for warm-up); NaN if none is left."""
    rest = list(seconds)[skip:]
    return sum(rest) / len(rest) if rest else math.nan


def bracketed(first: Mapping[str, Any], last: Mapping[str, Any]) -> dict[str, float]:
    """The baseline from the same run measured before and after the others: the mean of each timing."""
    return {k: (first[k] + last[k]) / 2 for k in ("wall_s", "steady_round_s")}


def block_values(blocks: Sequence[Mapping[str, Any]], run: str, key: str) -> list[float]:
    """``key`` of run ``run`` in each block of repeated runs (the overhead section's ``blocks``)."""
    return [float(b[run][key]) for b in blocks if run in b]


def median(values: Sequence[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count); NaN for none or a NaN."""
    ordered = sorted(values)
    if not ordered or any(math.isnan(v) for v in ordered):
        return math.nan
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def ratio(value: float, baseline: float) -> float:
    """``value / baseline``, NaN when either is missing or the baseline is not positive."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline <= 0:
        return math.nan
    return value / baseline


def round_seconds(summary: Mapping[str, Any], key: str = "") -> list[float]:
    """Seconds of each round of one model/fold in a run's ``summary.json`` (the first one when ``key`` is empty)."""
    rounds = summary.get("rounds", {})
    if not rounds:
        return []
    logs = rounds[key] if key else next(iter(rounds.values()))
    return [float(r["seconds"]) for r in sorted(logs, key=lambda r: r["round"])]


def breakdown(run: Mapping[str, Any]) -> dict[str, float]:
    """Where a run's wall time went: before/after the plan, its rounds, the rest of the plan.

    Federated runs: ``plan_s`` is the server's plan (site discovery to
    summary); the rest of the wall time is start-up and shut-down (CLI,
    site validation, SuperLink, Ray or SuperNodes, report).  The plain loop
    has ``import_s`` instead.
    """
    wall = float(run["wall_s"])
    rounds = float(sum(run.get("round_s", [])))
    if run.get("plan_s") is not None:
        plan = float(run["plan_s"])
        return {"outside_plan": wall - plan, "rounds": rounds, "plan_other": plan - rounds}
    start = float(run.get("import_s", 0.0))
    return {"outside_plan": start, "rounds": rounds, "plan_other": wall - start - rounds}


def site_traffic(entry: Mapping[str, Any], rounds: int, folds: int = 1) -> dict[str, float]:
    """One site's bytes: per federated round (its train exchange), per fold (the one evaluate after the
    last round) and for the whole run.  ``rounds``: all rounds of the run (over every fold)."""
    by_type = entry.get("by_message_type", {})

    def of(t: str, key: str) -> float:
        return float(by_type.get(t, {}).get(key, 0))

    return {
        "round_sent": of(ROUND_TYPE, "bytes_sent") / rounds,
        "round_received": of(ROUND_TYPE, "bytes_received") / rounds,
        "round_total": (of(ROUND_TYPE, "bytes_sent") + of(ROUND_TYPE, "bytes_received")) / rounds,
        "fold_evaluate_sent": of(FOLD_TYPE, "bytes_sent") / folds,
        "fold_evaluate_received": of(FOLD_TYPE, "bytes_received") / folds,
        "run_sent": float(entry.get("bytes_sent", 0)),
        "run_received": float(entry.get("bytes_received", 0)),
        "run_total": float(entry.get("bytes_sent", 0)) + float(entry.get("bytes_received", 0)),
        "messages": float(sum(int(v.get("messages", 0)) for v in by_type.values())),
    }


def pooled_auc(summary: Mapping[str, Any], model: str = "densenet3d") -> float:
    """The pooled internal-test AUC of ``model`` in a run's summary (NaN when absent)."""
    try:
        value = summary["models"][model]["internal"]["pooled"]["auc"]
    except (KeyError, TypeError):
        return math.nan
    return math.nan if value is None else float(value)


def verdict(value: float, target: float, *, at_most: bool = True) -> str:
    """``met`` / ``missed`` against a target (``n/a`` when unmeasured)."""
    if not math.isfinite(value):
        return "n/a"
    ok = value <= target if at_most else value >= target
    return "met" if ok else "missed"


def human_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (B, KiB, MiB, GiB)."""
    if not math.isfinite(n):
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """A number for a table cell; ``-`` for missing or NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:{spec}}{suffix}"
