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
failed rebuild leaves the previous report intact.  This module reads the
inputs, writes the run header and assembles the sections; the study's tables
are in ``common.report_tables``, the curves in ``common.report_figures``, the
federation's own record in ``common.report_federation`` and the clinical
metrics in ``common.clinical_report``, all formatting through
``common.report_format``.

Wording: the study's "internal" figures are means over the cross-validation
folds; "pooled" means all internal test patients of all folds taken together
(what the figures show, as one curve per score needs one patient set).  The
external test set is scored by the mean of the fold models' probabilities.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from common import report_format as fmt
from common.clinical_report import clinical_section
from common.gridstats import ClassHistogram
from common.protocol import ProtocolError, histograms_from_arrays
from common.report_federation import baselines_section, communication_section, training_section
from common.report_figures import figures_section, jsonable
from common.report_tables import table2_section, table3_section, table4_section
from common.reportdoc import Cell, Preformatted, Section, SectionBlocks, Table, write_report

__all__ = ["load_statistics", "load_summary", "render_report"]

log = logging.getLogger(__name__)

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


# -- header ----------------------------------------------------------------------------------------------
def _devices(devices: Mapping[str, Any]) -> str:
    """``centre1: cuda:0 (NVIDIA H100), amp bf16; centre2: cpu`` from summary.json's ``devices``."""
    parts = []
    for site, d in sorted(devices.items()):
        d = d if isinstance(d, dict) else {}
        where, name, amp = str(d.get("device", "?")), str(d.get("name", "")), str(d.get("amp", "off"))
        parts.append(f"{site}: {where}" + (f" ({name})" if name and name != where else "") + (f", amp {amp}" if amp != "off" else ""))
    return "; ".join(parts)


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
        ("wall time (plan)", fmt.duration(fmt.num(summary.get("wall_seconds")))),
        ("run finished (summary written)", finished.strftime("%Y-%m-%d %H:%M UTC")),
        ("report generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("score grid", f"{grid_bins} bins" if grid_bins else "no grid statistics"),
    ]
    if "wall_seconds_total" in summary:
        facts.insert(5, ("wall time (incl. start-up)", fmt.duration(fmt.num(summary["wall_seconds_total"]))))
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
    except ValueError as exc:  # raised by the value checks (fmt.num, _round_logs) on summary content
        raise ValueError(f"{run_dir / 'summary.json'}: {exc}") from exc
    title = f"Sacral tumour classification — {summary.get('plan', 'run')} run {run_dir.name}"
    final = run_dir / "report"
    staging = Path(tempfile.mkdtemp(prefix=".report-", dir=run_dir))
    try:
        write_report(staging, title, sections, jsonable(curves))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("report written to %s", final / "report.html")
    return final / "report.html"
