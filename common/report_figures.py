"""Curves from the pooled grid histograms (ROC, calibration, decision) and the confusion matrices."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from common import report_format as fmt
from common.gridstats import ClassHistogram, ScoreGrid, auc, calibration_curve, net_benefit, roc_curve
from common.plots import Panel, Series, confusion_figure, line_figure, png_bytes
from common.reportdoc import Plot, Section, SectionBlocks

CALIBRATION_BINS = 10
_DCA_THRESHOLDS = np.arange(1, 100) / 100.0


def evaluation_sets(stats: Mapping[str, Mapping[str, ClassHistogram]]) -> dict[str, dict[str, ClassHistogram]]:
    """``{"internal pooled": {score: h}, "external": {score: h}}``: folds summed for the internal set."""
    out: dict[str, dict[str, ClassHistogram]] = {"internal pooled": {}, "external": {}}
    for score in fmt.ordered(stats):
        subsets = stats[score]
        folds = sorted((s for s in subsets if s.startswith("fold")), key=fmt.fold_key)
        if folds:
            out["internal pooled"][score] = ClassHistogram.aggregate(subsets[f] for f in folds)
        if "external" in subsets:
            out["external"][score] = subsets["external"]
    return out


def _grid_thresholds(bins: int) -> np.ndarray:
    """The decision-curve thresholds 0.01..0.99 that lie on the score grid (exact net benefit)."""
    grid = ScoreGrid(bins)
    keep = []
    for t in _DCA_THRESHOLDS:
        try:
            grid.threshold_index(float(t))
        except ValueError:
            continue
        keep.append(float(t))
    return np.asarray(keep)


def _listed(a: np.ndarray) -> list[float | None]:
    return [None if not math.isfinite(float(x)) else float(x) for x in a]


def curve_data(h: ClassHistogram, calibration_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """ROC, calibration and decision curve of one score on one patient set (all from the histogram)."""
    fpr, tpr, _ = roc_curve(h)
    out: dict[str, Any] = {"n": h.n, "n_pos": h.n_pos, "auc": auc(h), "roc": {"fpr": fpr, "tpr": tpr}}
    if h.bins % calibration_bins == 0:
        mean_pred, observed, counts = calibration_curve(h, calibration_bins)
        out["calibration"] = {"mean_predicted": mean_pred, "observed": observed, "counts": counts}
    thresholds = _grid_thresholds(h.bins)
    if thresholds.size:
        out["decision"] = net_benefit(h, thresholds)
    return out


def jsonable(curves: Mapping[str, Any]) -> Any:
    if isinstance(curves, Mapping):
        return {k: jsonable(v) for k, v in curves.items()}
    if isinstance(curves, np.ndarray):
        return _listed(curves) if curves.dtype.kind == "f" else curves.tolist()
    if isinstance(curves, float):
        return None if not math.isfinite(curves) else curves
    return curves


def _roc_panel(subset: str, curves: Mapping[str, Mapping[str, Any]]) -> Panel:
    series = [
        Series(f"{fmt.score_label(s)} (AUC {c['auc']:.3f})", c["roc"]["fpr"], c["roc"]["tpr"], fmt.SCORE_COLORS.get(s))
        for s, c in curves.items()
    ]
    return Panel(f"ROC, {subset}", series, "1 − specificity", "sensitivity", (0, 1), (0, 1.01),
                 diagonal=True, square=True, note="no statistics")


def _calibration_panel(subset: str, curves: Mapping[str, Mapping[str, Any]]) -> Panel:
    series = []
    for s, c in curves.items():
        cal = c.get("calibration")
        if cal is not None:
            ok = cal["counts"] > 0
            series.append(Series(fmt.score_label(s), cal["mean_predicted"][ok], cal["observed"][ok],
                                 fmt.SCORE_COLORS.get(s), marker="o"))
    return Panel(f"Calibration, {subset}", series, "mean predicted probability", "observed fraction malignant",
                 (0, 1), (0, 1.01), diagonal=True, square=True, note="no statistics")


def _decision_panel(subset: str, curves: Mapping[str, Mapping[str, Any]]) -> Panel:
    series: list[Series] = []
    top = 0.05
    for s, c in curves.items():
        d = c.get("decision")
        if d is None:
            continue
        if not series:
            series.append(Series("treat all", d["threshold"], d["treat_all"], "0.45", "--"))
            series.append(Series("treat none", d["threshold"], d["treat_none"], "black", ":"))
            top = max(top, float(np.nanmax(d["treat_all"])))
        series.append(Series(fmt.score_label(s), d["threshold"], d["model"], fmt.SCORE_COLORS.get(s)))
        top = max(top, float(np.nanmax(d["model"])))
    return Panel(f"Decision curves, {subset}", series, "threshold probability", "net benefit",
                 (0, 1), (-0.1 * top, 1.1 * top), note="no statistics")


def figures_section(
    summary: Mapping[str, Any], stats: Mapping[str, Mapping[str, ClassHistogram]] | None
) -> tuple[Section, dict[str, Any]]:
    """ROC, calibration, decision curves and confusion matrices; returns the curve data too."""
    b = SectionBlocks()
    if stats is None:
        b.note("No grid statistics (stats/final.npz) in this run folder: curves skipped.")
        sets: dict[str, dict[str, ClassHistogram]] = {"internal pooled": {}, "external": {}}
    else:
        sets = evaluation_sets(stats)
    cal_bins = int(summary.get("calibration_bins") or CALIBRATION_BINS)  # evaluation.calibration_bins of the run
    curves = {subset: {s: curve_data(h, cal_bins) for s, h in hists.items()} for subset, hists in sets.items()}
    present = {subset: c for subset, c in curves.items() if c}
    for subset in curves:
        if stats is not None and not curves[subset]:
            b.note(f"No {subset} statistics in this run (no {'external' if subset == 'external' else 'training'} "
                   "site answered): its curves are skipped.")
    if present:
        pooled = "pooled over all patients of the set (internal: all cross-validation test folds together)"
        b.add(Plot("roc", "ROC curves", f"ROC curves of each score, {pooled}; AUC in the legend.",
                   png_bytes(line_figure([_roc_panel(k, c) for k, c in present.items()]))))
        if any("calibration" in c for cs in present.values() for c in cs.values()):
            b.add(Plot("calibration", "Calibration curves",
                       f"Observed fraction malignant vs mean predicted probability in {cal_bins} equal-width "
                       f"bins (empty bins omitted), {pooled}.",
                       png_bytes(line_figure([_calibration_panel(k, c) for k, c in present.items()], shared_legend=True))))
        else:
            b.note(f"Calibration skipped: the score grid is not a multiple of {cal_bins} bins.")
        b.add(Plot("decision_curves", "Decision curves",
                   f"Net benefit of treating patients whose probability is at or above each threshold, against "
                   f"treating all or none, {pooled}.",
                   png_bytes(line_figure([_decision_panel(k, c) for k, c in present.items()], shared_legend=True))))
    cm_plot = _confusion_plot(summary)
    if cm_plot is not None:
        b.add(cm_plot)
    return Section("figures", "Figures — discrimination, calibration, clinical utility", tuple(b.blocks)), curves


def _confusion_plot(summary: Mapping[str, Any]) -> Plot | None:
    models = summary.get("models", {})
    scores = fmt.ordered(models)
    sets = (("internal pooled", "internal"), ("external", "external"))
    rows, matrices = [], []
    for label, key in sets:
        cms = [((models[s].get(key) or {}).get("pooled") or {}).get("confusion_matrix") for s in scores]
        if any(cm is not None for cm in cms):
            rows.append(label)
            matrices.append(cms)
    if not rows:
        return None
    thresholds = {
        m.get("threshold") for s in scores for k in ("internal", "external")
        for m in [((models[s].get(k) or {}).get("pooled") or {})] if m
    }
    thr = ", ".join(str(t) for t in sorted(t for t in thresholds if t is not None)) or "the configured threshold"
    fig = confusion_figure(rows, [fmt.score_label(s) for s in scores], matrices)
    return Plot("confusion_matrices", "Confusion matrices",
                f"[[TN, FP], [FN, TP]] at threshold {thr}, pooled over all patients of the set "
                "(internal: all test folds together); shading is the row share.", png_bytes(fig))
