"""The operating point: a rule from the configuration, a threshold chosen on validation histograms.

``evaluation.threshold`` is either a fixed probability (``0.5``) or a rule applied
to the pooled validation statistics of the kept models:

* ``youden``: maximise sensitivity + specificity - 1;
* ``sensitivity:0.9``: the highest threshold whose sensitivity is at least 0.9
  (the best specificity that keeps the sensitivity);
* ``specificity:0.9``: the lowest threshold whose specificity is at least 0.9.

Candidates are the grid edges ``k / bins``, where the confusion matrix from
counts is exact.  A score ``>= threshold`` is called malignant.  Validation
sets are small, so among equally good thresholds (a gap between two occupied
bins) the middle of the gap is taken, not its edge.  When the rule cannot be
applied (no validation patients, one class only) 0.5 is used and the basis says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from common.gridstats import ClassHistogram, ScoreGrid

__all__ = ["ThresholdRule", "parse_threshold", "select_threshold"]

Kind = Literal["fixed", "youden", "sensitivity", "specificity"]
FALLBACK = 0.5


@dataclass(frozen=True)
class ThresholdRule:
    """A parsed ``evaluation.threshold``."""

    kind: Kind
    value: float  # the fixed threshold, or the target sensitivity/specificity; NaN for youden

    @property
    def fixed(self) -> bool:
        return self.kind == "fixed"

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.value:g}"
        return "youden" if self.kind == "youden" else f"{self.kind}:{self.value:g}"


def parse_threshold(spec: Any) -> ThresholdRule:
    """``0.5`` | ``"youden"`` | ``"sensitivity:0.9"`` | ``"specificity:0.9"``; ValueError says what is allowed."""
    allowed = "a number in (0, 1), 'youden', 'sensitivity:<target>' or 'specificity:<target>'"
    if isinstance(spec, bool):
        raise ValueError(f"expected {allowed}, got {spec!r}")
    if isinstance(spec, int | float):
        t = float(spec)
        if not (math.isfinite(t) and 0.0 < t < 1.0):
            raise ValueError(f"a fixed threshold must be in (0, 1), got {spec!r}")
        return ThresholdRule("fixed", t)
    if not isinstance(spec, str):
        raise ValueError(f"expected {allowed}, got {spec!r}")
    text = spec.strip().lower()
    if text == "youden":
        return ThresholdRule("youden", math.nan)
    kind, sep, target = text.partition(":")
    if sep and kind in ("sensitivity", "specificity"):
        try:
            v = float(target)
        except ValueError:
            raise ValueError(f"{kind} target must be a number in (0, 1), got {target!r}") from None
        if not (math.isfinite(v) and 0.0 < v < 1.0):
            raise ValueError(f"{kind} target must be in (0, 1), got {target!r}")
        return ThresholdRule(kind, v)  # type: ignore[arg-type]
    try:
        return parse_threshold(float(text))
    except ValueError:
        raise ValueError(f"expected {allowed}, got {spec!r}") from None


def _rates(h: ClassHistogram) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity at every edge ``k / bins``, k = 0..bins."""
    pos_ge = np.concatenate([np.cumsum(h.pos[::-1])[::-1], [0]]).astype(np.float64)
    neg_ge = np.concatenate([np.cumsum(h.neg[::-1])[::-1], [0]]).astype(np.float64)
    return pos_ge / h.n_pos, 1.0 - neg_ge / h.n_neg


def _middle_of_run(ok: np.ndarray, k: int) -> int:
    """Middle edge of the run of ``ok`` edges containing ``k``."""
    lo = k
    while lo - 1 >= 1 and ok[lo - 1]:
        lo -= 1
    hi = k
    while hi + 1 < ok.size - 1 and ok[hi + 1]:
        hi += 1
    return (lo + hi) // 2


def select_threshold(h: ClassHistogram, rule: ThresholdRule) -> dict[str, Any]:
    """The threshold under ``rule`` on the validation histogram ``h``, and what it was chosen on.

    Returns ``{"threshold", "rule", "basis": {...}}``; the basis holds the validation
    patients and the sensitivity/specificity there (``None`` where undefined).
    """
    basis: dict[str, Any] = {"n": h.n, "n_pos": h.n_pos, "n_neg": h.n_neg}
    if rule.fixed:
        t = rule.value
    elif h.n_pos == 0 or h.n_neg == 0:
        t = FALLBACK
        basis["fallback"] = "the validation statistics lack a class: the rule cannot be applied, 0.5 used"
    else:
        sens, spec = _rates(h)
        edges = np.arange(h.bins + 1)
        inner = (edges >= 1) & (edges <= h.bins - 1)
        if rule.kind == "youden":
            j = np.where(inner, sens + spec - 1.0, -np.inf)
            best = float(j.max())
            k = _middle_of_run(np.isclose(j, best, rtol=0, atol=1e-12), int(np.argmax(j)))
        elif rule.kind == "sensitivity":
            ok = inner & (sens >= rule.value - 1e-12)
            k = int(edges[ok].max()) if ok.any() else 1
            k = _middle_of_run(ok & np.isclose(spec, spec[k], rtol=0, atol=1e-12), k)
        else:
            ok = inner & (spec >= rule.value - 1e-12)
            k = int(edges[ok].min()) if ok.any() else h.bins - 1
            k = _middle_of_run(ok & np.isclose(sens, sens[k], rtol=0, atol=1e-12), k)
        t = k / h.bins
        basis["sensitivity"] = float(sens[k])
        basis["specificity"] = float(spec[k])
    if rule.fixed or "fallback" in basis:
        k = ScoreGrid(h.bins).threshold_index(t)
        if h.n_pos:
            basis["sensitivity"] = float(h.pos[k:].sum() / h.n_pos)
        if h.n_neg:
            basis["specificity"] = float(1.0 - h.neg[k:].sum() / h.n_neg)
    return {"threshold": float(t), "rule": str(rule), "basis": basis}
