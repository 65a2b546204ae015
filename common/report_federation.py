"""How the federation ran and compares: rounds, participation, communication, baselines and cohort."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common import report_format as fmt
from common.plots import BarGroup, Panel, Series, bar_figure, line_figure, png_bytes
from common.reportdoc import Cell, Plot, Section, SectionBlocks, Table


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
    for model in fmt.ordered(logs):
        series: list[Series] = []
        for fold, rounds in sorted(logs[model].items()):
            x = [int(r["round"]) for r in rounds]
            y = [np.nan if fmt.num(r.get("val_auc")) is None else float(r["val_auc"]) for r in rounds]
            series.append(Series(f"fold {fold}", x, y, f"C{fold % 10}", marker="."))
        kept = [s for s in (selection.get(model) or {}).values()
                if isinstance(s, dict) and fmt.num(s.get("val_auc")) is not None]
        if kept:
            series.append(Series("selected round", [s["round"] for s in kept], [s["val_auc"] for s in kept],
                                 "black", "", marker="o"))
        panels.append(Panel(fmt.score_label(model), series, "federated round", "pooled validation AUC", ylim=(0, 1.02),
                            integer_x=True))
    return Plot("validation_auc_per_round", "Validation AUC per round",
                "Validation AUC after each federated round, pooled over all training sites' validation patients "
                "of the fold (one line per fold; rounds before evaluation.select_from_round do not compete and are not "
                "validated); black dots: the round kept for testing.",
                png_bytes(line_figure(panels)))


def _loss_plot(logs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]]) -> Plot | None:
    panels = []
    for model in fmt.ordered(logs):
        series = []
        for fold, rounds in sorted(logs[model].items()):
            pts = [(int(r["round"]), float(r["train_loss"])) for r in rounds if fmt.num(r.get("train_loss")) is not None]
            if pts:
                series.append(Series(f"fold {fold}", [p[0] for p in pts], [p[1] for p in pts], f"C{fold % 10}",
                                     marker="."))
        if series:
            panels.append(Panel(fmt.score_label(model), series, "federated round", "training loss", integer_x=True))
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
    for model in fmt.ordered(logs):
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
                    fmt.num(r.get("val_auc")), r.get("val_n"), fmt.num(r.get("train_loss")), fmt.num(r.get("seconds")),
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
                b.note(f"{fmt.score_label(model)} fold {fold}: selected model {sel['guard']}; left out of the external average.")
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
        (s, (sites.get(s) or {}).get("role"), sent, received, fmt.size_text(sent), fmt.size_text(received))
        for s, (sent, received) in counts.items()
    )
    b.add(Table("communication", "Communication per site",
                "Message payload bytes each site sent to and received from the server over the whole run.",
                ("site", "role", "bytes_sent", "bytes_received", "sent", "received"), rows))
    unit, scale = fmt.byte_unit(max(max(v) for v in counts.values()))
    groups = [BarGroup(s, [sent / scale, received / scale]) for s, (sent, received) in counts.items()]
    b.add(Plot("communication", "Communication per site",
               f"{unit} sent to and received from the server per site, whole run.",
               png_bytes(bar_figure(groups, ["sent by site", "received by site"], unit, ["#4c72b0", "#dd8452"]))))
    return Section("communication", "Communication", tuple(b.blocks))


def _auc_triple(entry: Mapping[str, Any] | None) -> tuple[float | None, float | None, float | None]:
    """Internal fold-mean AUC, internal pooled AUC, external AUC of one model entry."""
    entry = entry or {}
    internal = entry.get("internal") or {}
    external = entry.get("external") or {}
    return (
        fmt.num(internal.get("fold_mean_auc")),
        fmt.num((internal.get("pooled") or {}).get("auc")),
        fmt.num((external.get("pooled") or {}).get("auc")),
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
    scores = fmt.ordered(set(pooled) | set(local_mean) | {s for per in local.values() for s in per})
    rows: list[tuple[Cell, ...]] = []
    for s in scores:
        rows.append((s, "federated", None, *_auc_triple(models.get(s))))
        if s in pooled:
            rows.append((s, "pooled", None, *_auc_triple(pooled[s])))
        for site, per in local.items():
            if s in per:
                rows.append((s, "local", site, *_auc_triple(per[s])))
        if s in local_mean:
            rows.append((s, "local mean", None, fmt.num((local_mean[s] or {}).get("internal_auc")), None, None))
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
                    tuple((k, fmt.cohort_value(v) if k.endswith("_auc") else str(v)) for k, v in cohort.items())))
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
            fmt.score_label(s),
            [v(_auc_triple(models.get(s))[0]), v(_auc_triple(pooled.get(s))[0]),
             v(fmt.num((local_mean.get(s) or {}).get("internal_auc")))],
            [v(_auc_triple(per[s])[0]) for per in local.values() if s in per],
        )
        for s in scores
    ]
    hlines: list[tuple[str, float]] = []
    if isinstance(cohort, dict):
        refs = {k: fmt.cohort_value(val) for k, val in cohort.items() if k.endswith("_auc")}
        hlines = [(f"cohort {k.removesuffix('_auc')}", val) for k, val in refs.items() if val is not None]
    fig = bar_figure(groups, ["federated", "pooled", "local-only (mean of sites)"], "internal AUC (mean of folds)",
                     ["#4c72b0", "#55a868", "#c44e52"], hlines, (0, 1.05), points_label="local-only, each site")
    return Plot("baselines", "Federated vs pooled vs local-only AUC",
                "Internal AUC, mean of folds, per training regime; dots: each site trained alone; dashed lines: "
                "the synthetic cohort's reference AUCs when known.", png_bytes(fig))
