"""The benchmark's sections; each is run in its own process by ``python -m bench``.

``python -m bench.sections NAME --work DIR --params JSON --out FILE`` runs one
section and writes its result (plain JSON) to FILE.  Runs that several
sections need are made once per work folder (``bench.runs``), so sections
can be run alone or together.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import FederationConfig

from . import figures
from .cohort import BASE_SITES, CohortRequest, ensure_cohort
from .federation import REPO, run_deployment, run_plain
from .params import BenchParams
from .runs import COHORT_ROOT, RUN_TIMEOUT_S, describe, fed_result, memo, prepared, simulation, timed

log = logging.getLogger("bench")

# ---------------------------------------------------------------- sections


def section_overhead(p: BenchParams, work: Path) -> dict[str, Any]:
    """Plain loop vs Flower simulation vs loopback deployment, same experiment."""
    prep = prepared(p, work, 3)
    transport = FederationConfig().transport_dtype  # what a run uses unless its config says otherwise
    cfg, cache = Path(prep["configs"][transport]), Path(prep["cache"])

    def plain() -> dict[str, Any]:
        r = run_plain(cfg, cache, p.plain_threads, RUN_TIMEOUT_S)
        model = next(iter(r["models"].values()))
        return {
            "wall_s": r["wall_s"],
            "memory": r["memory"],
            "round_s": model["round_seconds"],
            "import_s": r["import_s"],
            "threads": r["threads"],
        }

    def deploy(standing: bool, suffix: str) -> Callable[[], dict[str, Any]]:
        name = f"deploy-{'standing-' if standing else ''}sites3-{transport}{suffix}"
        return lambda: fed_result(run_deployment(cfg, cache, work / "runs" / name, RUN_TIMEOUT_S, standing=standing))

    # Block i runs the plain loop, the simulation, the deployment and the deployment as hospitals run it;
    # the plain loop runs once more after the last block, and each block's ratios use the mean of the
    # plain loops before and after it: a shared machine's speed drifts (the same plain loop took 92 s at
    # 12:27 and 129-144 s after 15:00 UTC on 2026-12-02, on one machine), and one block's ratio moved by
    # more than the distance to its target between runs (simulation steady round 1.13x and 1.19x twenty
    # minutes apart, 2026-12-04), so with ``repeats`` > 1 the targets are judged on the medians over the blocks.
    plains: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    for i in range(p.repeats):
        suffix = f"-r{i}" if i else ""  # the first block keeps the names the other sections share
        plains.append(timed(memo(work, f"plain{suffix}", plain)))
        blocks.append(
            {
                "simulation": timed(simulation(p, work, 3, transport, suffix)),
                "deployment": timed(memo(work, f"deploy-sites3-{transport}{suffix}", deploy(False, suffix))),
                "deployment_standing": timed(
                    memo(work, f"deploy-standing-sites3-{transport}{suffix}", deploy(True, suffix))
                ),
            }
        )
    plains.append(timed(memo(work, "plain-again", plain)))
    for i, block in enumerate(blocks):
        reference = figures.bracketed(plains[i], plains[i + 1])
        for run in block.values():
            run["ratio_whole"] = figures.ratio(run["wall_s"], reference["wall_s"])
            run["ratio_steady"] = figures.ratio(run["steady_round_s"], reference["steady_round_s"])
        block["reference"] = reference
    overall = figures.bracketed(plains[0], plains[-1])
    for run in plains:
        run["ratio_whole"] = figures.ratio(run["wall_s"], overall["wall_s"])
        run["ratio_steady"] = figures.ratio(run["steady_round_s"], overall["steady_round_s"])
    first = blocks[0]
    prep_sites = prep["preprocess"]["sites"].values()
    return {
        "experiment": describe(p),
        "transport": transport,
        "preprocess_s_per_patient": sum(s["seconds"] for s in prep_sites)
        / max(sum(s["patients"] for s in prep_sites), 1),
        "preprocess_cold": all(s["cold"] for s in prep_sites),
        "check_s_per_patient": sum(s.get("check_s", math.nan) for s in prep_sites)
        / max(sum(s["patients"] for s in prep_sites), 1),
        "cache_load_s": max(s["warm_load_s"] for s in prep_sites),
        "plain": plains[0],
        "plain_again": plains[-1],
        "reference": first["reference"],
        "simulation": first["simulation"],
        "deployment": first["deployment"],
        "deployment_standing": first["deployment_standing"],
        "plains": plains,
        "blocks": blocks,
        "targets": {
            "simulation_steady": figures.TARGET_SIM_STEADY,
            "deployment_whole": figures.TARGET_DEPLOY_WHOLE,
        },
        "anchors": figures.ANCHORS,
    }


def float16_effect(run_dir: Path, cache_root: Path) -> dict[str, Any]:
    """The selected fold-0 model of a float32 run scoring every patient as is and after a float16 round trip.

    Isolates what the transport's rounding does to the model's output from
    the different training path a float16 run takes (any perturbation of
    training moves a small test set's AUC by more than rounding does).  All
    patients of all sites are scored, because a fold's test set is too small
    to resolve 0.005 of AUC (one swapped pair of 13 x 13 is 0.006); the
    figure is the difference between the two, not a test AUC.
    """
    import numpy as np

    from common.configfile import load_config
    from common.dataset import preprocess_site
    from common.engine import predict, set_threads
    from common.metrics import binary_metrics
    from common.models import build_model
    from common.records import ModelCodec, to_transport

    set_threads(os.cpu_count() or 1)
    cfg = load_config(run_dir / "config.yaml")
    ck = run_dir / "checkpoints" / "densenet3d_fold0"
    rnd = json.loads((ck / "selected.json").read_text())["round"]
    with np.load(ck / f"round{rnd}.npz") as z:
        vec32 = np.asarray(z["weights"], np.float32)
    vec16 = to_transport(vec32, "float16").astype(np.float32)
    ys: list[Any] = []
    probs: dict[str, list[Any]] = {"float32": [], "float16": []}
    models = {}
    for t, vec in (("float32", vec32), ("float16", vec16)):
        model = build_model("densenet3d", cfg.models.densenet3d, mask_channel=cfg.preprocess.mask_channel)
        state = model.state_dict()
        state.update(ModelCodec.for_state_dict(state).unpack(vec))
        model.load_state_dict(state)
        models[t] = model
    for site in cfg.sites:
        arrays = preprocess_site(
            Path(site.data_dir), cfg.preprocess, cache_root / site.name / "cache", site=site.name
        )
        idx = list(range(len(arrays)))
        ys.append(arrays.labels[idx])
        for t, model in models.items():
            probs[t].append(predict(model, arrays, idx, "densenet3d", cfg))
    y = np.concatenate(ys)
    p32, p16 = np.concatenate(probs["float32"]), np.concatenate(probs["float16"])
    auc32, auc16 = binary_metrics(y, p32).auc, binary_metrics(y, p16).auc
    return {
        "round": rnd,
        "patients": int(y.size),
        "auc_float32": auc32,
        "auc_float16": auc16,
        "auc_delta": abs(auc16 - auc32),
        "max_prob_delta": float(np.max(np.abs(p16 - p32))),
        "max_weight_delta": float(np.max(np.abs(vec16 - vec32))),
    }


def section_comm(p: BenchParams, work: Path) -> dict[str, Any]:
    """Bytes per site per round and per run, float32 vs float16 transport, and the AUC they reach."""
    out: dict[str, Any] = {"experiment": describe(p), "transports": {}}
    for t in ("float32", "float16"):
        run = simulation(p, work, 3, t)
        out["transports"][t] = {
            "auc": run["auc"],
            "sites": {
                s: figures.site_traffic(e, p.rounds * p.folds_run, p.folds_run)
                for s, e in sorted(run["communication"].items())
            },
        }
    a, b = out["transports"]["float32"], out["transports"]["float16"]
    round32 = sum(v["round_total"] for v in a["sites"].values())
    round16 = sum(v["round_total"] for v in b["sites"].values())
    out["bytes_ratio_round"] = figures.ratio(round16, round32)
    out["auc_delta"] = (
        abs(b["auc"] - a["auc"]) if math.isfinite(a["auc"]) and math.isfinite(b["auc"]) else math.nan
    )
    out["targets"] = {"bytes_ratio": figures.TARGET_BYTES_RATIO, "auc_delta": figures.TARGET_AUC_DELTA}
    prep = prepared(p, work, 3)
    out["same_model"] = float16_effect(
        Path(simulation(p, work, 3, "float32")["run_dir"]), Path(prep["cache"])
    )
    return out


def _oracle_on(cohort: Path, cfg_path: Path, folds: tuple[int, ...]) -> tuple[float, int]:
    """The generator's oracle AUC (latent evidence) on exactly the internal test patients of ``folds``."""
    from common.configfile import load_config
    from common.metrics import binary_metrics
    from common.sitedata import read_manifest_rows
    from common.splits import fivefold

    cfg = load_config(cfg_path)
    info = json.loads((cohort / "cohort.json").read_text())
    latent_dir = Path(info.get("merged_from", {}).get("cohort", cohort))
    with (latent_dir / "latent.csv").open(newline="") as fh:
        evidence = {r["patient_id"]: (int(r["label"]), float(r["evidence"])) for r in csv.DictReader(fh)}
    ids: list[str] = []
    for s in cfg.sites:
        _, rows = read_manifest_rows(Path(s.data_dir))
        split = fivefold(
            [r["patient_id"] for r in rows],
            [int(r["label"]) for r in rows],
            folds=cfg.folds,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )
        ids += [pid for k in folds for pid in split[k].test]
    # the evidence is a real number; the logistic map keeps its order (hence its AUC) and gives a probability
    probs = [1.0 / (1.0 + math.exp(-evidence[i][1])) for i in ids]
    return float(binary_metrics([evidence[i][0] for i in ids], probs).auc), len(ids)


def section_quality(p: BenchParams, work: Path) -> dict[str, Any]:
    """Federated vs pooled vs local-only internal AUC on the same folds, against the cohort's oracle."""
    from common.config import with_sites
    from common.configfile import load_config
    from simulation.baselines import run_baselines

    prep = prepared(p, work, 3)
    cfg_path = Path(prep["configs"]["float32"])
    fed = simulation(p, work, 3, "float32")

    def baselines() -> dict[str, Any]:
        cfg = load_config(cfg_path)
        pooled_cache = work / "cache" / "sites3-pooled"
        pooled_cache.mkdir(parents=True, exist_ok=True)
        for f in Path(prep["cache"]).glob("*/cache/*.npz"):
            if not (pooled_cache / f.name).exists():
                os.link(f, pooled_cache / f.name)
        t0 = time.perf_counter()
        res = run_baselines(
            with_sites(cfg, cfg.sites), pooled_cache, pooled=True, local=True, models=["densenet3d"]
        )
        return {
            "seconds": time.perf_counter() - t0,
            "pooled": res["pooled"]["densenet3d"]["internal"]["pooled"]["auc"],
            "local_mean": res["local_mean"]["densenet3d"]["internal_auc"],
            "local": {s: v["densenet3d"]["internal"]["pooled"]["auc"] for s, v in res["local"].items()},
        }

    base = memo(work, "baselines-sites3", baselines)
    cohort = Path(prep["cohort"])
    info = json.loads((cohort / "cohort.json").read_text())
    oracle, n_test = _oracle_on(cohort, cfg_path, tuple(range(p.folds_run)))
    return {
        "experiment": describe(p),
        "test_patients": n_test,
        "federated": fed["auc"],
        "pooled": base["pooled"],
        "local_mean": base["local_mean"],
        "local": base["local"],
        "oracle_same_patients": oracle,
        "oracle_cohort": info.get("oracle_auc", {}).get("all"),
        "baselines_s": base["seconds"],
    }


def latest_simulate_run(runs: Path) -> dict[str, Any] | None:
    """The newest finished ``make simulate`` run under ``runs``: the quick preset, as it is now, by simulation.

    A run counts when its config (sites aside) has the current quick preset's
    digest; failing that, the newest run of a config named ``quick`` is
    taken and marked as differing.
    """
    import dataclasses

    from common.config import ConfigError
    from common.configfile import load_config

    preset = load_config("quick").digest()
    found = []
    for path in runs.glob("*/summary.json"):
        try:
            s = json.loads(path.read_text())
            launch = path.parent / "launch.json"  # the launching command's wall time, beside the summary
            if launch.is_file():
                s = {**json.loads(launch.read_text()), **s}
            cfg = load_config(path.parent / "config.yaml")
        except (OSError, json.JSONDecodeError, ConfigError):
            continue
        if s.get("wall_seconds_total") is None:
            continue  # not written by flower-simulation run
        exact = dataclasses.replace(cfg, sites=(), external_sites=()).digest() == preset
        if exact or s.get("config") == "quick":
            found.append((exact, path.stat().st_mtime, path, s))
    if not found:
        return None
    exact, mtime, path, s = max(found, key=lambda t: (t[0], t[1]))
    return {
        "run": path.parent.name,
        "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(mtime)),
        "wall_s": s["wall_seconds_total"],
        "plan_s": s.get("wall_seconds"),
        "preset_as_now": exact,
        "sites": {k: v.get("patients") for k, v in s.get("sites", {}).items()},
        "run_dir": str(path.parent),
    }


def section_e2e(p: BenchParams, work: Path) -> dict[str, Any]:
    """The latest ``make simulate`` wall time (read, not rerun) and CPU prediction time per patient."""
    from .predict import time_prediction

    latest = latest_simulate_run(REPO / "runs")
    out: dict[str, Any] = {"make_simulate": latest}
    patients = ensure_cohort(COHORT_ROOT, CohortRequest(p.patients), BASE_SITES) / "site01"
    out["prediction"] = time_prediction(
        Path(latest["run_dir"]) if latest else None, work / "predict", patients, COHORT_ROOT / "bundles"
    )
    return out


def section_scaling(p: BenchParams, work: Path) -> dict[str, Any]:
    """Simulation with 3, 6 and 12 sites holding the same patients: wall time and peak memory."""
    rows = {}
    for n in p.scaling_sites:
        if BASE_SITES % n:
            raise ValueError(f"scaling: {n} sites does not divide the {BASE_SITES} generated sites")
        run = timed(simulation(p, work, n, "float32"))
        rows[str(n)] = {k: run[k] for k in ("wall_s", "plan_s", "round_s", "steady_round_s", "memory")}
    return {"experiment": describe(p, 0).replace(" in 0 sites", ""), "sites": rows}


# throughput is measured by ``bench.__main__`` itself: one subprocess per configuration already.
RUNNERS: dict[str, Callable[[BenchParams, Path], dict[str, Any]]] = {
    "overhead": section_overhead,
    "comm": section_comm,
    "quality": section_quality,
    "e2e": section_e2e,
    "scaling": section_scaling,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.sections", description=__doc__.split("\n")[0] if __doc__ else None
    )
    ap.add_argument("name", choices=tuple(RUNNERS))
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--params", required=True, help="BenchParams as JSON")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s", force=True
    )
    params = BenchParams.from_json(args.params)
    args.work.mkdir(parents=True, exist_ok=True)
    result = RUNNERS[args.name](params, args.work)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
