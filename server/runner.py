"""The experiment plan run by the server: folds x models x rounds, then evaluation.

For each model and fold, Flower's ``Strategy.start()`` runs the rounds among
the training sites; after every round the sites' validation statistics are
pooled, the round's global model is checkpointed, and the round with the
best pooled validation AUC is kept (the study's model selection, done across
sites).  Then every site predicts with the selected fold model (training
sites: their fold's test patients; external sites: everyone, averaged over
the five fold models), the ensemble weights are fitted on pooled validation
statistics, and the final pooled metrics are computed from grid statistics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from common.calibration import fit_platt
from common.config import ExperimentConfig, SiteConfig, to_dict, with_sites
from common.delong import PlacementSums, delong_from_sums
from common.engine import seed_everything
from common.ensemble import ENSEMBLES, best_weights, mean_absolute_error_from_hist, simplex_grid
from common.gridstats import ClassHistogram, pooled_metrics
from common.models import ModelKind, build_model
from common.radiomics import FederatedLogit
from common.records import (
    ModelCodec,
    arrays_from_record,
    arrays_record,
    config_record,
    weights_from_record,
    weights_record,
)

from .checkpoints import CheckpointStore
from .foldguard import GUARD_KEY, external_folds, selection_problem
from .meteredgrid import MeteredGrid
from .session import FoldSession, RoundLog
from .strategies import make_strategy
from .strategy import FederationError

log = logging.getLogger(__name__)

DELONG_PAIRS: tuple[tuple[str, str], ...] = (
    ("ensemble_3d_radiologist", "radiologist"),
    ("ensemble_3d_radiologist", "densenet3d"),
    ("densenet3d", "radiologist"),
    ("ensemble_2d3d", "densenet3d"),
    ("ensemble_2d3d_radiologist", "radiologist"),
    ("densenet3d", "densenet2d"),
)


@dataclass(frozen=True)
class SiteNode:
    node_id: int
    site: str
    role: str
    patients: int
    benign: int
    malignant: int


class PlanRunner:
    """Runs one experiment against the nodes connected to ``grid``."""

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run_dir: Path, run_id: str) -> None:
        self.grid = MeteredGrid(grid)
        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id = run_id
        self.timeout = cfg.federation.round_timeout_s
        self.ckpt = CheckpointStore(run_dir / "checkpoints", cfg.digest())
        self.sites: dict[int, SiteNode] = {}
        self.asked: set[int] = set()  # nodes asked who they are
        self.unavailable: dict[str, str] = {}
        self.resumed: dict[str, int] = {}  # "<model>/fold<k>" -> rounds taken from an earlier process's checkpoints
        self.participation: dict[str, list[dict[str, Any]]] = {}
        self.selected: dict[str, dict[int, dict[str, Any]]] = {}

    # -- messaging helpers ---------------------------------------------------------------
    def _base(self) -> dict[str, Any]:
        return {"experiment": to_dict(self.cfg), "run-id": self.run_id}

    def _send(
        self, nodes: Iterable[int], mtype: str, extra: dict[str, Any], arrays: ArrayRecord | None = None, timeout: float | None = None
    ) -> list[Message]:
        values = self._base()
        values.update(extra)
        records: dict[str, Any] = {"config": config_record(values)}
        if arrays is not None:
            records["arrays"] = arrays
        msgs = [Message(RecordDict(records), message_type=mtype, dst_node_id=n) for n in nodes]
        timeout = self.timeout if timeout is None else timeout
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout))
        good = []
        answered = set()
        dst = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}  # ids are set once pushed
        for r in replies:
            # a gone node's reply comes from the SuperLink itself, about the message sent to it
            node = r.metadata.src_node_id if r.metadata.src_node_id in dst.values() else dst.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            answered.add(node)
            site = self.sites[node].site if node in self.sites else f"node-{node}"
            if r.has_error():
                log.warning("%s: %s failed: %s", site, mtype, r.error.reason)
                continue
            status = r.content.config_records.get("status")
            if status is not None and node not in self.sites:  # discovery: the reply says who it is
                site = str(status.get("site", site))
            if status is not None and status.get("state") != "ok":
                log.warning("%s: %s unavailable: %s", site, mtype, status.get("reason"))
                self.unavailable.setdefault(site, str(status.get("reason")))
                continue
            good.append(r)
        for n in set(msgs_n.metadata.dst_node_id for msgs_n in msgs) - answered:
            site = self.sites[n].site if n in self.sites else f"node-{n}"
            log.warning("%s: no reply to %s within %.0f s", site, mtype, timeout)
        return good

    # -- discovery -------------------------------------------------------------------
    def discover(self, expected: int, wait_s: float) -> dict[int, SiteNode]:
        """Ask every connected node who it is; wait up to ``wait_s`` for ``expected`` nodes."""
        deadline = time.monotonic() + wait_s
        while len(list(self.grid.get_node_ids())) < expected and time.monotonic() < deadline:
            time.sleep(1.0)
        nodes = sorted(self.grid.get_node_ids())
        log.info("%d node(s) connected: asking for site information", len(nodes))
        self.asked.update(nodes)
        found = self._siteinfo(nodes)
        declared = {s.name: s for s in self.cfg.sites}
        ordered = [declared.get(name, SiteConfig(name=name)) for _, name, _ in found]
        if declared:
            ordered.sort(key=lambda s: list(declared).index(s.name) if s.name in declared else len(declared))
        cfg = with_sites(self.cfg, tuple(ordered))
        roles = {s.name: s.role for s in cfg.sites}
        for node, name, m in found:
            self.sites[node] = SiteNode(
                node_id=node,
                site=name,
                role=roles[name],
                patients=int(cast(int, m["patients"])),
                benign=int(cast(int, m["benign"])),
                malignant=int(cast(int, m["malignant"])),
            )
        left_out = [n for n in nodes if n not in self.sites]
        if left_out:
            log.warning("%d node(s) left out of this run (unavailable or no reply, see above)", len(left_out))
        for s in sorted(self.sites.values(), key=lambda s: s.site):
            log.info("site %-10s role %-8s patients %4d (benign %d, malignant %d)", s.site, s.role, s.patients, s.benign, s.malignant)
        return self.sites

    def _siteinfo(self, nodes: list[int], timeout: float | None = None) -> list[tuple[int, str, MetricRecord]]:
        """(node, site, patient counts) of the nodes that answered ``siteinfo``, by site name."""
        found: list[tuple[int, str, MetricRecord]] = []
        for r in self._send(nodes, f"{MessageType.QUERY}.siteinfo", {}, timeout=timeout):
            status = r.content.config_records["status"]
            found.append((r.metadata.src_node_id, str(status["site"]), r.content.metric_records["metrics"]))
        return sorted(found, key=lambda t: t[1])

    def rejoin(self) -> dict[int, str]:
        """The training nodes, after identifying nodes that connected since discovery.

        A hospital whose SuperNode restarted without an enrolled key comes
        back under a new node id; it takes its old place (and role).  A site
        not in the run is left out.  Each node is asked once, and for at most
        a minute: the round waits meanwhile.
        """
        new = sorted(set(self.grid.get_node_ids()) - self.asked)
        if new:
            self.asked.update(new)
            by_name = {s.site: s for s in self.sites.values()}
            for node, name, _ in self._siteinfo(new, timeout=min(self.timeout, 60.0)):
                old = by_name.get(name)
                if old is None:
                    log.warning("site %s connected after discovery: left out of this run", name)
                    continue
                del self.sites[old.node_id]
                self.sites[node] = dataclasses.replace(old, node_id=node)
                self.unavailable.pop(name, None)
                log.info("site %s rejoined (node %d, was %d)", name, node, old.node_id)
        return self._nodes("train")

    def _nodes(self, role: str) -> dict[int, str]:
        return {n: s.site for n, s in sorted(self.sites.items(), key=lambda t: t[1].site) if s.role == role}

    # -- training --------------------------------------------------------------------------
    def initial_vector(self, kind: ModelKind) -> np.ndarray:
        """The round-0 global model: the factory's initialisation under the run's seed."""
        seed_everything(self.cfg.seed)
        model = build_model(kind, getattr(self.cfg.models, kind), mask_channel=self.cfg.preprocess.mask_channel)
        codec = ModelCodec.for_state_dict(model.state_dict(), exclude_norm=self.cfg.federation.strategy == "fedbn")
        return codec.pack(model.state_dict())

    def train_fold(self, kind: ModelKind, fold: int) -> dict[str, Any]:
        """Federated rounds for one fold; returns the selected round and its pooled validation AUC."""
        train_nodes = self._nodes("train")
        if not train_nodes:
            raise FederationError("no training site is available")
        total = self.cfg.train.rounds
        done = self.ckpt.finished(kind, fold)
        if done is not None:
            log.info("%s fold %d already finished (round %d selected): skipping", kind, fold, done["round"])
            self._restore_round_logs(kind, fold)
            return done
        last = self.ckpt.last_round(kind, fold)
        start_vec = self.ckpt.load(kind, fold, last) if last else self.initial_vector(kind)
        if last:
            log.info("%s fold %d: resuming after round %d of %d (earlier rounds not retrained)", kind, fold, last, total)
            self._restore_round_logs(kind, fold)
        session = FoldSession(
            model=kind,
            fold=fold,
            train_nodes=train_nodes,
            refresh=self.rejoin,
            total_rounds=total,
            round_offset=last,
            base_config=self._base(),
            transport_dtype=self.cfg.federation.transport_dtype,
            min_sites=self.cfg.federation.min_sites,
            norm_bound_factor=self.cfg.federation.norm_bound_factor,
            threshold=self.cfg.evaluation.threshold,
        )
        strategy = make_strategy(self.cfg.federation, session)

        def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                return None
            rlog = session.log_for(server_round)
            meta = asdict(rlog)
            if self.cfg.evaluation.calibrate_folds and session.last_val_stats is not None:
                meta["platt"] = list(fit_platt(ClassHistogram.from_arrays(session.last_val_stats)))
            self.ckpt.save(kind, fold, rlog.round, weights_from_record(arrays), meta)
            self.participation.setdefault(f"{kind}/fold{fold}", []).append(asdict(rlog))
            return None

        if last < total:
            strategy.start(
                grid=self.grid,
                initial_arrays=weights_record(start_vec),
                num_rounds=total - last,
                timeout=self.timeout,
                train_config=ConfigRecord(),
                evaluate_config=ConfigRecord(),
                evaluate_fn=after_round,
            )
        best = self.ckpt.select_best(kind, fold)
        log.info("%s fold %d: selected round %d (pooled validation AUC %s)", kind, fold, best["round"], best["val_auc"])
        return best

    def _restore_round_logs(self, kind: ModelKind, fold: int) -> None:
        """Who took part in the rounds a previous server process finished, from their checkpoints."""
        key = f"{kind}/fold{fold}"
        rounds = self.ckpt.rounds(kind, fold)
        fields = {f.name for f in dataclasses.fields(RoundLog)}
        self.participation[key] = [{k: v for k, v in self.ckpt.meta(kind, fold, r).items() if k in fields} for r in rounds]
        self.resumed[key] = len(rounds)

    def train_radiomics(self, fold: int) -> None:
        """One-shot federated logistic regression on the handcrafted features, then prediction."""
        nodes = list(self._nodes("train"))
        moments: dict[str, np.ndarray] = {}
        for r in self._send(nodes, f"{MessageType.QUERY}.featstats", {"fold": fold}):
            for k, v in arrays_from_record(r.content.array_records["stats"]).items():
                moments[k] = moments[k] + v if k in moments else v.astype(np.float64)
        if not moments:
            log.warning("radiomics fold %d: no site returned feature statistics", fold)
            return
        mean, std = FederatedLogit.moments_to_mean_std(float(moments["n"][0]), moments["sum"], moments["sumsq"])
        params, weights = [], []
        for r in self._send(nodes, f"{MessageType.TRAIN}.radiomics", {"fold": fold}, arrays_record({"mean": mean, "std": std})):
            params.append(arrays_from_record(r.content.array_records["arrays"])["params"])
            weights.append(float(cast(float, r.content.metric_records["metrics"]["num-examples"])))
        if not params:
            log.warning("radiomics fold %d: no site returned a model", fold)
            return
        avg = np.average(np.stack(params), axis=0, weights=weights)
        model = FederatedLogit.from_params(avg, mean, std)
        self.ckpt.save("radiomics", fold, 1, model.pack_full().astype(np.float32), {"val_auc": None})
        arrays = arrays_record({"weights": model.pack_full()})
        for role in ("train", "external"):
            targets = list(self._nodes(role))
            if targets:
                self._send(targets, f"{MessageType.EVALUATE}.predict", {"model": "radiomics", "fold": fold, "round": 1, "role": role}, arrays)

    def predict_fold(
        self, kind: ModelKind, fold: int, best: dict[str, Any], roles: tuple[str, ...] = ("train", "external")
    ) -> None:
        vec = self.ckpt.load(kind, fold, int(best["round"]))
        arrays = weights_record(vec, self.cfg.federation.transport_dtype)
        for role in roles:
            nodes = list(self._nodes(role))
            if nodes:
                config: dict[str, Any] = {"model": kind, "fold": fold, "round": int(best["round"]), "role": role}
                if best.get("platt"):
                    config["platt"] = [float(x) for x in best["platt"]]
                self._send(nodes, f"{MessageType.EVALUATE}.predict", config, arrays)

    # -- ensembles and final statistics -------------------------------------------------------
    def _ensembles(self) -> dict[str, tuple[str, ...]]:
        on = {"densenet3d": self.cfg.models.densenet3d.enabled, "densenet2d": self.cfg.models.densenet2d.enabled, "radiologist": True}
        return {name: members for name, members in ENSEMBLES.items() if all(on[m] for m in members)}

    def fit_ensembles(self) -> dict[str, dict[str, Any]]:
        """Weights maximising the pooled validation AUC, searched on a simplex grid across sites."""
        ensembles = self._ensembles()
        step = self.cfg.evaluation.ensemble_grid_step
        candidates = {"+".join(m): simplex_grid(len(m), step).tolist() for m in ensembles.values()}
        bins = min(self.cfg.evaluation.grid_bins, 1000)
        replies = self._send(list(self._nodes("train")), f"{MessageType.EVALUATE}.ensemble", {"candidates": candidates, "bins": bins, "role": "train"})
        sums: dict[str, np.ndarray] = {}
        for r in replies:
            for k, v in arrays_from_record(r.content.array_records["stats"]).items():
                sums[k] = sums[k] + v if k in sums else v.copy()
        fitted: dict[str, dict[str, Any]] = {}
        for name, members in ensembles.items():
            key = "+".join(members)
            hists = [ClassHistogram.from_arrays(_sub(sums, f"{key}/{i}/")) for i in range(len(candidates[key]))]
            idx, auc = best_weights(hists, np.asarray(candidates[key]), self.cfg.evaluation.ensemble_tolerance)
            w = candidates[key][idx]
            fitted[name] = {"members": list(members), "weights": [round(x, 6) for x in w], "val_auc": float(auc)}
            log.info("%s: weights %s (pooled validation AUC %.4f)", name, dict(zip(members, w, strict=True)), auc)
        return fitted

    def final_statistics(self, fitted: dict[str, dict[str, Any]]) -> dict[str, dict[str, ClassHistogram]]:
        """Pooled histograms per score and subset: ``fold<k>`` (internal test), ``external``."""
        weights = {"+".join(v["members"]): v["weights"] for v in fitted.values()}
        names = {"+".join(v["members"]): k for k, v in fitted.items()}
        out: dict[str, dict[str, ClassHistogram]] = {}
        for role in ("train", "external"):
            nodes = list(self._nodes(role))
            if not nodes:
                continue
            for r in self._send(nodes, f"{MessageType.EVALUATE}.final", {"ensembles": weights, "role": role}):
                arrs = arrays_from_record(r.content.array_records["stats"])
                groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
                for k, v in arrs.items():
                    score, subset, field = k.split("/")
                    groups.setdefault((names.get(score, score), subset), {})[field] = v
                for (score, subset), d in groups.items():
                    h = ClassHistogram.from_arrays(d)
                    per = out.setdefault(score, {})
                    per[subset] = per[subset] + h if subset in per else h
        return out

    # -- the whole plan ---------------------------------------------------------------------------
    def run(self, expected_sites: int, wait_s: float = 120.0) -> dict[str, Any]:
        t0 = time.perf_counter()
        self.discover(expected_sites, wait_s)
        if self.cfg.plan == "loco":
            return self.run_loco(t0)
        return self.run_plan(t0)

    def run_loco(self, t0: float) -> dict[str, Any]:
        """Leave-one-centre-out: one full pass per site, that site external, the others training."""
        passes: dict[str, Any] = {}
        for held_out in sorted({s.site for s in self.sites.values()}):
            cfg = dataclasses.replace(self.cfg, plan="federated", external_sites=(held_out,))
            sub = PlanRunner(self.grid.inner, cfg, self.run_dir / f"loco-{held_out}", f"{self.run_id}-loco-{held_out}")
            sub.sites = {
                n: dataclasses.replace(s, role="external" if s.site == held_out else "train") for n, s in self.sites.items()
            }
            log.info("leave-one-centre-out: %s held out", held_out)
            passes[held_out] = sub.run_plan(time.perf_counter())
        summary = {"plan": "loco", "config": self.cfg.name, "passes": passes, "wall_seconds": round(time.perf_counter() - t0, 1)}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def run_plan(self, t0: float) -> dict[str, Any]:
        """Train every model and fold, predict, fit the ensembles, write ``summary.json``."""
        train = self._nodes("train")
        if len(train) < max(1, self.cfg.federation.min_sites):
            raise FederationError(
                f"{len(train)} training site(s) available ({', '.join(train.values()) or 'none'}), "
                f"federation.min_sites is {self.cfg.federation.min_sites}; unavailable: {self.unavailable or 'none'}"
            )
        kinds: list[ModelKind] = [k for k in ("densenet3d", "densenet2d") if getattr(self.cfg.models, k).enabled]  # type: ignore[misc]
        for kind in kinds:
            for fold in self.cfg.active_folds:
                best = self.train_fold(kind, fold)
                platt = self.ckpt.meta(kind, fold, int(best["round"])).get("platt")
                if platt:  # per-fold calibration fitted on the selected round's pooled validation statistics
                    best = {**best, "platt": platt}
                problem = selection_problem(best.get("val_auc"))
                if problem:  # the guard: scored on its own test fold, left out of the external average
                    best = {**best, GUARD_KEY: problem}
                    log.warning("%s fold %d: selected model %s; left out of the external average", kind, fold, problem)
                self.selected.setdefault(kind, {})[fold] = best
                self.predict_fold(kind, fold, best, roles=("train",))
            for fold in external_folds(self.selected[kind]):
                self.predict_fold(kind, fold, self.selected[kind][fold], roles=("external",))
        if self.cfg.models.radiomics:
            for fold in self.cfg.active_folds:
                self.train_radiomics(fold)
        fitted = self.fit_ensembles()
        final = self.final_statistics(fitted)
        self.save_statistics(final)
        readers = self.reader_statistics()
        ev = self.cfg.evaluation
        exact = ev.min_cell_count <= 1 and ev.stats_noise <= 0
        if not exact:
            log.warning("statistics are protected (min cell count / noise): DeLong's exact protocol is skipped")
        delong = self.delong_tests(final, readers, fitted) if exact else {}
        summary = self.summary(final, fitted, time.perf_counter() - t0)
        summary["reader_study"] = self.reader_summary(readers, delong)
        summary["delong"] = {k: v for k, v in delong.items() if not k.startswith("readers/")}
        summary["resumed"] = self.resumed
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("summary written to %s", self.run_dir / "summary.json")
        return summary

    # -- reader study and DeLong (two-step, aggregate statistics only) -------------------------
    def reader_statistics(self) -> dict[str, dict[str, ClassHistogram]]:
        """Pooled reader-study histograms: ``{tier: {"without_ai"|"with_ai": h}}``."""
        out: dict[str, dict[str, ClassHistogram]] = {}
        for r in self._send(sorted(self.sites), f"{MessageType.EVALUATE}.readers", {}):
            groups: dict[tuple[str, str], dict[str, np.ndarray]] = {}
            for k, v in arrays_from_record(r.content.array_records["stats"]).items():
                _, tier, session, field = k.split("/")
                groups.setdefault((tier, session), {})[field] = v
            for (tier, session), d in groups.items():
                h = ClassHistogram.from_arrays(d)
                per = out.setdefault(tier, {})
                per[session] = per[session] + h if session in per else h
        return out

    def delong_tests(
        self,
        final: dict[str, dict[str, ClassHistogram]],
        readers: dict[str, dict[str, ClassHistogram]],
        fitted: dict[str, dict[str, Any]],
    ) -> dict[str, dict[str, Any]]:
        """Federated DeLong: step 1 the pooled histograms (already summed), step 2 placement sums."""
        site_name = {name: "+".join(v["members"]) for name, v in fitted.items()}
        global_h: dict[str, ClassHistogram] = {}
        for score, subsets in final.items():
            folds = [h for s, h in subsets.items() if s.startswith("fold")]
            if folds:
                global_h[f"{site_name.get(score, score)}/internal"] = ClassHistogram.aggregate(folds)
            if "external" in subsets:
                global_h[f"{site_name.get(score, score)}/external"] = subsets["external"]
        for tier, sessions in readers.items():
            for session, h in sessions.items():
                global_h[f"{session}/readers/{tier}"] = h
        specs: list[list[str]] = []
        names: list[str] = []
        for subset in ("internal", "external"):
            for a, b in DELONG_PAIRS:
                sa, sb = site_name.get(a, a), site_name.get(b, b)
                if f"{sa}/{subset}" in global_h and f"{sb}/{subset}" in global_h:
                    specs.append([sa, sb, subset])
                    names.append(f"{subset}/{a} vs {b}")
        for tier in sorted(readers):
            if {"without_ai", "with_ai"} <= set(readers[tier]):
                specs.append(["with_ai", "without_ai", f"readers/{tier}"])
                names.append(f"readers/{tier}/with_ai vs without_ai")
        if not specs:
            return {}
        needed = {f"{s}/{sub}" for s1, s2, sub in specs for s in (s1, s2)}
        arrays = {f"{k}/{f}": v for k, h in global_h.items() if k in needed for f, v in h.to_arrays(include_sums=False).items()}
        ensembles = {"+".join(v["members"]): v["weights"] for v in fitted.values()}
        sums: dict[int, PlacementSums] = {}
        for role in ("train", "external"):
            nodes = list(self._nodes(role))
            if not nodes:
                continue
            extra = {"specs": specs, "ensembles": ensembles, "role": role}
            for r in self._send(nodes, f"{MessageType.EVALUATE}.delong", extra, arrays_record(arrays)):
                m = r.content.metric_records["metrics"]
                per: dict[int, dict[str, Any]] = {}
                for key, value in m.items():
                    if "/" in key:
                        idx, field = key.split("/", 1)
                        per.setdefault(int(idx), {})[field] = value
                for j, d in per.items():
                    ps = PlacementSums.from_dict(d)
                    sums[j] = sums[j] + ps if j in sums else ps
        out: dict[str, dict[str, Any]] = {}
        for i, (s1, s2, subset) in enumerate(specs):
            if i not in sums:
                continue
            try:
                res = delong_from_sums(global_h[f"{s1}/{subset}"], global_h[f"{s2}/{subset}"], sums[i])
            except ValueError as exc:
                log.warning("DeLong %s not computed: %s", names[i], exc)
                continue
            out[names[i]] = res.to_dict()
            log.info("DeLong %s: AUC %.4f vs %.4f, z %.3f, p %.4g", names[i], res.auc1, res.auc2, res.z, res.p)
        return out

    def reader_summary(self, readers: dict[str, dict[str, ClassHistogram]], delong: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The study's Table 3 per tier, and Figure 5's mean absolute error, from pooled histograms."""
        thr = self.cfg.evaluation.threshold
        out: dict[str, Any] = {}
        for tier, sessions in sorted(readers.items()):
            entry: dict[str, Any] = {}
            for session, h in sessions.items():
                entry[session] = dict(pooled_metrics(h, thr).to_dict(), mae=mean_absolute_error_from_hist(h))
            if "without_ai" in entry and "with_ai" in entry:
                entry["mae_improvement"] = entry["without_ai"]["mae"] - entry["with_ai"]["mae"]
            if f"readers/{tier}/with_ai vs without_ai" in delong:
                entry["delong"] = delong[f"readers/{tier}/with_ai vs without_ai"]
            out[tier] = entry
        return out

    def _privacy_summary(self) -> dict[str, Any]:
        """Epsilon spent per site (the last value reported in each model/fold), when DP is on."""
        if not self.cfg.dp.enabled:
            return {"enabled": False}
        per: dict[str, dict[str, float]] = {}
        for key, logs in self.participation.items():
            for rlog in logs:
                for site, eps in rlog.get("epsilon", {}).items():
                    per.setdefault(site, {})[key] = eps
        return {
            "enabled": True,
            "delta": self.cfg.dp.delta,
            "target_epsilon": self.cfg.dp.target_epsilon or None,
            "noise_multiplier": None if self.cfg.dp.target_epsilon else self.cfg.dp.noise_multiplier,
            "max_grad_norm": self.cfg.dp.max_grad_norm,
            "epsilon": per,
            "max_epsilon": {site: max(v.values()) for site, v in per.items()},
        }

    def save_statistics(self, final: dict[str, dict[str, ClassHistogram]]) -> Path:
        """Pooled grid statistics (never per patient) for the report: ``stats/final.npz``."""
        path = self.run_dir / "stats" / "final.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {f"{score}/{subset}/{k}": v for score, subsets in final.items() for subset, h in subsets.items() for k, v in h.to_arrays().items()}
        np.savez_compressed(path, **flat)  # type: ignore[arg-type]
        return path

    def summary(self, final: dict[str, dict[str, ClassHistogram]], fitted: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
        thr = self.cfg.evaluation.threshold
        models: dict[str, Any] = {}
        for score, subsets in final.items():
            folds = sorted((s for s in subsets if s.startswith("fold")), key=lambda s: int(s[4:]))
            entry: dict[str, Any] = {}
            if folds:
                pooled = subsets[folds[0]]
                for s in folds[1:]:
                    pooled = pooled + subsets[s]
                fold_m = [pooled_metrics(subsets[s], thr).to_dict() for s in folds]
                aucs = [m["auc"] for m in fold_m if m["auc"] is not None]
                entry["internal"] = {
                    "pooled": pooled_metrics(pooled, thr).to_dict(),
                    "folds": fold_m,
                    "fold_mean_auc": float(np.mean(aucs)) if aucs else None,
                }
            if "external" in subsets:
                entry["external"] = {"pooled": pooled_metrics(subsets["external"], thr).to_dict()}
            if score in fitted:
                entry["weights"] = dict(zip(fitted[score]["members"], fitted[score]["weights"], strict=True))
                entry["val_auc"] = fitted[score]["val_auc"]
            models[score] = entry
        return {
            "plan": self.cfg.plan,
            "config": self.cfg.name,
            "config_digest": self.cfg.digest(),
            "sites": {s.site: {"role": s.role, "patients": s.patients, "benign": s.benign, "malignant": s.malignant} for s in self.sites.values()},
            "unavailable_sites": self.unavailable,
            "models": models,
            "selection": {k: {str(f): v for f, v in d.items()} for k, d in self.selected.items()},
            "rounds": self.participation,
            "privacy": self._privacy_summary(),
            "communication": {
                s.site: {
                    "bytes_sent": int(self.grid.received.get(n, 0)),
                    "bytes_received": int(self.grid.sent.get(n, 0)),
                    "by_message_type": self.grid.traffic(n),
                }
                for n, s in self.sites.items()
            },
            "wall_seconds": round(seconds, 1),
        }


def _sub(d: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in d.items() if k.startswith(prefix)}
