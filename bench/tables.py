"""Each section's result as a titled table with notes, printed as text or written as Markdown.

Pure functions of the sections' JSON results (see ``bench.sections``), so
the printed report, ``docs/benchmarks.md`` and the tests read the same cells.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import figures
from .figures import fmt, human_bytes
from .proctree import MAX_SAMPLER_SHARE


@dataclass(frozen=True)
class Table:
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = field(default_factory=tuple)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(c: str) -> str:
        return c.replace("|", "\\|")

    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def render(table: Table, markdown: bool = False) -> str:
    if markdown:
        body = markdown_table(table.header, table.rows)
        notes = "\n".join(f"- {n}" for n in table.notes)
        return f"### {table.title}\n\n{body}\n" + (f"\n{notes}\n" if notes else "")
    body = text_table(table.header, table.rows)
    notes = "\n".join(f"  {n}" for n in table.notes)
    return f"{table.title}\n{body}\n" + (f"{notes}\n" if notes else "")


def _gib(mem: Mapping[str, Any] | None, key: str = "peak_total_pss_gib") -> str:
    return fmt((mem or {}).get(key), ".2f")


_TIMINGS = ("wall_s", "ratio_whole", "steady_round_s", "ratio_steady")


def _repeat_note(r: Mapping[str, Any]) -> str:
    """Each block's ratios, and the plain loops that bracket them (``--repeats``)."""
    blocks, plains = r["blocks"], r.get("plains", [])

    def series(key: str, ratio: str) -> str:
        values = figures.block_values(blocks, key, ratio)
        return ", ".join(fmt(v, ".2f", "x") for v in values) + f" (median {fmt(figures.median(values), '.2f', 'x')})"

    return (
        f"Repeated in {len(blocks)} blocks, one after another, each of a simulation, a deployment and a deployment"
        " with the hospitals running, between two runs of the plain loop; each block's ratios are to the mean of"
        " the plain loops just before and after it, and each figure of a federated row is its median over the blocks"
        f" (the plain rows: the first and the last plain loop).  Simulation steady round {series('simulation', 'ratio_steady')};"
        f" deployment whole run {series('deployment', 'ratio_whole')}"
        + (
            f"; hospitals running whole run {series('deployment_standing', 'ratio_whole')}"
            if all("deployment_standing" in b for b in blocks)
            else ""
        )
        + ".  Plain loop whole run s: "
        + ", ".join(fmt(p["wall_s"], ".0f") for p in plains)
        + "; steady round s: "
        + ", ".join(fmt(p["steady_round_s"], ".1f") for p in plains)
        + ".  Peak memory: the largest of the blocks.  Round seconds and where the time goes below: the first block."
    )


