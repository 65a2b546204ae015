"""A site's statistics over its stored predictions: ensembles, final evaluation, reader study, DeLong.

Once every fold model has predicted (``SiteRunner.predict_fold`` writes the
per-patient rows under the site's run folder), the server's evaluation
messages ask for aggregates of those rows: validation histograms of candidate
ensemble weights, the final histograms of every score, the reader study's
histograms and DeLong's placement sums.  Everything here reads the stored
rows and returns released grid statistics or scalars; no row leaves.
"""

from __future__ import annotations

import csv
import json
from typing import TYPE_CHECKING

import numpy as np

from common.delong import PlacementSums, delong_step2_site
from common.ensemble import combine
from common.gridstats import ClassHistogram, ScoreGrid
from common.protocol import HistogramSet
from common.readerstudy import MRMC_PREFIX
from common.sitedata import read_reader_study, score_to_probability

from .clinical import SiteClinical

if TYPE_CHECKING:
    from .site import SiteRunner


class SiteStatistics:
    """Aggregates over one site's stored predictions of a run (its :class:`SiteRunner`)."""

    def __init__(self, site: SiteRunner) -> None:
        self.site = site

    def _stored(self, kind: str, fold: int) -> dict[str, tuple[list[str], np.ndarray]]:
        path = self.site.run_dir / "predictions" / f"{kind}_fold{fold}.csv"
        out: dict[str, tuple[list[str], list[float]]] = {}
        with path.open(newline="") as fh:
            for row in csv.DictReader(fh):
                ids, ps = out.setdefault(row["split"], ([], []))
                ids.append(row["patient_id"])
                ps.append(float(row["probability"]))
        return {k: (ids, np.asarray(ps)) for k, (ids, ps) in out.items()}

    def scores_enabled(self) -> tuple[str, ...]:
        """The single scores of this run: the enabled networks, radiomics, the radiologist."""
        kinds: list[str] = list(self.site.cfg.networks)
        if self.site.cfg.models.radiomics:
            kinds.append("radiomics")
        return (*kinds, "radiologist")

    def radiologist_prob(self, ids: list[str] | tuple[str, ...]) -> np.ndarray:
        mapping = self.site.cfg.evaluation.score_mapping
        pos = {pid: i for i, pid in enumerate(self.site.arrays.patient_ids)}
        return np.asarray([score_to_probability(int(self.site.arrays.radiologist_scores[pos[p]]), mapping) for p in ids])

    def score_table(self, split: str, fold: int | None, kinds: tuple[str, ...]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Labels and per-score probabilities for one split (``external``: mean over fold models)."""
        if split == "external":
            ids = list(self.site.arrays.patient_ids)
            scores: dict[str, np.ndarray] = {}
            for kind in kinds:
                if kind == "radiologist":
                    continue
                # folds the server's selection guard left out were never sent for external prediction
                done = [k for k in self.site.cfg.active_folds if (self.site.run_dir / "predictions" / f"{kind}_fold{k}.csv").is_file()]
                per_fold = [self._stored(kind, k)["external"][1] for k in done]
                scores[kind] = np.mean(per_fold, axis=0)
        else:
            assert fold is not None
            ids = []
            scores = {}
            for kind in kinds:
                if kind == "radiologist":
                    continue
                ids_k, p = self._stored(kind, fold)[split]
                ids = ids_k
                scores[kind] = p
        if "radiologist" in kinds:
            scores["radiologist"] = self.radiologist_prob(ids)
        labels = self.site.arrays.labels[self.site.index(tuple(ids))]
        return labels, scores

    def ensemble_search_stats(self, role: str, candidates: dict[str, list[list[float]]], bins: int) -> HistogramSet:
        """Validation histograms of every candidate weight vector of every ensemble.

        Only training sites have validation patients; an external site returns nothing.
        """
        if role == "external":
            return {}
        grid = ScoreGrid(bins)
        out: HistogramSet = {}
        for name, weights in candidates.items():
            members = tuple(name.split("+"))
            total: list[ClassHistogram | None] = [None] * len(weights)
            for k in self.site.cfg.active_folds:
                y, scores = self.score_table("val", k, members)
                probs = np.stack([scores[m] for m in members], axis=1)
                for i, w in enumerate(weights):
                    h = ClassHistogram.from_scores(y, combine(probs, np.asarray(w)), grid)
                    total[i] = h if total[i] is None else total[i] + h  # type: ignore[operator]
            for i, hi in enumerate(total):
                assert hi is not None
                out[(name, str(i))] = self.site.release(hi)  # released once over all folds: more patients per cell
        return out

    def final_stats(self, role: str, ensembles: dict[str, list[float]]) -> HistogramSet:
        """Histograms of every score on internal-test folds (training site) or external patients."""
        enabled = self.scores_enabled()
        subsets = ["external"] if role == "external" else [f"fold{k}" for k in self.site.cfg.active_folds]
        if role != "external":  # validation patients: the operating threshold is chosen on them
            subsets += [f"val{k}" for k in self.site.cfg.active_folds]
        out: HistogramSet = {}
        for subset in subsets:
            if subset == "external":
                split, fold = "external", None
            elif subset.startswith("val"):
                split, fold = "val", int(subset[3:])
            else:
                split, fold = "test", int(subset[4:])
            y, scores = self.score_table(split, fold, enabled)
            for name, w in ensembles.items():
                members = name.split("+")
                scores[name] = combine(np.stack([scores[m] for m in members], axis=1), np.asarray(w))
            for score, p in scores.items():
                out[(score, subset)] = self.site.released(y, p)
        self._write_final(role, ensembles)
        return out

    def subset_scores(self, subset: str, ensembles: dict[str, list[float]]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Labels and every score of one evaluation subset held at this site.

        ``internal``: the internal-test patients of all folds (each patient once);
        ``external``: all patients, fold models averaged; ``readers/<tier>``: the
        reader study's (patient, reader) readings of that tier, sessions
        ``without_ai`` and ``with_ai``.
        """
        if subset.startswith("readers/"):
            return self._reader_scores(subset.split("/", 1)[1])
        if subset.startswith(MRMC_PREFIX):
            return SiteClinical(self.site).reader_matrix(subset[len(MRMC_PREFIX) :])
        enabled = self.scores_enabled()
        if subset == "external":
            y, scores = self.score_table("external", None, enabled)
        else:
            parts = [self.score_table("test", k, enabled) for k in self.site.cfg.active_folds]
            y = np.concatenate([p[0] for p in parts])
            scores = {name: np.concatenate([p[1][name] for p in parts]) for name in parts[0][1]}
        for name, w in ensembles.items():
            scores[name] = combine(np.stack([scores[m] for m in name.split("+")], axis=1), np.asarray(w))
        return y, scores

    def _reader_scores(self, tier: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        mapping = self.site.cfg.evaluation.score_mapping
        pos = {pid: i for i, pid in enumerate(self.site.arrays.patient_ids)}
        rows = [r for r in read_reader_study(self.site.ctx.data_dir) if r.tier == tier and r.patient_id in pos]
        y = np.asarray([self.site.arrays.labels[pos[r.patient_id]] for r in rows], dtype=np.int64)
        without = np.asarray([score_to_probability(r.score_without_ai, mapping) for r in rows])
        with_ai = np.asarray([score_to_probability(r.score_with_ai, mapping) for r in rows])
        return y, {"without_ai": without, "with_ai": with_ai}

    def reader_stats(self) -> HistogramSet:
        """Grid statistics ``(tier, session)`` of each reader tier and session (empty without a reader study)."""
        tiers = sorted({r.tier for r in read_reader_study(self.site.ctx.data_dir)})
        out: HistogramSet = {}
        for tier in tiers:
            y, scores = self._reader_scores(tier)
            if y.size == 0:
                continue
            for session, p in scores.items():
                out[(tier, session)] = self.site.released(y, p)
        return out

    def delong_sums(
        self,
        specs: list[list[str]],
        global_hists: HistogramSet,
        ensembles: dict[str, list[float]],
        subsets: tuple[str, ...],
    ) -> dict[int, PlacementSums]:
        """DeLong step 2: sums of this site's placement values against the global histograms.

        ``specs`` are ``[score1, score2, subset]``; only subsets this site
        holds are answered.  Returns scalars only (12 per comparison).
        """
        out: dict[int, PlacementSums] = {}
        cache: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
        for i, (s1, s2, subset) in enumerate(specs):
            if subset not in subsets and not subset.startswith(("readers/", MRMC_PREFIX)):
                continue
            if subset not in cache:
                cache[subset] = self.subset_scores(subset, ensembles)
            y, scores = cache[subset]
            if y.size == 0 or s1 not in scores or s2 not in scores:
                continue
            out[i] = delong_step2_site(y, scores[s1], scores[s2], global_hists[(s1, subset)], global_hists[(s2, subset)])
        return out

    def _write_final(self, role: str, ensembles: dict[str, list[float]]) -> None:
        (self.site.run_dir / "ensemble_weights.json").write_text(json.dumps({"role": role, "weights": ensembles}, indent=2))
