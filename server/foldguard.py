"""Model-selection guard: a fold whose selected model failed on validation is not averaged in.

A fold model is kept for testing when its pooled validation AUC is the best of
its rounds, but the best can still be useless: a constant output (every
validation patient in one score bin: AUC exactly 0.5) or an inverted ranking
(AUC < 0.5).  Averaged into the external prediction, such a model only adds
noise, so it is left out there and the summary and report say so.  Its own
fold's internal test is still scored (hiding it would flatter the result).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GUARD_KEY = "guard"
"""Key of a selection entry holding the reason its fold is left out of the external average."""


def selection_problem(val_auc: float | None) -> str | None:
    """Why a selected fold model is unusable (``None`` when it is fine)."""
    if val_auc is None:
        return "no validation AUC (a class absent from the pooled validation patients)"
    if val_auc == 0.5:
        return "constant or uninformative on validation (pooled validation AUC 0.500)"
    if val_auc < 0.5:
        return f"inverted on validation (pooled validation AUC {val_auc:.3f} < 0.5)"
    return None


def external_folds(selected: Mapping[int, Mapping[str, Any]]) -> tuple[int, ...]:
    """Folds whose models the external prediction averages: the unflagged ones.

    When every fold is flagged there is nothing better to average, so all are
    kept (each still carries its flag in the summary).
    """
    good = tuple(sorted(f for f, s in selected.items() if not s.get(GUARD_KEY)))
    return good or tuple(sorted(selected))