def overhead_table(r: Mapping[str, Any]) -> Table:
    plain, sim, dep = r["plain"], r["simulation"], r["deployment"]
    standing = r.get("deployment_standing")  # absent from a bench.json written before it was measured
    again = r.get("plain_again")  # absent from a bench.json written before the plain loop ran twice
    plains = [("plain loop (one process)", plain)] + ([("plain loop again, after the others", again)] if again else [])
    rows = [
        (
            name,
            fmt(run["wall_s"], ".0f"),
            fmt(run.get("ratio_whole", 1.0), ".2f", "x"),
            fmt(run["steady_round_s"], ".1f"),
            fmt(run.get("ratio_steady", 1.0), ".2f", "x"),
            "-",
            _gib(run["memory"]),
        )
        for name, run in plains
    ]
    blocks = r.get("blocks") or []  # absent from a bench.json written before --repeats
    repeated = len(blocks) > 1
    federated = [("Flower simulation", "simulation", "steady"), ("loopback deployment (TLS)", "deployment", "whole")]
    if standing is not None:
        federated.append(("loopback deployment, hospitals running", "deployment_standing", "whole"))
    for name, key, target_key in federated:
        target = figures.TARGET_SIM_STEADY if target_key == "steady" else figures.TARGET_DEPLOY_WHOLE
        run = (
            {
                **{k: figures.median(figures.block_values(blocks, key, k)) for k in _TIMINGS},
                "memory": max((b[key]["memory"] for b in blocks), key=lambda m: m.get("peak_total_pss_gib", 0.0)),
            }
            if repeated
            else r[key]
        )
        value = run["ratio_steady"] if target_key == "steady" else run["ratio_whole"]
        rows.append(
            (
                f"{name}, median of {len(blocks)}" if repeated else name,
                fmt(run["wall_s"], ".0f"),
                fmt(run["ratio_whole"], ".2f", "x"),
                fmt(run["steady_round_s"], ".1f"),
                fmt(run["ratio_steady"], ".2f", "x"),
                f"<= {target:.2f}x {'per steady round' if target_key == 'steady' else 'whole run'}: {figures.verdict(value, target)}",
                _gib(run["memory"]),
            )
        )
    measured = [k for k in ("plain", "simulation", "deployment", "deployment_standing") if k in r]
    rounds = "; ".join(f"{k} {', '.join(fmt(s, '.1f') for s in r[k]['round_s'])}" for k in measured)
    return Table(
        "Federation overhead: the same epochs, plain vs federated",
        ("run", "whole run s", "ratio", "steady round s", "ratio", "target", "peak memory GiB"),
        tuple(rows),
        (
            f"Experiment: {r['experiment']}; federated runs with {r.get('transport', 'float32')} model transport"
            " (the configuration default).",
            "Whole run: process start to exit (imports, start-up, the plan's evaluation tail: prediction, ensemble,"
            " final statistics, reader study, DeLong, report). Steady round: mean of rounds 2.. (round 1 warms up);"
            " federated rounds from the server's round log (send, train, aggregate, validate).  The last round's"
            " validation scores the test patients too, in the plain loop as at the sites (which keep them for the"
            " prediction when that round is selected).",
            "Loopback deployment: flower-server run and the three hospitals' flower-client run all start with the"
            " clock (three interpreters importing torch and MONAI at once on these 2 cores).  Hospitals running:"
            " each flower-client run was started before, as a hospital keeps it between runs, and had imported"
            " its libraries; the clock runs from flower-server run's start to its exit (the hospitals reconnect,"
            " every message still crosses nginx, TLS and the SuperLink).",
            _repeat_note(r)
            if repeated
            else (
                f"Ratios are to the mean of the two plain-loop runs ({fmt(plain['wall_s'], '.0f')} s first,"
                f" {fmt(again['wall_s'], '.0f')} s last; steady rounds {fmt(plain['steady_round_s'], '.1f')} and"
                f" {fmt(again['steady_round_s'], '.1f')} s): the same work, so their difference is the machine's"
                " own drift over the section, and a ratio moves by about as much."
                if again
                else "Ratios are to the plain loop, run once before the others."
            ),
            f"Round seconds: {rounds}.",
            "Where the time goes (s): "
            + "; ".join(
                f"{k}: {'imports' if k == 'plain' else 'outside the plan'} {fmt(b['outside_plan'], '.0f')},"
                f" rounds {fmt(b['rounds'], '.0f')}, {'the rest' if k == 'plain' else 'discovery + evaluation tail'}"
                f" {fmt(b['plan_other'], '.0f')}"
                for k, b in ((k, figures.breakdown(r[k])) for k in measured)
            )
            + ".  Rounds only, federated / plain: "
            + ", ".join(
                f"{k} {fmt(figures.ratio(sum(r[k]['round_s']), sum(plain['round_s'])), '.2f', 'x')}"
                for k in measured[1:]
            )
            + ".",
            f"Plain loop: {plain.get('threads')} torch threads, sites in turn, FedAvg in memory; its imports took"
            f" {fmt(plain.get('import_s'), '.1f')} s.  Federated sites: 1 thread each, every site of a round at"
            " once (simulation: Ray slots for up to twice the cores; deployment: one process per hospital).  With 3"
            " equal sites on 2 cores a round takes 1.5 one-thread site epochs against the plain loop's 3 two-thread"
            " ones: s/2 of its compute for a two-thread speedup s (0.85x at s = 1.7) before any Flower cost.",
            f"Preprocessing (excluded above: all runs start from the warm per-site cache): {fmt(r['preprocess_s_per_patient'], '.3f')} s/patient"
            f" {'cold' if r.get('preprocess_cold') else '(cache was already warm)'}; loading a warm site cache {fmt(r['cache_load_s'], '.2f')} s."
            " The file check `flower-client run` and `flower-simulation run` make before they start (excluded too:"
            " every federated run's sites start with its memo beside that cache, as at any start after their first,"
            " and re-read no file):"
            f" {fmt(r.get('check_s_per_patient'), '.3f')} s/patient.",
            "Peak memory: proportional set size summed over the run's whole process tree, sampled every second"
            f" or less often where a sample costs more than {MAX_SAMPLER_SHARE:.0%} of a core (sampling CPU s: "
            + ", ".join(f"{k} {fmt(r[k]['memory'].get('sampler_cpu_s'), '.1f')}" for k in measured)
            + "); per process tree in the deployment: "
            + ", ".join(
                f"{k} {fmt(v, '.2f')}" for k, v in dep["memory"].get("peak_pss_gib_by_root", {}).items()
            )
            + f" GiB; largest single process: simulation {_gib(sim['memory'], 'peak_process_rss_gib')} GiB (a Ray"
            f" worker), deployment {_gib(dep['memory'], 'peak_process_rss_gib')} GiB (RSS).",
            f"Anchors before this work (stack notes, 3 x 40 patients, 3 rounds): simulation {figures.ANCHORS['simulation']};"
            f" deployment {figures.ANCHORS['deployment']}.",
        ),
    )


