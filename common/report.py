"""One self-contained HTML report per run, rebuilt from what the server holds.

Inputs are the run folder's ``summary.json`` (metrics, selection, round logs,
communication; written by ``server.runner``) and ``stats/final.npz`` (the
pooled grid histograms per score and subset).  Neither holds per-patient data,
so the report never needs any: every curve comes from ``common.gridstats`` on
the summed histograms, every metric from the summary.

Output, in ``RUN_DIR/report/``: ``report.html`` (PNGs embedded as data URIs,
inline CSS, no script, no external resource: it can be mailed or archived as
one file), the PNGs, one CSV per table, ``tables.json`` (all tables) and
``curves.json`` (the plotted curves), laid out and written by
``common.reportdoc``.  The folder is written aside and swapped in, so a
failed rebuild leaves the previous report intact.

Wording: the study's "internal" figures are means over the cross-validation
folds; "pooled" means all internal test patients of all folds taken together
(what the figures show, as one curve per score needs one patient set).  The
external test set is scored by the mean of the fold models' probabilities.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from common.ensemble import ENSEMBLES
from common.gridstats import ClassHistogram, ScoreGrid, auc, calibration_curve, net_benefit, roc_curve
from common.plots import BarGroup, Panel, Series, bar_figure, confusion_figure, line_figure, png_bytes
from common.protocol import ProtocolError, histograms_from_arrays
from common.reportdoc import Cell, Plot, Preformatted, Section, SectionBlocks, Table, write_report

__all__ = ["SCORE_LABELS", "load_statistics", "load_summary", "render_report"]

log = logging.getLogger(__name__)

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
_SCORE_COLORS: Mapping[str, str] = MappingProxyType(
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
_EXPECTED_SINGLE = ("densenet2d", "densenet3d", "radiologist")
_OPTIONAL_SINGLE = ("radiomics",)
# Columns of the metric tables: all go to the CSV, the HTML shows the study's.
_METRIC_KEYS = ("auc", "f1", "precision", "recall", "sensitivity", "specificity", "accuracy", "brier")
_METRIC_COLUMNS = ("score", "subset", "n", "n_pos", *_METRIC_KEYS, "tn", "fp", "fn", "tp", "threshold")
_METRIC_HTML = ("score", "subset", "n", "n_pos", "auc", "f1", "precision", "recall", "specificity", "accuracy",
                "brier", "tn", "fp", "fn", "tp")
CALIBRATION_BINS = 10
_DCA_THRESHOLDS = np.arange(1, 100) / 100.0

# -- inputs -------------------------------------------------------------------------------------------
BESIDE_SUMMARY: Mapping[str, str | None] = MappingProxyType({"launch.json": None, "baselines.json": "baselines"})
"""Files the launching command writes beside ``summary.json``: merged at the top level, or under a key."""


def load_summary(run_dir: Path) -> dict[str, Any]:
    """``summary.json`` of a run folder with the files beside it, checked for the shape the report relies on."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no summary.json (is {run_dir} a finished run folder?)")
    try:
        summary = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(summary, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(summary).__name__}")
    for name, key in BESIDE_SUMMARY.items():  # written beside the summary by the launching command
        side = path.parent / name
        if side.is_file():
            try:
                extra = json.loads(side.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{side}: not valid JSON ({exc})") from exc
            if not isinstance(extra, dict):
                raise ValueError(f"{side}: expected a JSON object, got {type(extra).__name__}")
            for k, v in (extra if key is None else {key: extra}).items():
                summary.setdefault(k, v)
    for key in ("models", "sites", "rounds", "selection", "communication"):
        value = summary.get(key, {})
        if not isinstance(value, dict):
            raise ValueError(f"{path}: {key!r} must be an object, got {type(value).__name__}")
    for score, entry in summary.get("models", {}).items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: models[{score!r}] must be an object, got {type(entry).__name__}")
    return summary


def load_statistics(path: Path) -> dict[str, dict[str, ClassHistogram]]:
    """Pooled histograms ``{score: {subset: histogram}}`` from ``stats/final.npz``."""
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    try:
        hists = histograms_from_arrays(arrays, depth=2)
    except ProtocolError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    out: dict[str, dict[str, ClassHistogram]] = {}
    for (score, subset), h in sorted(hists.items()):
        out.setdefault(score, {})[subset] = h
    return out


# -- small helpers -------------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    """A summary number, ``None`` when absent or undefined (NaN travels as null)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number in the summary, got {value!r}")
    return None if math.isnan(value) else float(value)


def _cohort_value(value: Any) -> float | None:
    """A cohort reference figure: a number, or per-centre numbers whose ``all`` entry is the cohort's."""
    return _num(value.get("all")) if isinstance(value, Mapping) else _num(value)


def _label(score: str) -> str:
    return SCORE_LABELS.get(score, score)


def _is_ensemble(score: str, entry: Mapping[str, Any]) -> bool:
    return score in ENSEMBLES or "weights" in entry


def _ordered(scores: Iterable[str]) -> list[str]:
    """Known scores in the study's order, then any others alphabetically."""
    known = list(SCORE_LABELS)
    items = set(scores)
    return [s for s in known if s in items] + sorted(items - set(known))


def _fold_key(subset: str) -> int:
    return int(subset[4:]) if subset.startswith("fold") and subset[4:].isdigit() else 10**6


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d} (h:mm:ss)"


