"""How the report names, orders and formats what ``summary.json`` holds (shared by its section modules)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from common.ensemble import ENSEMBLES

SCORE_LABELS: Mapping[str, str] = MappingProxyType(
    {
        "densenet2d": "2D DenseNet121",
        "densenet3d": "3D DenseNet121",
        "radiologist": "Senior radiologist",
        "radiomics": "Radiomics",
        "ensemble_2d3d": "Ensemble 2D+3D",
        "ensemble_3d_radiologist": "Ensemble 3D+radiologist",
        "ensemble_2d3d_radiologist": "Ensemble 2D+3D+radiologist",
    }
)
SCORE_COLORS: Mapping[str, str] = MappingProxyType(
    {
        "densenet2d": "#1f77b4",
        "densenet3d": "#d62728",
        "radiologist": "#2ca02c",
        "radiomics": "#9467bd",
        "ensemble_2d3d": "#ff7f0e",
        "ensemble_3d_radiologist": "#8c564b",
        "ensemble_2d3d_radiologist": "#e377c2",
    }
)


def num(value: Any) -> float | None:
    """A summary number, ``None`` when absent or undefined (NaN travels as null)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number in the summary, got {value!r}")
    return None if math.isnan(value) else float(value)


def cohort_value(value: Any) -> float | None:
    """A cohort reference figure: a number, or per-centre numbers whose ``all`` entry is the cohort's."""
    return num(value.get("all")) if isinstance(value, Mapping) else num(value)


def score_label(score: str) -> str:
    return SCORE_LABELS.get(score, score)


def is_ensemble(score: str, entry: Mapping[str, Any]) -> bool:
    return score in ENSEMBLES or "weights" in entry


def ordered(scores: Iterable[str]) -> list[str]:
    """Known scores in the study's order, then any others alphabetically."""
    known = list(SCORE_LABELS)
    items = set(scores)
    return [s for s in known if s in items] + sorted(items - set(known))


def fold_key(subset: str) -> int:
    return int(subset[4:]) if subset.startswith("fold") and subset[4:].isdigit() else 10**6


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d} (h:mm:ss)"


def byte_unit(n: float) -> tuple[str, float]:
    """The binary unit that shows ``n`` bytes with one to four integer digits."""
    for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n >= 1024**power:
            return unit, float(1024**power)
    return "bytes", 1.0


def size_text(n: int) -> str:
    unit, scale = byte_unit(n)
    return f"{n} bytes" if scale == 1.0 else f"{n / scale:.1f} {unit}"
