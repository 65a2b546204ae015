"""Evaluation across sites: ensemble weights, final statistics, reader study, DeLong.

After training, every site holds its predictions; the server only ever sees
grid histograms and sums.  The ensemble weights are fitted on pooled
validation histograms (a simplex grid searched across sites), the final
pooled metrics come from pooled internal-test and external histograms, and
DeLong's test runs in two steps (pooled histograms down, placement sums up).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from common.config import ExperimentConfig
from common.delong import PlacementSums, delong_from_sums
from common.ensemble import ENSEMBLES, best_weights, mean_absolute_error_from_hist, simplex_grid
from common.gridstats import ClassHistogram, pooled_metrics
from common.protocol import (
    DELONG,
    ENSEMBLE,
    FINAL,
    READERS,
    ROLE_EXTERNAL,
    ROLE_TRAIN,
    ROLES,
    DelongRequest,
    Empty,
    EnsembleRequest,
    FinalRequest,
    HistogramSet,
    aggregate,
)
from common.readerstudy import MRMC_PREFIX, mrmc_histograms, mrmc_results, mrmc_specs
from common.replycheck import ReplyRejected

from .messenger import Messenger
from .registry import SiteRegistry

log = logging.getLogger(__name__)

DELONG_PAIRS: tuple[tuple[str, str], ...] = (
    ("ensemble_3d_radiologist", "radiologist"),
    ("ensemble_3d_radiologist", "densenet3d"),
    ("densenet3d", "radiologist"),
    ("ensemble_2d3d", "densenet3d"),
    ("ensemble_2d3d_radiologist", "radiologist"),
    ("densenet3d", "densenet2d"),
)


class Evaluator:
    """The evaluation phases of a plan, against the sites of the registry."""

    def __init__(self, cfg: ExperimentConfig, messenger: Messenger, registry: SiteRegistry) -> None:
        self.cfg = cfg
        self.messenger = messenger
        self.registry = registry
        self.site_hists: dict[str, dict[str, dict[str, ClassHistogram]]] = {}  # site -> score -> subset
        self.mrmc_hists: dict[str, dict[str, ClassHistogram]] = {}  # reader group -> reader@session

    def _ensembles(self) -> dict[str, tuple[str, ...]]:
        on = {
            "densenet3d": self.cfg.models.densenet3d.enabled,
            "densenet2d": self.cfg.models.densenet2d.enabled,
            "radiologist": True,
        }
        return {name: members for name, members in ENSEMBLES.items() if all(on[m] for m in members)}

    def fit_ensembles(self) -> dict[str, dict[str, Any]]:
        """Weights maximising the pooled validation AUC, searched on a simplex grid across sites."""
        ensembles = self._ensembles()
        step = self.cfg.evaluation.ensemble_grid_step
        candidates = {"+".join(m): simplex_grid(len(m), step).tolist() for m in ensembles.values()}
        bins = min(self.cfg.evaluation.grid_bins, 1000)
        req = EnsembleRequest(candidates=candidates, bins=bins, role=ROLE_TRAIN)
        expected = {(key, str(i)) for key, cands in candidates.items() for i in range(len(cands))}

        def covers_the_candidates(body: Any) -> None:
            if set(body.histograms) != expected:
                raise ReplyRejected(
                    f"statistics cover {len(set(body.histograms) & expected)} of the {len(expected)} "
                    "candidates asked for"
                )

        sums = aggregate(
            a.body.histograms
            for a in self.messenger.send(
                list(self.registry.nodes(ROLE_TRAIN)), ENSEMBLE, req, validate=covers_the_candidates
            )
        )
        if not sums:
            log.warning("ensemble weights not fitted: no training site returned usable statistics")
            return {}
        fitted: dict[str, dict[str, Any]] = {}
        for name, members in ensembles.items():
            key = "+".join(members)
            hists = [sums[(key, str(i))] for i in range(len(candidates[key]))]
            idx, auc = best_weights(
                hists, np.asarray(candidates[key]), self.cfg.evaluation.ensemble_tolerance
            )
            w = candidates[key][idx]
            fitted[name] = {
                "members": list(members),
                "weights": [round(x, 6) for x in w],
                "val_auc": float(auc),
            }
            log.info(
                "%s: weights %s (pooled validation AUC %.4f)", name, dict(zip(members, w, strict=True)), auc
            )
        return fitted

    def final_statistics(self, fitted: dict[str, dict[str, Any]]) -> dict[str, dict[str, ClassHistogram]]:
        """Pooled histograms per score and subset: ``fold<k>`` (internal test), ``val<k>`` (validation,
        where the operating threshold is chosen), ``external``; each site's own kept in :attr:`site_hists`."""
        weights = {"+".join(v["members"]): v["weights"] for v in fitted.values()}
        names = {"+".join(v["members"]): k for k, v in fitted.items()}
        sets: list[HistogramSet] = []
        for role in ROLES:
            nodes = list(self.registry.nodes(role))
            if nodes:
                folds = self.cfg.active_folds
                subsets = (
                    {ROLE_EXTERNAL}
                    if role == ROLE_EXTERNAL
                    else {f"fold{k}" for k in folds} | {f"val{k}" for k in folds}
                )
                scores = {"densenet3d", "densenet2d", "radiomics", "radiologist", *weights}

                def requested(body: Any, subsets: set[str] = subsets, scores: set[str] = scores) -> None:
                    if any(sc not in scores or sub not in subsets for sc, sub in body.histograms):
                        raise ReplyRejected("statistics name a score or subset that was not requested")

                req = FinalRequest(ensembles=weights, role=role)
                for a in self.messenger.send(nodes, FINAL, req, validate=requested):
                    sets.append(a.body.histograms)
                    per_site = self.site_hists.setdefault(a.site, {})
                    for (score, subset), h in a.body.histograms.items():
                        per_site.setdefault(names.get(score, score), {})[subset] = h
        out: dict[str, dict[str, ClassHistogram]] = {}
        for (score, subset), h in aggregate(sets).items():
            out.setdefault(names.get(score, score), {})[subset] = h
        return out

    # -- reader study and DeLong (two-step, aggregate statistics only) -------------------------
    def reader_statistics(self) -> dict[str, dict[str, ClassHistogram]]:
        """Pooled reader-study histograms ``{tier: {"without_ai"|"with_ai": h}}``; per-reader ones in
        :attr:`mrmc_hists` (``{group: {reader@session: h}}``) for the multi-reader analysis."""
        answers = self.messenger.send(sorted(self.registry.sites), READERS, Empty())
        out: dict[str, dict[str, ClassHistogram]] = {}
        for (tier, session), h in aggregate(a.body.histograms for a in answers).items():
            out.setdefault(tier, {})[session] = h
        parts = [
            (a.site, f"{MRMC_PREFIX}{group}/{reading}/{fld}", arr)
            for a in answers
            for (group, reading), h in a.body.readings.items()
            for fld, arr in h.to_arrays().items()
        ]
        self.mrmc_hists, problems = mrmc_histograms(parts, self.cfg.evaluation.grid_bins)
        for problem in problems:
            log.warning("multi-reader analysis: %s", problem)
        return out

    def mrmc_summary(self, delong: dict[str, dict[str, Any]], exact: bool) -> dict[str, Any] | None:
        """The Obuchowski-Rockette analysis per reader group (``reader_study["mrmc"]``), None without readers."""
        if not self.mrmc_hists:
            return None
        if not exact:
            return {"skipped": "statistics are protected (min cell count / noise)"}
        return mrmc_results(self.mrmc_hists, delong)

    def delong_tests(
        self,
        final: dict[str, dict[str, ClassHistogram]],
        readers: dict[str, dict[str, ClassHistogram]],
        fitted: dict[str, dict[str, Any]],
    ) -> dict[str, dict[str, Any]]:
        """Federated DeLong: step 1 the pooled histograms (already summed), step 2 placement sums."""
        site_name = {name: "+".join(v["members"]) for name, v in fitted.items()}
        global_h: HistogramSet = {}
        for score, subsets in final.items():
            folds = [h for s, h in subsets.items() if s.startswith("fold")]
            if folds:
                global_h[(site_name.get(score, score), "internal")] = ClassHistogram.aggregate(folds)
            if "external" in subsets:
                global_h[(site_name.get(score, score), "external")] = subsets["external"]
        for tier, sessions in readers.items():
            for session, h in sessions.items():
                global_h[(session, f"readers/{tier}")] = h
        specs: list[list[str]] = []
        names: list[str] = []
        for subset in ("internal", "external"):
            for a, b in DELONG_PAIRS:
                sa, sb = site_name.get(a, a), site_name.get(b, b)
                if (sa, subset) in global_h and (sb, subset) in global_h:
                    specs.append([sa, sb, subset])
                    names.append(f"{subset}/{a} vs {b}")
        for tier in sorted(readers):
            if {"without_ai", "with_ai"} <= set(readers[tier]):
                specs.append(["with_ai", "without_ai", f"readers/{tier}"])
                names.append(f"readers/{tier}/with_ai vs without_ai")
        mrmc_h, mrmc_s, mrmc_n = mrmc_specs(self.mrmc_hists)
        for key, h in mrmc_h.items():  # "<reader@session>/mrmc/<group>"
            reading, subset = key.split("/", 1)
            global_h[(reading, subset)] = h
        specs += mrmc_s
        names += mrmc_n
        if not specs:
            return {}
        needed = {(s, sub) for s1, s2, sub in specs for s in (s1, s2)}
        hists: HistogramSet = {name: h for name, h in global_h.items() if name in needed}
        ensembles = {"+".join(v["members"]): v["weights"] for v in fitted.values()}
        sums: dict[int, PlacementSums] = {}
        for role in ROLES:
            nodes = list(self.registry.nodes(role))
            if not nodes:
                continue
            req = DelongRequest(histograms=hists, specs=specs, ensembles=ensembles, role=role)
            for answer in self.messenger.send(nodes, DELONG, req):
                for j, ps in answer.body.sums.items():
                    sums[j] = sums[j] + ps if j in sums else ps
        out: dict[str, dict[str, Any]] = {}
        for i, (s1, s2, subset) in enumerate(specs):
            if i not in sums:
                continue
            try:
                res = delong_from_sums(global_h[(s1, subset)], global_h[(s2, subset)], sums[i])
            except ValueError as exc:
                log.warning("DeLong %s not computed: %s", names[i], exc)
                continue
            out[names[i]] = res.to_dict()
            log.info(
                "DeLong %s: AUC %.4f vs %.4f, z %.3f, p %.4g", names[i], res.auc1, res.auc2, res.z, res.p
            )
        return out

    def reader_summary(
        self, readers: dict[str, dict[str, ClassHistogram]], delong: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """The study's Table 3 per tier, and Figure 5's mean absolute error, from pooled histograms."""
        thr = self.cfg.evaluation.fixed_threshold
        out: dict[str, Any] = {}
        for tier, sessions in sorted(readers.items()):
            entry: dict[str, Any] = {}
            for session, h in sessions.items():
                entry[session] = dict(pooled_metrics(h, thr).to_dict(), mae=mean_absolute_error_from_hist(h))
            if "without_ai" in entry and "with_ai" in entry:
                entry["mae_improvement"] = entry["without_ai"]["mae"] - entry["with_ai"]["mae"]
            if f"readers/{tier}/with_ai vs without_ai" in delong:
                # every (patient, reader) reading pooled: readers count as more cases; descriptive only,
                # the multi-reader test is reader_study["mrmc"]
                entry["pooled_readings_delong"] = dict(
                    delong[f"readers/{tier}/with_ai vs without_ai"], descriptive=True
                )
            out[tier] = entry
        return out