def _byte_unit(n: float) -> tuple[str, float]:
    """The binary unit that shows ``n`` bytes with one to four integer digits."""
    for unit, power in (("GiB", 3), ("MiB", 2), ("KiB", 1)):
        if n >= 1024**power:
            return unit, float(1024**power)
    return "bytes", 1.0


def _bytes(n: int) -> str:
    unit, scale = _byte_unit(n)
    return f"{n} bytes" if scale == 1.0 else f"{n / scale:.1f} {unit}"


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
        *(_num(m.get(k)) for k in _METRIC_KEYS),
        *cells,
        _num(m.get("threshold")),
    )


def _fold_mean_row(score: str, internal: Mapping[str, Any]) -> tuple[Cell, ...]:
    """Mean over folds of each metric (the study's internal figure); AUC as the runner computed it."""
    folds = [f for f in internal.get("folds", []) if isinstance(f, dict)]
    means: dict[str, float | None] = {}
    for k in _METRIC_KEYS:
        vals = [v for v in (_num(f.get(k)) for f in folds) if v is not None]
        means[k] = float(np.mean(vals)) if vals else None
    if "fold_mean_auc" in internal:
        means["auc"] = _num(internal["fold_mean_auc"])
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


def _devices(devices: Mapping[str, Any]) -> str:
    """``centre1: cuda:0 (NVIDIA H100), amp bf16; centre2: cpu`` from summary.json's ``devices``."""
    parts = []
    for site, d in sorted(devices.items()):
        d = d if isinstance(d, dict) else {}
        where, name, amp = str(d.get("device", "?")), str(d.get("name", "")), str(d.get("amp", "off"))
        parts.append(f"{site}: {where}" + (f" ({name})" if name and name != where else "") + (f", amp {amp}" if amp != "off" else ""))
    return "; ".join(parts)


# -- sections ----------------------------------------------------------------------------------------------
def _environment_text(env: Mapping[str, Any]) -> str:
    """One party's machine and libraries in one line."""

    def get(key: str) -> str:
        value = env.get(key)
        return "?" if value is None else str(value)

    return (
        f"{get('cpu')} ({get('cpu_capability')}, {get('cpu_count')} CPUs), {get('system')}; "
        f"torch {get('torch')} (BLAS {get('torch_blas')}, MKL {get('mkl')}, oneDNN {get('onednn')}, "
        f"{get('torch_threads')} threads); numpy {get('numpy')} ({get('numpy_blas')}); device {get('device')}; "
        f"flwr {get('flwr')}, monai {get('monai')}, python {get('python')}"
    )


def _environment_facts(environment: Any) -> list[tuple[Cell, ...]]:
    """What the numbers depend on besides config and seed, per party (identical parties in one row)."""
    if not isinstance(environment, dict):
        return []
    parties: dict[str, Mapping[str, Any]] = {}
    if isinstance(environment.get("server"), dict):
        parties["server"] = environment["server"]
    for site, env in (environment.get("sites") or {}).items():
        if isinstance(env, dict) and env:
            parties[str(site)] = env
    groups: dict[str, list[str]] = {}
    for party, env in parties.items():
        groups.setdefault(_environment_text(env), []).append(party)
    return [(f"machine ({', '.join(names)})", text) for text, names in groups.items()]


