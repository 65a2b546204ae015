"""The study's tables (2: single scores, 3: reader study, 4: ensembles and DeLong) from ``summary.json``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common import report_format as fmt
from common.reportdoc import Cell, Section, SectionBlocks, Table

_EXPECTED_SINGLE = ("densenet2d", "densenet3d", "radiologist")
_OPTIONAL_SINGLE = ("radiomics",)
# Columns of the metric tables: all go to the CSV, the HTML shows the study's.
_METRIC_KEYS = ("auc", "f1", "precision", "recall", "sensitivity", "specificity", "accuracy", "brier")
_METRIC_COLUMNS = ("score", "subset", "n", "n_pos", *_METRIC_KEYS, "tn", "fp", "fn", "tp", "threshold")
_METRIC_HTML = ("score", "subset", "n", "n_pos", "auc", "f1", "precision", "recall", "specificity", "accuracy",
                "brier", "tn", "fp", "fn", "tp")


def _metric_row(score: str, subset: str, m: Mapping[str, Any] | None) -> tuple[Cell, ...]:
    """One CSV row of a metrics dict (``Metrics.to_dict`` shape); absent values are empty."""
    m = m or {}
    cm = m.get("confusion_matrix")
    cells: list[Cell] = [None] * 4
    if isinstance(cm, list) and len(cm) == 2 and all(isinstance(r, list) and len(r) == 2 for r in cm):
        cells = [int(cm[0][0]), int(cm[0][1]), int(cm[1][0]), int(cm[1][1])]
    n, n_pos = m.get("n"), m.get("n_pos")
    return (
        score,
        subset,
        int(n) if n is not None else None,
        int(n_pos) if n_pos is not None else None,
        *(fmt.num(m.get(k)) for k in _METRIC_KEYS),
        *cells,
        fmt.num(m.get("threshold")),
    )


def _fold_mean_row(score: str, internal: Mapping[str, Any]) -> tuple[Cell, ...]:
    """Mean over folds of each metric (the study's internal figure); AUC as the runner computed it."""
    folds = [f for f in internal.get("folds", []) if isinstance(f, dict)]
    means: dict[str, float | None] = {}
    for k in _METRIC_KEYS:
        vals = [v for v in (fmt.num(f.get(k)) for f in folds) if v is not None]
        means[k] = float(np.mean(vals)) if vals else None
    if "fold_mean_auc" in internal:
        means["auc"] = fmt.num(internal["fold_mean_auc"])
    return (score, "internal: mean of folds", None, None, *(means[k] for k in _METRIC_KEYS),
            None, None, None, None, None)


def _metric_rows(score: str, entry: Mapping[str, Any]) -> list[tuple[Cell, ...]]:
    """Per fold, mean of folds, pooled internal, external: the rows of one score."""
    rows: list[tuple[Cell, ...]] = []
    internal = entry.get("internal")
    if isinstance(internal, dict):
        for k, fm in enumerate(internal.get("folds", [])):
            rows.append(_metric_row(score, f"internal: fold {k}", fm))
        rows.append(_fold_mean_row(score, internal))
        rows.append(_metric_row(score, "internal: pooled", internal.get("pooled")))
    external = entry.get("external")
    if isinstance(external, dict):
        rows.append(_metric_row(score, "external", external.get("pooled")))
    return rows


def table2_section(summary: Mapping[str, Any]) -> Section:
    """Single scores: per fold, mean of folds, pooled internal, external."""
    b = SectionBlocks()
    models = summary.get("models", {})
    singles = fmt.ordered(s for s, e in models.items() if not fmt.is_ensemble(s, e))
    rows = [r for s in singles for r in _metric_rows(s, models[s])]
    b.add(Table(
        "table2_single_scores",
        "Table 2. Deep-learning models and radiologist: internal and external test",
        "Internal = the cross-validation test folds: one row per fold, their mean (the study's "
        "internal figure) and all internal test patients pooled; external = the external sites' patients, "
        "scored by the mean of the fold models' probabilities.",
        _METRIC_COLUMNS, tuple(rows), _METRIC_HTML, group_column="score",
    ))
    for s in (*_EXPECTED_SINGLE, *_OPTIONAL_SINGLE):
        if s not in models:
            b.note(f"{fmt.score_label(s)} ({s}): not in this run (disabled, or no site sent it).")
    return Section("table2", "Table 2 — single scores", tuple(b.blocks))


def table4_section(summary: Mapping[str, Any]) -> Section:
    """Ensembles: fitted weights, validation AUC, metrics; DeLong comparisons when present."""
    b = SectionBlocks()
    models = summary.get("models", {})
    ensembles = fmt.ordered(s for s, e in models.items() if fmt.is_ensemble(s, e))
    if not ensembles:
        b.note("No ensemble in this run.")
    weight_rows = []
    for s in ensembles:
        weights = models[s].get("weights") or {}
        text = ", ".join(f"{m} {float(w):.2f}" for m, w in weights.items()) if isinstance(weights, dict) else str(weights)
        weight_rows.append((s, text, fmt.num(models[s].get("val_auc"))))
    if weight_rows:
        b.add(Table(
            "table4_weights",
            "Table 4a. Ensemble weights",
            "Weights of the members' probabilities, chosen on a simplex grid to maximise the validation AUC "
            "pooled over all training sites and folds.",
            ("score", "weights", "val_auc"), tuple(weight_rows),
        ))
        for s in ensembles:  # weights were fitted on validation; say when the test disagrees
            for subset in ("internal", "external"):
                got = fmt.num(((models[s].get(subset) or {}).get("pooled") or {}).get("auc"))
                members = {m: fmt.num(((models.get(m) or {}).get(subset) or {}).get("pooled", {}).get("auc"))
                           for m in (models[s].get("weights") or {})}
                known = {m: a for m, a in members.items() if a is not None}
                if got is not None and known and got < max(known.values()):
                    best = max(known, key=lambda m: known[m])
                    b.note(f"{s} scores below its best member on {subset} test: AUC {got:.3f} < {best} "
                           f"{known[best]:.3f}.")
        rows = [r for s in ensembles for r in _metric_rows(s, models[s])]
        b.add(Table(
            "table4_ensembles",
            "Table 4b. Ensembles: internal and external test",
            "Rows as in Table 2: per fold, mean of folds (the study's internal figure), internal pooled, external.",
            _METRIC_COLUMNS, tuple(rows), _METRIC_HTML, group_column="score",
        ))
    delong = summary.get("delong")
    if isinstance(delong, dict) and delong:
        b.add(_delong_table(delong))
    else:
        b.note("No DeLong comparisons in this run's summary.")
    return Section("table4", "Table 4 — ensembles", tuple(b.blocks))


def _pair(value: Any) -> tuple[float | None, float | None]:
    if isinstance(value, list | tuple) and len(value) == 2:
        return fmt.num(value[0]), fmt.num(value[1])
    return None, None


def _delong_table(delong: Mapping[str, Any]) -> Table:
    rows = []
    for name, d in delong.items():
        lo1, hi1 = _pair(d.get("ci1"))
        lo2, hi2 = _pair(d.get("ci2"))
        rows.append((name, fmt.num(d.get("auc1")), lo1, hi1, fmt.num(d.get("auc2")), lo2, hi2,
                     fmt.num(d.get("z")), fmt.num(d.get("p")), d.get("n_pos"), d.get("n_neg")))
    return Table(
        "table4_delong",
        "Table 4c. DeLong tests",
        "Two correlated AUCs on the same patients (DeLong 1988, from pooled grid statistics): AUCs with "
        "confidence intervals, z and two-sided p.",
        ("comparison", "auc1", "ci1_low", "ci1_high", "auc2", "ci2_low", "ci2_high", "z", "p", "n_pos", "n_neg"),
        tuple(rows),
    )


def table3_section(summary: Mapping[str, Any]) -> Section:
    """Reader study per tier, without and with the AI's prediction."""
    b = SectionBlocks()
    study = summary.get("reader_study")
    if not isinstance(study, dict) or not study:
        b.note("No reader study in this run.")
        return Section("table3", "Table 3 — reader study", tuple(b.blocks))
    keys = ("auc", "sensitivity", "specificity", "precision", "accuracy", "mae")
    raw = study.get("mrmc")
    mrmc: dict[str, Any] = raw if isinstance(raw, dict) else {}
    rows = []
    for tier, arms in study.items():
        if tier == "mrmc":
            continue
        found = mrmc.get(tier)
        orr: dict[str, Any] = found if isinstance(found, dict) else {}
        p = fmt.num(orr.get("p"))
        patients, readers = orr.get("patients"), len(orr.get("readers") or []) or None
        for arm, label in (("without_ai", "without AI"), ("with_ai", "with AI")):
            m = arms.get(arm) if isinstance(arms, dict) else None
            if not isinstance(m, dict):
                b.note(f"Reader study, {tier}: no '{arm}' session.")
                continue
            mean_auc = fmt.num(((orr.get("mean_auc") or {}).get(arm) or {}).get("auc"))
            rows.append((tier, label, patients, readers, m.get("n"), mean_auc, *(fmt.num(m.get(k)) for k in keys),
                         p if arm == "with_ai" else None))
    b.add(Table(
        "table3_reader_study",
        "Table 3. Reader study on the external set",
        "Each tier's readers without and with the 3D model's prediction: patients and readers of the "
        "multi-reader analysis, readings = patients x readers; reader_mean_auc = the readers' mean AUC; the other "
        "metrics pool every reading (descriptive); MAE = mean |probability − label|; or_p = Obuchowski-Rockette "
        "test of with vs without AI (random readers and cases, DeLong covariances, Hillis df; fixed readers "
        "when a tier has one reader).",
        ("tier", "session", "patients", "readers", "readings", "reader_mean_auc", *keys, "or_p"), tuple(rows),
        group_column="tier",
    ))
    or_rows = []
    for group, r in mrmc.items():
        if not isinstance(r, dict):
            continue
        if "skipped" in r:
            b.note(f"Multi-reader analysis, {group}: skipped: {r['skipped']}.")
            continue
        ma = r.get("mean_auc") or {}
        d = r.get("difference") or {}
        lo, hi = _pair(d.get("ci"))
        wo, wi = ma.get("without_ai") or {}, ma.get("with_ai") or {}
        or_rows.append((group, r.get("method"), r.get("patients"), len(r.get("readers") or []), fmt.num(wo.get("auc")),
                        *_pair(wo.get("ci")), fmt.num(wi.get("auc")), *_pair(wi.get("ci")), fmt.num(d.get("estimate")),
                        lo, hi, fmt.num(r.get("F")), fmt.num(r.get("df2")), fmt.num(r.get("p"))))
    if or_rows:
        b.add(Table(
            "table3_mrmc",
            "Table 3b. Multi-reader multi-case analysis (Obuchowski-Rockette)",
            "Reader-averaged AUC without and with AI with 95% CIs, their difference (with − without) with its 95% "
            "CI, F, denominator df and p; RRRC = random readers and cases, FRRC = fixed readers.",
            ("group", "method", "patients", "readers", "auc_without_ai", "ci_low_without", "ci_high_without",
             "auc_with_ai", "ci_low_with", "ci_high_with", "difference", "diff_ci_low", "diff_ci_high", "F", "df2",
             "p"), tuple(or_rows),
        ))
    return Section("table3", "Table 3 — reader study", tuple(b.blocks))
