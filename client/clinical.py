"""A site's side of the clinical statistics: each reader's readings and cross-site evaluation.

The multi-reader analysis needs every reader's readings of the cases all
readers of a group read (a fully crossed design), released as grid
histograms like every other statistic; cross-site evaluation scores another
model (the global one or a site's local-only one) on the site's test
patients.  Only counts leave the site.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from common.engine import predict
from common.gridstats import ClassHistogram
from common.models import ModelKind
from common.protocol import HistogramSet
from common.readerstudy import reading_key
from common.sitedata import read_reader_study, score_to_probability

if TYPE_CHECKING:
    from .site import SiteRunner


def _reader_name(reader: str) -> str:
    """A reader id as it travels in statistic names (no ``/`` or ``@``, which separate fields)."""
    return reader.replace("/", "_").replace("@", "_")


class SiteClinical:
    """Per-reader statistics and cross-site scores of one site's run (its :class:`SiteRunner`)."""

    def __init__(self, site: SiteRunner) -> None:
        self.site = site

    def cross_site_stats(
        self, kind: ModelKind, fold: int, flat: np.ndarray, role: str, name: str, folds: list[int]
    ) -> ClassHistogram:
        """One fold model's statistics at this site, for the cross-site matrix.

        A training site scores its fold-``fold`` test patients (each patient is
        in one fold's test set, so the server may sum the folds).  An external
        site scores all its patients with every fold model and, as in the main
        evaluation, averages the folds: it keeps each fold's probabilities on
        its own disk and answers the histogram of the mean once the last of
        ``folds`` has come (an empty histogram before).  The model may be the
        global one or another site's local-only model; only counts leave.
        """
        model = self.site.models.load(kind, fold, flat)
        ids = tuple(self.site.arrays.patient_ids) if role == "external" else self.site.folds[fold].test
        idx = self.site.index(ids)
        probs = predict(model, self.site.arrays, idx, kind, self.site.cfg)
        labels = self.site.arrays.labels[idx]
        if role == "external":
            store = self.site.run_dir / "crosssite"
            store.mkdir(parents=True, exist_ok=True)
            safe = "".join(c if c.isalnum() else "_" for c in name)
            np.save(store / f"{safe}_{kind}_fold{fold}.npy", probs)
            if fold != max(folds):
                return ClassHistogram.zeros(self.site.cfg.evaluation.grid_bins)
            probs = np.mean([np.load(store / f"{safe}_{kind}_fold{k}.npy") for k in folds], axis=0)
        return self.site.released(labels, probs)

    def reader_groups(self) -> dict[str, list[Any]]:
        """Reader-study rows per tier, and of every tier together (``all``) when there are several."""
        rows = read_reader_study(self.site.ctx.data_dir)
        groups: dict[str, list[Any]] = {}
        for r in rows:
            groups.setdefault(r.tier, []).append(r)
        if len(groups) > 1:
            groups["all"] = rows
        return groups

    def reader_matrix(self, group: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Labels and each reader's readings (``reader@session``) of the cases every reader of ``group`` read.

        The Obuchowski-Rockette analysis needs a fully crossed design: a case
        one reader of the group did not read is left out for all of them.
        """
        mapping = self.site.cfg.evaluation.score_mapping
        pos = {pid: i for i, pid in enumerate(self.site.arrays.patient_ids)}
        rows = [r for r in self.reader_groups().get(group, []) if r.patient_id in pos]
        readers = sorted({_reader_name(r.reader) for r in rows})
        by: dict[tuple[str, str], Any] = {(r.patient_id, _reader_name(r.reader)): r for r in rows}
        cases = sorted(p for p in {r.patient_id for r in rows} if all((p, rd) in by for rd in readers))
        y = np.asarray([self.site.arrays.labels[pos[p]] for p in cases], dtype=np.int64)
        scores: dict[str, np.ndarray] = {}
        for rd in readers:
            scores[reading_key(rd, "without_ai")] = np.asarray(
                [score_to_probability(by[(p, rd)].score_without_ai, mapping) for p in cases]
            )
            scores[reading_key(rd, "with_ai")] = np.asarray(
                [score_to_probability(by[(p, rd)].score_with_ai, mapping) for p in cases]
            )
        return y, scores

    def mrmc_stats(self) -> HistogramSet:
        """Grid statistics ``(group, reader@session)`` of every reader's readings (released like any other)."""
        out: HistogramSet = {}
        for group in self.reader_groups():
            y, scores = self.reader_matrix(group)
            if y.size == 0:
                continue
            for reading, p in scores.items():
                out[(group, reading)] = self.site.released(y, p)
        return out