def header_section(summary: Mapping[str, Any], run_dir: Path, grid_bins: int | None) -> Section:
    """Plan, configuration, seed, machines and libraries, sites with roles and counts, time."""
    b = SectionBlocks()
    finished = datetime.fromtimestamp((run_dir / "summary.json").stat().st_mtime, tz=timezone.utc)
    facts: list[tuple[Cell, ...]] = [
        ("plan", summary.get("plan")),
        ("configuration", summary.get("config")),
        ("configuration digest", summary.get("config_digest")),
        ("run folder", run_dir.name),
        ("wall time (plan)", _duration(_num(summary.get("wall_seconds")))),
        ("run finished (summary written)", finished.strftime("%Y-%m-%d %H:%M UTC")),
        ("report generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("score grid", f"{grid_bins} bins" if grid_bins else "no grid statistics"),
    ]
    if "wall_seconds_total" in summary:
        facts.insert(5, ("wall time (incl. start-up)", _duration(_num(summary["wall_seconds_total"]))))
    if isinstance(summary.get("devices"), dict) and summary["devices"]:
        facts.insert(4, ("devices (as each site reported)", _devices(summary["devices"])))
    if "seed" in summary:
        seed = summary.get("seed")
        if "train_seed" in summary:  # the splits' seed and the training's (``train.seed``)
            seed = f"splits {seed}, training {summary.get('train_seed')}"
        facts.insert(3, ("seed", seed))
    facts += _environment_facts(summary.get("environment"))
    b.add(Table("run", "Run", "What was run, where and when.", ("item", "value"), tuple(facts)))
    sites = summary.get("sites", {})
    rows = tuple(
        (site, info.get("role"), info.get("patients"), info.get("benign"), info.get("malignant"))
        for site, info in sites.items()
    )
    b.add(Table("sites", "Sites", "Each site's role and patient counts as the site reported them.",
                ("site", "role", "patients", "benign", "malignant"), rows))
    unavailable = summary.get("unavailable_sites") or {}
    if isinstance(unavailable, dict):
        for site, reason in unavailable.items():
            b.note(f"Site {site} was unavailable: {reason}")
    elif unavailable:
        b.note(f"Unavailable sites: {', '.join(map(str, unavailable))}")
    config = run_dir / "config.yaml"
    if config.is_file():
        b.add(Preformatted("Configuration (config.yaml)", config.read_text()))
    return Section("run", "Run", tuple(b.blocks))


def table2_section(summary: Mapping[str, Any]) -> Section:
    """Single scores: per fold, mean of folds, pooled internal, external."""
    b = SectionBlocks()
    models = summary.get("models", {})
    singles = _ordered(s for s, e in models.items() if not _is_ensemble(s, e))
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
            b.note(f"{_label(s)} ({s}): not in this run (disabled, or no site sent it).")
    return Section("table2", "Table 2 — single scores", tuple(b.blocks))


def table4_section(summary: Mapping[str, Any]) -> Section:
    """Ensembles: fitted weights, validation AUC, metrics; DeLong comparisons when present."""
    b = SectionBlocks()
    models = summary.get("models", {})
    ensembles = _ordered(s for s, e in models.items() if _is_ensemble(s, e))
    if not ensembles:
        b.note("No ensemble in this run.")
    weight_rows = []
    for s in ensembles:
        weights = models[s].get("weights") or {}
        text = ", ".join(f"{m} {float(w):.2f}" for m, w in weights.items()) if isinstance(weights, dict) else str(weights)
        weight_rows.append((s, text, _num(models[s].get("val_auc"))))
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
                got = _num(((models[s].get(subset) or {}).get("pooled") or {}).get("auc"))
                members = {m: _num(((models.get(m) or {}).get(subset) or {}).get("pooled", {}).get("auc"))
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
        return _num(value[0]), _num(value[1])
    return None, None


def _delong_table(delong: Mapping[str, Any]) -> Table:
    rows = []
    for name, d in delong.items():
        lo1, hi1 = _pair(d.get("ci1"))
        lo2, hi2 = _pair(d.get("ci2"))
        rows.append((name, _num(d.get("auc1")), lo1, hi1, _num(d.get("auc2")), lo2, hi2,
                     _num(d.get("z")), _num(d.get("p")), d.get("n_pos"), d.get("n_neg")))
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
        p = _num(orr.get("p"))
        patients, readers = orr.get("patients"), len(orr.get("readers") or []) or None
        for arm, label in (("without_ai", "without AI"), ("with_ai", "with AI")):
            m = arms.get(arm) if isinstance(arms, dict) else None
            if not isinstance(m, dict):
                b.note(f"Reader study, {tier}: no '{arm}' session.")
                continue
            mean_auc = _num(((orr.get("mean_auc") or {}).get(arm) or {}).get("auc"))
            rows.append((tier, label, patients, readers, m.get("n"), mean_auc, *(_num(m.get(k)) for k in keys),
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
        or_rows.append((group, r.get("method"), r.get("patients"), len(r.get("readers") or []), _num(wo.get("auc")),
                        *_pair(wo.get("ci")), _num(wi.get("auc")), *_pair(wi.get("ci")), _num(d.get("estimate")),
                        lo, hi, _num(r.get("F")), _num(r.get("df2")), _num(r.get("p"))))
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


# -- curves ----------------------------------------------------------------------------------------------
def evaluation_sets(stats: Mapping[str, Mapping[str, ClassHistogram]]) -> dict[str, dict[str, ClassHistogram]]:
    """``{"internal pooled": {score: h}, "external": {score: h}}``: folds summed for the internal set."""
    out: dict[str, dict[str, ClassHistogram]] = {"internal pooled": {}, "external": {}}
    for score in _ordered(stats):
        subsets = stats[score]
        folds = sorted((s for s in subsets if s.startswith("fold")), key=_fold_key)
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


def _jsonable(curves: Mapping[str, Any]) -> Any:
    if isinstance(curves, Mapping):
        return {k: _jsonable(v) for k, v in curves.items()}
    if isinstance(curves, np.ndarray):
        return _listed(curves) if curves.dtype.kind == "f" else curves.tolist()
    if isinstance(curves, float):
        return None if not math.isfinite(curves) else curves
    return curves


def _roc_panel(subset: str, curves: Mapping[str, Mapping[str, Any]]) -> Panel:
    series = [
        Series(f"{_label(s)} (AUC {c['auc']:.3f})", c["roc"]["fpr"], c["roc"]["tpr"], _SCORE_COLORS.get(s))
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
            series.append(Series(_label(s), cal["mean_predicted"][ok], cal["observed"][ok],
                                 _SCORE_COLORS.get(s), marker="o"))
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
        series.append(Series(_label(s), d["threshold"], d["model"], _SCORE_COLORS.get(s)))
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
    scores = _ordered(models)
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
    fig = confusion_figure(rows, [_label(s) for s in scores], matrices)
    return Plot("confusion_matrices", "Confusion matrices",
                f"[[TN, FP], [FN, TP]] at threshold {thr}, pooled over all patients of the set "
                "(internal: all test folds together); shading is the row share.", png_bytes(fig))


# -- training, participation, communication ---------------------------------------------------------
def _round_logs(summary: Mapping[str, Any]) -> dict[str, dict[int, list[Mapping[str, Any]]]]:
    """``{model: {fold: [round log, ...]}}`` from the ``"<model>/fold<k>"`` keys."""
    out: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for key, logs in summary.get("rounds", {}).items():
        model, _, fold = key.rpartition("/fold")
        if not model or not fold.isdigit():
            raise ValueError(f"rounds key {key!r} is not '<model>/fold<k>'")
        out.setdefault(model, {})[int(fold)] = sorted(logs, key=lambda r: int(r.get("round", 0)))
    return out


def _rounds_plot(summary: Mapping[str, Any], logs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]]) -> Plot:
    selection = summary.get("selection", {})
    panels = []
    for model in _ordered(logs):
        series: list[Series] = []
        for fold, rounds in sorted(logs[model].items()):
            x = [int(r["round"]) for r in rounds]
            y = [np.nan if _num(r.get("val_auc")) is None else float(r["val_auc"]) for r in rounds]
            series.append(Series(f"fold {fold}", x, y, f"C{fold % 10}", marker="."))
        kept = [s for s in (selection.get(model) or {}).values()
                if isinstance(s, dict) and _num(s.get("val_auc")) is not None]
        if kept:
            series.append(Series("selected round", [s["round"] for s in kept], [s["val_auc"] for s in kept],
                                 "black", "", marker="o"))
        panels.append(Panel(_label(model), series, "federated round", "pooled validation AUC", ylim=(0, 1.02),
                            integer_x=True))
    return Plot("validation_auc_per_round", "Validation AUC per round",
                "Validation AUC after each federated round, pooled over all training sites' validation patients "
                "of the fold (one line per fold); black dots: the round kept for testing.",
                png_bytes(line_figure(panels)))


def _loss_plot(logs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]]) -> Plot | None:
    panels = []
    for model in _ordered(logs):
        series = []
        for fold, rounds in sorted(logs[model].items()):
            pts = [(int(r["round"]), float(r["train_loss"])) for r in rounds if _num(r.get("train_loss")) is not None]
            if pts:
                series.append(Series(f"fold {fold}", [p[0] for p in pts], [p[1] for p in pts], f"C{fold % 10}",
                                     marker="."))
        if series:
            panels.append(Panel(_label(model), series, "federated round", "training loss", integer_x=True))
    if not panels:
        return None
    return Plot("training_loss_per_round", "Training loss per round",
                "Mean training loss of the updates kept in each round, weighted by the sites' training patients.",
                png_bytes(line_figure(panels, panel_height=3.4)))


def _dropped_text(dropped: Any) -> str:
    if isinstance(dropped, dict):
        return "; ".join(f"{site}: {reason}" for site, reason in dropped.items())
    return ", ".join(map(str, dropped or []))


def _participation_tables(
    summary: Mapping[str, Any], logs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]]
) -> tuple[Table, Table]:
    per_round = []
    trained: Counter[str] = Counter()
    evaluated: Counter[str] = Counter()
    dropped: Counter[str] = Counter()
    missing: Counter[str] = Counter()
    reasons: dict[str, Counter[str]] = {}
    total = 0
    for model in _ordered(logs):
        for fold, rounds in sorted(logs[model].items()):
            for r in rounds:
                total += 1
                trained.update(r.get("trained") or [])
                evaluated.update(r.get("evaluated") or [])
                missing.update(r.get("missing") or [])
                drops = r.get("dropped") or {}
                items = drops.items() if isinstance(drops, dict) else ((s, "") for s in drops)
                for site, reason in items:
                    dropped[site] += 1
                    reasons.setdefault(site, Counter())[str(reason)] += 1
                per_round.append((
                    model, fold, r.get("round"), ", ".join(r.get("trained") or []),
                    ", ".join(r.get("evaluated") or []), _dropped_text(drops), ", ".join(r.get("missing") or []),
                    _num(r.get("val_auc")), r.get("val_n"), _num(r.get("train_loss")), _num(r.get("seconds")),
                ))
    sites = summary.get("sites", {})
    names = [s for s in sites if (sites[s] or {}).get("role") != "external"]
    names += sorted((set(trained) | set(evaluated) | set(dropped) | set(missing)) - set(names))
    site_rows = tuple(
        (s, total, trained[s], evaluated[s], dropped[s], missing[s],
         "; ".join(f"{reason} (×{n})" for reason, n in (reasons.get(s) or Counter()).most_common()))
        for s in names
    )
    sites_table = Table(
        "participation_sites", "Participation per site",
        "Over all federated rounds of all models and folds: rounds in which each training site trained, sent "
        "validation statistics, was dropped (with the reasons) or did not answer.",
        ("site", "rounds", "trained", "evaluated", "dropped", "missing", "drop_reasons"), site_rows,
    )
    rounds_table = Table(
        "participation_rounds", "Participation per round",
        "Every round: the sites that trained, evaluated, were dropped (site: reason) or did not answer; pooled "
        "validation AUC and patients; mean training loss; seconds.",
        ("model", "fold", "round", "trained", "evaluated", "dropped", "missing", "val_auc", "val_n",
         "train_loss", "seconds"),
        tuple(per_round), collapsed=True, group_column="fold",
    )
    return sites_table, rounds_table


