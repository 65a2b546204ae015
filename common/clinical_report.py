"""The report's clinical section: operating points, calibration, per-centre results and their forest plot.

Everything comes from ``summary.json`` (``thresholds``, ``calibration``,
``centres``, ``pooled_auc_ci``; written by ``common.clinical``).  A run made
before these keys existed gets a note, not an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.plots import png_bytes
from common.report_format import SCORE_LABELS
from common.reportdoc import Note, Plot, Section, Table

__all__ = ["clinical_section", "forest_figure"]

_MAIN = ("densenet3d", "densenet2d", "radiologist", "ensemble_3d_radiologist", "ensemble_2d3d_radiologist")


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


def _ci(v: Any) -> tuple[float | None, float | None]:
    if isinstance(v, list | tuple) and len(v) == 2:
        return _num(v[0]), _num(v[1])
    return None, None


def forest_figure(
    rows: Sequence[tuple[str, float | None, float | None, float | None, bool]], xlabel: str
) -> Figure:
    """One line per row ``(label, estimate, low, high, pooled)``: point and CI; pooled rows as diamonds."""
    fig = Figure(figsize=(7.0, 0.8 + 0.28 * max(len(rows), 1)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = np.arange(len(rows))[::-1]
    for y, (_, est, lo, hi, pooled) in zip(ys, rows, strict=True):
        if est is None:
            continue
        if lo is not None and hi is not None:
            ax.plot([lo, hi], [y, y], color="0.2", linewidth=1.2)
        ax.plot(
            [est],
            [y],
            marker="D" if pooled else "s",
            color="#d62728" if pooled else "0.2",
            markersize=6 if pooled else 4,
        )
    ax.axvline(0.5, color="0.6", linestyle=":", linewidth=1.0)
    ax.set_yticks(ys, [r[0] for r in rows], fontsize=7)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", color="0.92", linewidth=0.8)
    return fig


def _label(score: str) -> str:
    return SCORE_LABELS.get(score, score)


def _threshold_table(summary: Mapping[str, Any]) -> Table | None:
    chosen = summary.get("thresholds")
    if not isinstance(chosen, dict) or not chosen:
        return None
    models = summary.get("models", {})
    rows = []
    for score, t in chosen.items():
        basis = t.get("basis") or {}
        row: list[Any] = [
            score,
            _num(t.get("threshold")),
            t.get("rule"),
            basis.get("n"),
            _num(basis.get("sensitivity")),
            _num(basis.get("specificity")),
        ]
        for subset in ("internal", "external"):
            m = ((models.get(score) or {}).get(subset) or {}).get("pooled") or {}
            row += [_num(m.get(k)) for k in ("sensitivity", "specificity", "ppv", "npv")]
        row.append(basis.get("fallback", ""))
        rows.append(tuple(row))
    cols = (
        "score",
        "threshold",
        "rule",
        "val_n",
        "val_sensitivity",
        "val_specificity",
        "internal_sensitivity",
        "internal_specificity",
        "internal_ppv",
        "internal_npv",
        "external_sensitivity",
        "external_specificity",
        "external_ppv",
        "external_npv",
        "note",
    )
    return Table(
        "operating_points",
        "Operating points",
        "Each score's threshold, chosen on the pooled validation patients of the kept fold models under "
        "evaluation.threshold and then applied unchanged to the internal and external test patients "
        "(score >= threshold is called malignant).",
        cols,
        tuple(rows),
    )


def _calibration_table(summary: Mapping[str, Any]) -> Table | None:
    cal = summary.get("calibration")
    if not isinstance(cal, dict) or not cal:
        return None
    rows = []
    for score, per in cal.items():
        for subset, c in per.items():
            hl = c.get("hosmer_lemeshow") or {}
            rows.append(
                (
                    score,
                    subset,
                    c.get("n"),
                    _num(c.get("slope")),
                    _num(c.get("intercept")),
                    _num(hl.get("statistic")),
                    hl.get("df"),
                    _num(hl.get("p")),
                    _num(c.get("brier")),
                )
            )
    return Table(
        "calibration_stats",
        "Calibration",
        "Calibration slope (logistic recalibration on logit p; 1 is ideal) and intercept "
        "(calibration-in-the-large, slope fixed at 1; 0 is ideal), fitted exactly on the pooled score grid; "
        "Hosmer-Lemeshow over risk groups of about equal size (groups = evaluation.calibration_bins; "
        "tied scores are never split), df = groups - 2; Brier score.",
        ("score", "subset", "n", "slope", "intercept", "hl_statistic", "hl_df", "hl_p", "brier"),
        tuple(rows),
        group_column="score",
    )


def _centre_rows(summary: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    rows = []
    for site, scores in (summary.get("centres") or {}).items():
        for score, per in scores.items():
            for subset, m in per.items():
                lo, hi = _ci(m.get("auc_ci"))
                rows.append(
                    (
                        site,
                        score,
                        subset,
                        m.get("n"),
                        m.get("n_pos"),
                        _num(m.get("auc")),
                        lo,
                        hi,
                        _num(m.get("sensitivity")),
                        _num(m.get("specificity")),
                        _num(m.get("ppv")),
                        _num(m.get("npv")),
                        _num(m.get("threshold")),
                    )
                )
    return rows


def _forest(summary: Mapping[str, Any], rows: list[tuple[Any, ...]]) -> Plot | None:
    pooled = summary.get("pooled_auc_ci") or {}
    scores = [s for s in _MAIN if any(r[1] == s for r in rows)]
    lines: list[tuple[str, float | None, float | None, float | None, bool]] = []
    for score in scores:
        for subset in ("internal", "external"):
            mine = [r for r in rows if r[1] == score and r[2] == subset]
            if not mine:
                continue
            for r in mine:
                lines.append((f"{_label(score)}, {r[0]} ({subset}, n={r[3]})", r[5], r[6], r[7], False))
            p = (pooled.get(score) or {}).get(subset) or {}
            lo, hi = _ci(p.get("ci"))
            lines.append((f"{_label(score)}, all centres ({subset})", _num(p.get("auc")), lo, hi, True))
    if not lines:
        return None
    return Plot(
        "forest_centres",
        "Per-centre AUCs (forest plot)",
        "AUC with 95% DeLong CI at each centre (internal: the centre's cross-validation test patients; "
        "external: all its patients), and all centres pooled (diamond).",
        png_bytes(forest_figure(lines, "AUC (95% DeLong CI)")),
    )


def _cross_site(summary: Mapping[str, Any]) -> list[Any]:
    """The model x site AUC matrix as a table and a heat map (``evaluation.cross_site``)."""
    cs = summary.get("cross_site")
    if not isinstance(cs, dict) or not cs.get("matrix"):
        return []
    sites = [str(s) for s in cs.get("sites", [])]
    models = [str(m) for m in cs.get("models", [])]
    matrix = cs["matrix"]
    rows = []
    values = np.full((len(models), len(sites)), np.nan)
    for i, m in enumerate(models):
        for j, s in enumerate(sites):
            cell = (matrix.get(m) or {}).get(s) or {}
            lo, hi = _ci(cell.get("auc_ci"))
            a = _num(cell.get("auc"))
            values[i, j] = np.nan if a is None else a
            rows.append((m, s, (cs.get("roles") or {}).get(s), cell.get("n"), a, lo, hi))
    fig = Figure(figsize=(1.6 + 1.1 * len(sites), 1.0 + 0.45 * len(models)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(values, vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
    for i in range(len(models)):
        for j in range(len(sites)):
            text = "-" if np.isnan(values[i, j]) else f"{values[i, j]:.3f}"
            ax.text(
                j, i, text, ha="center", va="center", color="w" if values[i, j] < 0.8 else "k", fontsize=8
            )
    ax.set_xticks(range(len(sites)), sites, fontsize=8)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.set_xlabel("evaluated at")
    fig.colorbar(im, ax=ax, label="AUC")
    kind = _label(str(cs.get("model", "")))
    return [
        Table(
            "cross_site_auc",
            "Cross-site evaluation",
            f"{kind}: each training site's local-only model and the global model evaluated at every site "
            "(training sites: their test patients of every fold; external sites: all their patients); "
            "AUC with 95% DeLong CI.",
            ("model", "evaluated_at", "role", "n", "auc", "auc_ci_low", "auc_ci_high"),
            tuple(rows),
            group_column="model",
        ),
        Plot(
            "cross_site_heatmap",
            "Cross-site AUC matrix",
            f"{kind}: AUC of each model (rows) at each site (columns).",
            png_bytes(fig),
        ),
    ]


def clinical_section(summary: Mapping[str, Any]) -> Section:
    """Operating points, calibration, per-centre table and forest plot."""
    blocks: list[Any] = []
    rule = summary.get("threshold_rule")
    if rule is None:
        blocks.append(
            Note(
                "This run's summary has no operating points, calibration or per-centre results "
                "(made before they were computed)."
            )
        )
        return Section("clinical", "Operating point, calibration, centres", tuple(blocks))
    blocks.append(Note(f"Threshold rule (evaluation.threshold): {rule}."))
    for t in (_threshold_table(summary), _calibration_table(summary)):
        if t is not None:
            blocks.append(t)
    rows = _centre_rows(summary)
    if rows:
        blocks.append(
            Table(
                "centres",
                "Per-centre results",
                "Every score at each centre, from that centre's own statistics, at the score's operating "
                "threshold; AUC with 95% DeLong CI.",
                (
                    "site",
                    "score",
                    "subset",
                    "n",
                    "n_pos",
                    "auc",
                    "auc_ci_low",
                    "auc_ci_high",
                    "sensitivity",
                    "specificity",
                    "ppv",
                    "npv",
                    "threshold",
                ),
                tuple(rows),
                group_column="site",
                collapsed=len(rows) > 30,
            )
        )
        forest = _forest(summary, rows)
        if forest is not None:
            blocks.append(forest)
    else:
        blocks.append(Note("No per-centre statistics in this run's summary."))
    blocks += _cross_site(summary)
    return Section("clinical", "Operating point, calibration, centres", tuple(blocks))
