"""The clinical statistics of a run's summary, from histograms the server already holds.

One call (:func:`clinical_summary`) turns the pooled and per-site grid
histograms into what a reviewer asks for beside the pooled AUCs:

* ``thresholds``: each score's operating point chosen on its pooled validation
  histogram (``val<k>`` subsets) under ``evaluation.threshold``, with its basis;
* ``calibration``: slope, intercept, Hosmer-Lemeshow and Brier of every score,
  internal (all folds' test patients) and external;
* ``centres``: every score's AUC with its DeLong CI, sensitivity, specificity,
  PPV and NPV at each site, from that site's own histograms.

A single AUC's DeLong variance needs no second step: every patient's
placement depends only on its bin, so the sums of placements and of their
squares are sums over bins of the histogram (:func:`auc_ci`).  It equals
``delong_ci`` on grid-quantised scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy.stats import norm

from common.calibration import calibration
from common.delong import DeLongCI
from common.gridstats import ClassHistogram, auc, pooled_metrics
from common.threshold import ThresholdRule, parse_threshold, select_threshold

__all__ = ["auc_ci", "clinical_summary", "internal", "site_results", "thresholds"]

Hists = Mapping[str, Mapping[str, ClassHistogram]]  # score -> subset -> histogram


def auc_ci(h: ClassHistogram, alpha: float = 0.05) -> DeLongCI:
    """AUC with its DeLong variance and CI from one histogram (exact for grid-quantised scores)."""
    n_pos, n_neg = h.n_pos, h.n_neg
    a = auc(h)
    if n_pos < 2 or n_neg < 2:
        return DeLongCI(auc=a, var=math.nan, ci=(math.nan, math.nan), alpha=alpha)
    neg = h.neg.astype(np.float64)
    pos = h.pos.astype(np.float64)
    v10 = (np.cumsum(neg) - neg + 0.5 * neg) / n_neg  # placement of a positive in each bin
    v01 = (np.cumsum(pos[::-1])[::-1] - pos + 0.5 * pos) / n_pos  # of a negative
    s10 = (float(np.dot(pos, v10**2)) - n_pos * a * a) / (n_pos - 1)
    s01 = (float(np.dot(neg, v01**2)) - n_neg * a * a) / (n_neg - 1)
    var = max(s10 / n_pos + s01 / n_neg, 0.0)
    half = float(norm.ppf(1.0 - alpha / 2.0)) * math.sqrt(var)
    return DeLongCI(auc=a, var=var, ci=(max(0.0, a - half), min(1.0, a + half)), alpha=alpha)


def _sum(hs: list[ClassHistogram]) -> ClassHistogram | None:
    return ClassHistogram.aggregate(hs) if hs else None


def internal(subsets: Mapping[str, ClassHistogram], prefix: str = "fold") -> ClassHistogram | None:
    """All folds' subsets named ``<prefix><k>`` summed (each patient is in one fold's test set)."""
    return _sum([h for s, h in subsets.items() if s.startswith(prefix) and s[len(prefix) :].isdigit()])


def thresholds(final: Hists, rule: ThresholdRule) -> dict[str, dict[str, Any]]:
    """Each score's threshold under ``rule`` from its pooled validation histograms (``val<k>``)."""
    out: dict[str, dict[str, Any]] = {}
    for score, subsets in sorted(final.items()):
        val = internal(subsets, "val")
        if val is None:
            if rule.fixed:
                out[score] = {"threshold": rule.value, "rule": str(rule), "basis": {"n": 0}}
            else:
                out[score] = {
                    "threshold": 0.5,
                    "rule": str(rule),
                    "basis": {"n": 0, "fallback": "no validation statistics (no training site): 0.5 used"},
                }
            continue
        out[score] = select_threshold(val, rule)
    return out


def _metrics(h: ClassHistogram, threshold: float) -> dict[str, Any]:
    m = pooled_metrics(h, threshold).to_dict()
    ci = auc_ci(h)
    m["auc_ci"] = ci.to_dict()["ci"]
    return m


def site_results(site_hists: Mapping[str, Hists], thr: Mapping[str, float]) -> dict[str, dict[str, Any]]:
    """Per site and score: internal (the site's test patients of all folds) and external metrics."""
    out: dict[str, dict[str, Any]] = {}
    for site, scores in sorted(site_hists.items()):
        entry: dict[str, Any] = {}
        for score, subsets in sorted(scores.items()):
            t = thr.get(score, 0.5)
            per: dict[str, Any] = {}
            inner = internal(subsets)
            if inner is not None:
                per["internal"] = _metrics(inner, t)
            if "external" in subsets:
                per["external"] = _metrics(subsets["external"], t)
            if per:
                entry[score] = per
        out[site] = entry
    return out


def clinical_summary(
    final: Hists,
    site_hists: Mapping[str, Hists],
    threshold: Any,
    calibration_groups: int,
) -> dict[str, Any]:
    """``thresholds``, ``calibration``, ``pooled_auc_ci`` and ``centres`` for ``summary.json`` (module docstring)."""
    rule = threshold if isinstance(threshold, ThresholdRule) else parse_threshold(threshold)
    chosen = thresholds(final, rule)
    thr = {s: float(v["threshold"]) for s, v in chosen.items()}
    cal: dict[str, Any] = {}
    for score, subsets in sorted(final.items()):
        per: dict[str, Any] = {}
        inner = internal(subsets)
        if inner is not None:
            per["internal"] = calibration(inner, calibration_groups).to_dict()
        if "external" in subsets:
            per["external"] = calibration(subsets["external"], calibration_groups).to_dict()
        if per:
            cal[score] = per
    pooled_ci: dict[str, Any] = {}
    for score, subsets in sorted(final.items()):
        inner = internal(subsets)
        per = {"internal": auc_ci(inner).to_dict()} if inner is not None else {}
        if "external" in subsets:
            per["external"] = auc_ci(subsets["external"]).to_dict()
        pooled_ci[score] = per
    return {
        "threshold_rule": str(rule),
        "thresholds": chosen,
        "calibration_bins": calibration_groups,
        "calibration": cal,
        "pooled_auc_ci": pooled_ci,
        "centres": site_results(site_hists, thr),
    }