def training_section(summary: Mapping[str, Any]) -> Section:
    """Validation AUC and loss per round, participation."""
    b = SectionBlocks()
    logs = _round_logs(summary)
    if not logs:
        b.note("No federated round logs in this run (nothing trained, or training was resumed from a finished run).")
        return Section("training", "Federated training", tuple(b.blocks))
    b.add(_rounds_plot(summary, logs))
    for model, folds in sorted((summary.get("selection") or {}).items()):
        for fold, sel in sorted((folds or {}).items(), key=lambda t: str(t[0])):
            if isinstance(sel, dict) and sel.get("guard"):  # server.foldguard
                b.note(f"{_label(model)} fold {fold}: selected model {sel['guard']}; left out of the external average.")
    loss = _loss_plot(logs)
    if loss is not None:
        b.add(loss)
    for table in _participation_tables(summary, logs):
        b.add(table)
    return Section("training", "Federated training", tuple(b.blocks))


def communication_section(summary: Mapping[str, Any]) -> Section:
    """Bytes each site sent and received over the whole run."""
    b = SectionBlocks()
    comm = summary.get("communication", {})
    if not comm:
        b.note("No communication counts in this run.")
        return Section("communication", "Communication", tuple(b.blocks))
    sites = summary.get("sites", {})
    counts = {s: (int(c.get("bytes_sent", 0)), int(c.get("bytes_received", 0))) for s, c in comm.items()}
    rows = tuple(
        (s, (sites.get(s) or {}).get("role"), sent, received, _bytes(sent), _bytes(received))
        for s, (sent, received) in counts.items()
    )
    b.add(Table("communication", "Communication per site",
                "Message payload bytes each site sent to and received from the server over the whole run.",
                ("site", "role", "bytes_sent", "bytes_received", "sent", "received"), rows))
    unit, scale = _byte_unit(max(max(v) for v in counts.values()))
    groups = [BarGroup(s, [sent / scale, received / scale]) for s, (sent, received) in counts.items()]
    b.add(Plot("communication", "Communication per site",
               f"{unit} sent to and received from the server per site, whole run.",
               png_bytes(bar_figure(groups, ["sent by site", "received by site"], unit, ["#4c72b0", "#dd8452"]))))
    return Section("communication", "Communication", tuple(b.blocks))