def comm_table(r: Mapping[str, Any]) -> Table:
    rows = []
    for t, entry in r["transports"].items():
        sites = list(entry["sites"].values())
        if not sites:
            continue

        def mean(key: str, sites: list[Mapping[str, float]] = sites) -> float:
            return sum(s.get(key, math.nan) for s in sites) / len(sites)  # NaN: not in an older result

        rows.append(
            (
                t,
                human_bytes(mean("round_received")),
                human_bytes(mean("round_sent")),
                human_bytes(mean("fold_evaluate_received")),
                human_bytes(mean("run_received")),
                human_bytes(mean("run_sent")),
                fmt(mean("messages"), ".0f"),
                fmt(entry["auc"], ".4f"),
            )
        )
    return Table(
        "Communication per site: float32 vs float16 transport",
        (
            "transport",
            "round: received",
            "round: sent",
            "fold: last evaluate, received",
            "run: received",
            "run: sent",
            "messages/run",
            "pooled AUC",
        ),
        tuple(rows),
        (
            f"Experiment: {r['experiment']}.  Mean over sites; payload bytes (arrays, metrics, config) as metered by the server.",
            "Round: the one exchange of a federated round (train; it also validates the previous round's model)."
            "  Fold: the one evaluate exchange after a fold's last round.  Run: every message of the plan"
            " (site discovery, rounds, prediction, ensemble search, final statistics, reader study, DeLong).",
            f"float16 / float32 bytes per round: {fmt(r['bytes_ratio_round'], '.3f')} (target: half, within 0.01:"
            f" {figures.verdict(r['bytes_ratio_round'], figures.TARGET_BYTES_RATIO + 0.01)});"
            f" |AUC float16 - AUC float32| = {fmt(r['auc_delta'], '.4f')} (target <= {figures.TARGET_AUC_DELTA}:"
            f" {figures.verdict(r['auc_delta'], figures.TARGET_AUC_DELTA)}): two trainings, each on its own path.",
            *_same_model_note(r.get("same_model")),
            "The model is all but the validation statistics: a round sends it down once and up once, with a"
            " score histogram up (the previous round's validation), which float16 does not shrink.",
        ),
    )


def _same_model_note(m: Mapping[str, Any] | None) -> list[str]:
    if not m:
        return []
    return [
        f"Same model (float32 run's selected round {m['round']}), weights as sent in float16: AUC"
        f" {fmt(m['auc_float32'], '.4f')} -> {fmt(m['auc_float16'], '.4f')} (difference {fmt(m['auc_delta'], '.4f')},"
        f" target <= {figures.TARGET_AUC_DELTA}: {figures.verdict(m['auc_delta'], figures.TARGET_AUC_DELTA)}) on"
        f" all {m['patients']} patients; largest probability change {fmt(m['max_prob_delta'], '.2e')},"
        f" largest weight change {fmt(m['max_weight_delta'], '.2e')}."
    ]


