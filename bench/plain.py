"""The federation's computation in one plain process: the baseline of the overhead figures.

Same engine calls, data, folds and FedAvg weights as the federated plan,
and the same round code (``common.rounds``: seed formula and schedule) and
aggregation (``server.aggregation``) as ``client.site`` and the strategy, but no Flower, no
messages, no process per site: for each round every site trains its
local epochs from the global weights in turn, the weighted mean becomes the
new global model, and every site's validation patients are scored with it
(rounds that compete for selection, ``common.config.validated_round``);
after the last round the best round (pooled validation AUC) predicts each
site's test patients; the last round's validation scores them too, as the
sites' closing validation does (``client.stagedrows``), and when that round is
selected its scores are the prediction.  Run as ``python -m bench.plain SPEC_JSON`` so its
wall time includes its own interpreter start and imports, as a user's
script would; it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import ExperimentConfig, validated_round
from common.configfile import load_config
from common.dataset import preprocess_site
from common.engine import predict, set_threads
from common.metrics import binary_metrics
from common.models import ModelKind, build_model
from common.records import ModelCodec
from common.rounds import local_round
from common.sitearrays import SiteArrays
from common.splits import Fold, fivefold
from server.aggregation import weighted_mean
from server.training import initial_vector

Site = tuple[SiteArrays, tuple[Fold, ...], dict[str, int]]  # a site's cases, folds and row of each patient


def run(config_path: Path, cache_root: Path, threads: int, launched: float) -> dict[str, Any]:
    """Train every enabled network and active fold; per-round seconds and the internal test AUC."""
    started = time.time()
    set_threads(threads)
    cfg = load_config(config_path)
    t0 = time.perf_counter()
    sites: list[Site] = []
    for s in cfg.sites:
        arrays = preprocess_site(Path(s.data_dir), cfg.preprocess, cache_root / s.name / "cache", site=s.name)
        folds = fivefold(
            list(arrays.patient_ids),
            list(arrays.labels),
            folds=cfg.folds,
            val_fraction=cfg.val_fraction,
            seed=cfg.seed,
        )
        pos = {p: i for i, p in enumerate(arrays.patient_ids)}
        sites.append((arrays, folds, pos))
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"import_s": started - launched, "load_s": load_s, "threads": threads, "models": {}}
    for kind in cfg.networks:
        mcfg = cfg.for_model(kind)  # the network's rounds and selection window, as FoldTrainer reads them
        total = mcfg.train.rounds
        for fold in cfg.active_folds:
            global_vec = initial_vector(cfg, kind)  # the federation's round-0 model, from the same function
            model = build_model(kind, getattr(cfg.models, kind), mask_channel=cfg.preprocess.mask_channel)
            codec = ModelCodec.for_state_dict(model.state_dict())
            history: list[dict[str, Any]] = []
            kept_test: list[np.ndarray] | None = None  # the last round's test probabilities (client.stagedrows)
            opt_states: dict[int, Any] = {}  # each site's optimiser between rounds (client.optimstore)
            for rnd in range(1, total + 1):
                t_round = time.perf_counter()
                vectors, weights = [], []
                for i, (arrays, folds, pos) in enumerate(sites):
                    model.load_state_dict({**model.state_dict(), **codec.unpack(global_vec)})
                    idx = [pos[p] for p in folds[fold].train]
                    state = opt_states.get(i)
                    res = local_round(model, arrays, idx, kind, mcfg, fold=fold, rnd=rnd, total_rounds=total, optimizer_state=state)
                    opt_states[i] = res.optimizer_state
                    vectors.append(codec.pack(model.state_dict()))
                    weights.append(res.n_patients)
                global_vec = weighted_mean(vectors, weights)
                model.load_state_dict({**model.state_dict(), **codec.unpack(global_vec)})
                auc = float("nan")  # a round that does not compete is not validated, as in the federation
                if validated_round(mcfg, rnd):
                    y, p = [], []
                    for arrays, folds, pos in sites:
                        idx = [pos[q] for q in folds[fold].val]
                        y.append(arrays.labels[idx])
                        p.append(predict(model, arrays, idx, kind, cfg))
                    auc = binary_metrics(np.concatenate(y), np.concatenate(p)).auc
                    if rnd == total:  # the closing validation scores the test patients too, as the sites' does
                        kept_test = _test_probs(model, sites, fold, kind, cfg)
                history.append(
                    {
                        "round": rnd,
                        "seconds": time.perf_counter() - t_round,
                        "val_auc": auc,
                        "vector": global_vec,
                    }
                )
            best = max(history, key=lambda h: -1.0 if np.isnan(h["val_auc"]) else h["val_auc"])
            t_test = time.perf_counter()
            if best["round"] != total or kept_test is None:  # an earlier round: its model scores them now
                model.load_state_dict({**model.state_dict(), **codec.unpack(best["vector"])})
                kept_test = _test_probs(model, sites, fold, kind, cfg)
            p = kept_test
            y = [arrays.labels[[pos[q] for q in folds[fold].test]] for arrays, folds, pos in sites]
            out["models"][f"{kind}/fold{fold}"] = {
                "round_seconds": [h["seconds"] for h in history],
                "val_auc": [None if np.isnan(h["val_auc"]) else h["val_auc"] for h in history],
                "selected_round": best["round"],
                "test_labels": np.concatenate(y).tolist(),
                "test_probs": np.concatenate(p).tolist(),
                "test_s": time.perf_counter() - t_test,
            }
    out["inner_s"] = time.time() - started
    return out


def _test_probs(
    model: torch.nn.Module, sites: list[Site], fold: int, kind: ModelKind, cfg: ExperimentConfig
) -> list[np.ndarray]:
    """Every site's test patients of ``fold``, scored by ``model``."""
    return [predict(model, a, [pos[q] for q in f[fold].test], kind, cfg) for a, f, pos in sites]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.plain", description=__doc__.split("\n")[0] if __doc__ else None
    )
    p.add_argument("config", type=Path, help="experiment YAML with its sites listed")
    p.add_argument(
        "--cache",
        type=Path,
        required=True,
        help="root of the per-site preprocessing caches (<root>/<site>/cache)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument(
        "--launched", type=float, default=0.0, help="time.time() when the caller started this process"
    )
    args = p.parse_args(argv)
    result = run(args.config, args.cache, args.threads, args.launched or time.time())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