# -- baselines and cohort --------------------------------------------------------------------------
def _auc_triple(entry: Mapping[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """Internal fold-mean AUC, internal pooled AUC, external AUC of one model entry."""
    entry = entry or {}
    internal = entry.get("internal") or {}
    external = entry.get("external") or {}
    return (
        _num(internal.get("fold_mean_auc")),
        _num((internal.get("pooled") or {}).get("auc")),
        _num((external.get("pooled") or {}).get("auc")),
    )


def baselines_section(summary: Mapping[str, Any]) -> Section:
    """Federated vs pooled (centralised) vs local-only training, and the cohort's reference AUCs."""
    b = SectionBlocks()
    baselines = summary.get("baselines")
    cohort = summary.get("cohort")
    if not isinstance(baselines, dict) or not baselines:
        b.note("No pooled or local-only baselines in this run.")
        baselines = {}
    models = summary.get("models", {})
    pooled = baselines.get("pooled") or {}
    local = baselines.get("local") or {}
    local_mean = baselines.get("local_mean") or {}
    scores = _ordered(set(pooled) | set(local_mean) | {s for per in local.values() for s in per})
    rows: list[tuple[Cell, ...]] = []
    for s in scores:
        rows.append((s, "federated", None, *_auc_triple(models.get(s))))
        if s in pooled:
            rows.append((s, "pooled", None, *_auc_triple(pooled[s])))
        for site, per in local.items():
            if s in per:
                rows.append((s, "local", site, *_auc_triple(per[s])))
        if s in local_mean:
            rows.append((s, "local mean", None, _num((local_mean[s] or {}).get("internal_auc")), None, None))
    if rows:
        b.add(Table("baselines", "Federated vs pooled vs local-only",
                    "AUC of the same models trained federated, on all patients pooled in one place, and at each "
                    "site alone; internal = mean of folds and all test folds pooled.",
                    ("score", "training", "site", "internal_fold_mean_auc", "internal_pooled_auc", "external_auc"),
                    tuple(rows), group_column="score"))
        b.add(_baselines_plot(scores, models, pooled, local, local_mean, cohort))
    if isinstance(cohort, dict) and cohort:
        b.add(Table("cohort", "Synthetic cohort reference",
                    "Reference values of the synthetic cohort (e.g. the AUC of its generating truth, the oracle).",
                    ("quantity", "value"),
                    tuple((k, _cohort_value(v) if k.endswith("_auc") else str(v)) for k, v in cohort.items())))
    return Section("baselines", "Baselines", tuple(b.blocks))


def _baselines_plot(
    scores: Sequence[str],
    models: Mapping[str, Any],
    pooled: Mapping[str, Any],
    local: Mapping[str, Mapping[str, Any]],
    local_mean: Mapping[str, Any],
    cohort: Any,
) -> Plot:
    nan = float("nan")

    def v(x: float | None) -> float:
        return nan if x is None else x

    groups = [
        BarGroup(
            _label(s),
            [v(_auc_triple(models.get(s))[0]), v(_auc_triple(pooled.get(s))[0]),
             v(_num((local_mean.get(s) or {}).get("internal_auc")))],
            [v(_auc_triple(per[s])[0]) for per in local.values() if s in per],
        )
        for s in scores
    ]
    hlines: list[tuple[str, float]] = []
    if isinstance(cohort, dict):
        refs = {k: _cohort_value(val) for k, val in cohort.items() if k.endswith("_auc")}
        hlines = [(f"cohort {k.removesuffix('_auc')}", val) for k, val in refs.items() if val is not None]
    fig = bar_figure(groups, ["federated", "pooled", "local-only (mean of sites)"], "internal AUC (mean of folds)",
                     ["#4c72b0", "#55a868", "#c44e52"], hlines, (0, 1.05), points_label="local-only, each site")
    return Plot("baselines", "Federated vs pooled vs local-only AUC",
                "Internal AUC, mean of folds, per training regime; dots: each site trained alone; dashed lines: "
                "the synthetic cohort's reference AUCs when known.", png_bytes(fig))


def render_report(run_dir: Path) -> Path:
    """Build ``RUN_DIR/report/`` from ``summary.json`` and ``stats/final.npz``; return the HTML's path.

    A missing score, subset, statistics file or optional summary section is
    skipped with a note in the report, never an error.  The folder is built
    aside and swapped in, so a failure keeps the previous report.
    """
    run_dir = Path(run_dir)
    summary = load_summary(run_dir)
    stats_path = run_dir / "stats" / "final.npz"
    stats = load_statistics(stats_path) if stats_path.is_file() else None
    if stats is None:
        log.warning("%s not found: the report has no curves", stats_path)
    bins = next((h.bins for subsets in (stats or {}).values() for h in subsets.values()), None)
    try:
        from common.clinical_report import clinical_section  # it builds on this module's blocks

        figures, curves = figures_section(summary, stats)
        sections = [
            header_section(summary, run_dir, bins),
            table2_section(summary),
            table4_section(summary),
            table3_section(summary),
            clinical_section(summary),
            figures,
            training_section(summary),
            baselines_section(summary),
            communication_section(summary),
        ]
    except ValueError as exc:  # raised by the value checks (_num, _round_logs) on summary content
        raise ValueError(f"{run_dir / 'summary.json'}: {exc}") from exc
    title = f"Sacral tumour classification — {summary.get('plan', 'run')} run {run_dir.name}"
    final = run_dir / "report"
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
    try:
        write_report(staging, title, sections, _jsonable(curves))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("report written to %s", final / "report.html")
    return final / "report.html"