def quality_table(r: Mapping[str, Any]) -> Table:
    local = ", ".join(f"{s} {fmt(v, '.3f')}" for s, v in r["local"].items())
    rows = (
        ("federated (FedAvg, simulation)", fmt(r["federated"], ".4f")),
        ("pooled (centralised, same engine and epochs)", fmt(r["pooled"], ".4f")),
        (f"local-only (mean over sites: {local})", fmt(r["local_mean"], ".4f")),
        ("oracle (generator's latent evidence), same test patients", fmt(r["oracle_same_patients"], ".4f")),
        ("oracle, whole cohort", fmt(r["oracle_cohort"], ".4f")),
    )
    return Table(
        "Quality vs the limits: pooled internal-test AUC",
        ("setting", "AUC"),
        rows,
        (
            f"Experiment: {r['experiment']}; {r['test_patients']} internal test patients, the same for every row.",
            "Affordable, not final: one fold and a few epochs move AUC by +-0.05-0.1 (stack notes); the quick preset's"
            " `flower-simulation run --baselines` gives the full comparison.",
        ),
    )


def e2e_table(r: Mapping[str, Any]) -> Table:
    latest = r.get("make_simulate")
    pred = r["prediction"]
    rows = (
        (
            "`make simulate` (quick preset), latest run",
            f"{fmt(latest['wall_s'], '.0f')} s" if latest else "no finished run under runs/",
            f"{latest['run']}, {latest['date']}{'' if latest.get('preset_as_now', True) else ' (config differs from the current quick preset)'}"
            if latest
            else "-",
        ),
        (
            "prediction, full ensemble + Grad-CAM, per patient",
            f"{fmt(pred['per_patient_s'], '.2f')} s",
            f"mean of {pred['patients']} patients (NIfTI in, probability and overlay out), {pred['threads']} threads",
        ),
        (
            "prediction: start-up (imports, bundle)",
            f"{fmt(pred['startup_s'], '.1f')} s",
            f"once per command; whole command {fmt(pred['command_wall_s'], '.0f')} s",
        ),
    )
    return Table(
        "End to end",
        ("what", "time", "detail"),
        rows,
        (
            f"Prediction: {pred['tool']}, bundle of {pred['models']} ({fmt(pred['bundle_mb'], '.0f')} MB);"
            f" answered by {', '.join(pred['answered_by']) or '-'}.",
            "The `make simulate` time is read from the run's launch.json (`wall_seconds_total`, summary.json in older runs), not rerun here.",
        ),
    )


def scaling_table(r: Mapping[str, Any], patients: int) -> Table:
    rows = []
    for n, run in r["sites"].items():
        rows.append(
            (
                n,
                str(patients // int(n)),
                fmt(run["wall_s"], ".0f"),
                fmt(run["steady_round_s"], ".1f"),
                _gib(run["memory"]),
                _gib(run["memory"], "peak_process_rss_gib"),
                str(run["memory"].get("max_processes", "-")),
            )
        )
    return Table(
        "Scaling: simulation with more, smaller sites (same patients)",
        (
            "sites",
            "patients/site",
            "whole run s",
            "steady round s",
            "peak memory GiB",
            "largest process GiB",
            "processes",
        ),
        tuple(rows),
        (
            f"Experiment: {r['experiment']}.  Flower's simulation runs at most 2 sites at a time (2 CPUs, 1 per site).",
        ),
    )


DOC_INTRO = """# Benchmarks

What users pay, measured by one command (`make bench`, i.e. `python -m bench`): wall time on
CPU-only sites, bytes on the hospital network, AUC lost to federation, and how it scales.
Every figure below comes from the run described here (machine, versions, date, exact
command); `python -m bench --doc docs/benchmarks.md` measures again and rewrites this file
(about 16 minutes on 2 cores, plus 2-3 minutes the first time, for the benchmark cohort and
model bundle). Figures taken while other work shared the CPUs carry a warning at the end:
torch's threads spin while they wait for each other, so a busy machine slows a 2-thread
process far more than its share.
"""


def section_table(name: str, result: Mapping[str, Any], params: Any) -> Table:
    """The table of one section's result (``params``: the run's BenchParams, for the cohort size)."""
    if name == "overhead":
        return overhead_table(result)
    if name == "comm":
        return comm_table(result)
    if name == "quality":
        return quality_table(result)
    if name == "e2e":
        return e2e_table(result)
    if name == "scaling":
        return scaling_table(result, params.patients)
    raise ValueError(f"no table for section {name!r}")


def failed(name: str, message: str, markdown: bool = False) -> str:
    """A failed section in the report: its name and the last lines of what it said."""
    lines = message.strip().splitlines()[-6:] or ["failed"]
    if markdown:
        return f"### {name}: FAILED\n\n```\n" + "\n".join(lines) + "\n```\n"
    return f"{name}: FAILED\n" + "\n".join(f"  {x}" for x in lines) + "\n"
