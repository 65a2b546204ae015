"""Privacy audit: everything a site sends in a full run holds aggregate data only.

Records every reply of the real ClientApp during a complete plan (training,
validation, prediction, radiomics, ensemble fitting, reader study, DeLong)
and fails on any per-patient content: an array whose length equals one of
the site's patient counts or is not one of the protocol's fixed sizes, a
list in a MetricRecord, or a string naming a patient or a file.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from common.config import SiteConfig, with_sites
from common.configfile import load_config
from common.features import FEATURE_NAMES
from common.models import build_model
from common.protocol import MRMC, STATS
from common.records import ModelCodec, arrays_from_record
from common.sitedata import iter_cases
from common.splits import load_splits
from server.runner import PlanRunner

from .inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")
SITES = ("centre1", "centre2", "centre3")


class RecordingGrid(InProcessGrid):
    """The in-process grid, keeping every reply a site sends."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.replies: list[Message] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        self.replies += replies
        return replies


def test_no_reply_in_a_full_run_holds_per_patient_data(tiny_cohort: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny", {"run_folds": [0, 1], "train": {"rounds": 1}, "external_sites": ["centre3"]})
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    grid = RecordingGrid({s: tiny_cohort / s for s in SITES}, tmp_path / "sites")
    summary = PlanRunner(grid, cfg, tmp_path / "run", "audit").run(expected_sites=3, wait_s=1)
    assert "reader_study" in summary and summary["delong"]  # the audited run covered every phase

    # the sizes the protocol may send, and the patient counts it must never reveal
    codec_sizes = {
        ModelCodec.for_state_dict(build_model(k, getattr(cfg.models, k)).state_dict()).size
        for k in ("densenet3d", "densenet2d")
    }
    f = len(FEATURE_NAMES)
    allowed = codec_sizes | {
        cfg.evaluation.grid_bins,
        min(cfg.evaluation.grid_bins, 1000),
        1,
        f,
        f + 1,
        3 * f + 1,
    }
    ids: set[str] = set()
    counts: set[int] = set()
    for s in SITES:
        cases = list(iter_cases(tiny_cohort / s))
        ids |= {c.patient_id for c in cases}
        counts.add(len(cases))
        splits = tmp_path / "sites" / s / "audit" / "splits.json"
        if splits.is_file():
            for fold in load_splits(splits)[1]:
                counts |= {len(fold.train), len(fold.val), len(fold.test), len(fold.train) + len(fold.val)}
    assert not (allowed - {1}) & counts, "test set-up: a protocol size coincides with a patient count"
    id_pattern = re.compile("|".join(re.escape(i) for i in ids))

    kinds = {m.metadata.message_type for m in grid.replies}
    assert {
        "train",
        "evaluate",
        "evaluate.predict",
        "evaluate.ensemble",
        "evaluate.final",
        "evaluate.readers",
        "evaluate.delong",
        "train.radiomics",
        "query.featstats",
    } <= kinds
    for msg in grid.replies:
        where = f"{msg.metadata.message_type} reply from node {msg.metadata.src_node_id}"
        for rname, rec in msg.content.array_records.items():
            for key, arr in arrays_from_record(rec).items():  # a packed record's arrays, as the receiver reads them
                n = arr.size
                assert n in allowed, f"{where}: array {rname}/{key} of size {n} is not a protocol size"
                assert n == 1 or n not in counts, (
                    f"{where}: array {rname}/{key} has a patient count's length {n}"
                )
                assert not id_pattern.search(key), f"{where}: array key {key} names a patient"
        for rname, mrec in msg.content.metric_records.items():
            for key, value in mrec.items():
                assert not isinstance(value, list), f"{where}: metric {rname}/{key} is a list"
                assert not id_pattern.search(key), f"{where}: metric key {key} names a patient"
        for rname, crec in msg.content.config_records.items():
            for key, value in crec.items():
                text = str(value)
                assert not id_pattern.search(text), f"{where}: config {rname}/{key} names a patient: {text}"
                assert ".nii" not in text and str(tiny_cohort) not in text and "/" not in text, (
                    f"{where}: config {rname}/{key} holds a path: {text}"
                )


K = 3  # the sites' configured floor (and the server's min_cell_count) in the content audit


def _histograms(msg: Message) -> dict[str, dict[str, np.ndarray]]:
    """Every histogram a reply holds: ``{prefix: {field: array}}`` (fields ``neg``, ``pos``, sums)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for rname, rec in msg.content.array_records.items():
        if rname not in (STATS, MRMC):  # grid statistics, and the per-reader ones of the reader study
            continue
        for key, arr in arrays_from_record(rec).items():
            prefix, _, field = key.rpartition("/")
            if field in ("neg", "pos", "neg_sum", "pos_sum", "neg_sq", "pos_sq"):
                out.setdefault(f"{rname}:{prefix}", {})[field] = arr
    return out


def _patient_scores(sites_dir: Path, run_id: str, cohort: Path, cfg_mapping: tuple[float, ...]) -> np.ndarray:
    """Every per-patient probability the sites hold (model predictions, radiologist and reader scores)."""
    values: list[float] = list(cfg_mapping)
    for f in sites_dir.glob(f"*/{run_id}/predictions/*.csv"):
        with f.open() as fh:
            values += [float(r["probability"]) for r in csv.DictReader(fh)]
    return np.unique(np.asarray(values))


def test_released_statistics_at_the_site_floor_reveal_no_single_patients_score(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    """Finding 9: look at the CONTENTS of every histogram a site releases at its floor (k = 3).

    Fails if any released cell stands for 1..k-1 patients of a class (unless the
    histogram is one cell: the class has fewer than k patients there), if a cell
    of fewer than k patients sits anywhere but the grid's centre, if any sum is
    other than count x cell midpoint (an exact score), or if a cell's mean
    equals a patient's probability.
    """
    cfg = load_config(
        "tiny",
        {
            "run_folds": [0, 1],
            "train": {"rounds": 1},
            "external_sites": ["centre3"],
            "evaluation": {"min_cell_count": K, "cross_site": True},
        },
    )
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    grid = RecordingGrid({s: tiny_cohort / s for s in SITES}, tmp_path / "sites")
    for node in grid.node_config.values():  # each hospital's own floor, in its node config
        node["privacy-min-cell-count"] = K
    summary = PlanRunner(grid, cfg, tmp_path / "run", "audit-k").run(expected_sites=3, wait_s=1)
    assert not summary["unavailable_sites"] and not summary["rejected_replies"]
    kinds = {m.metadata.message_type for m in grid.replies}
    assert {
        "evaluate",
        "evaluate.ensemble",
        "evaluate.final",
        "evaluate.readers",
        "evaluate.crosssite",
    } <= kinds
    assert any(MRMC in m.content.array_records and m.content.array_records[MRMC] for m in grid.replies)
    assert "evaluate.delong" not in kinds  # placement sums are per-patient functions: not asked under a floor

    scores = _patient_scores(tmp_path / "sites", "audit-k", tiny_cohort, cfg.evaluation.score_mapping)
    assert scores.size > 100  # the audit compares against real per-patient values
    checked = 0
    for msg in grid.replies:
        where = f"{msg.metadata.message_type} reply from node {msg.metadata.src_node_id}"
        for name, h in _histograms(msg).items():
            bins = h["neg"].size
            mid = (np.arange(bins) + 0.5) / bins
            total = h["neg"] + h["pos"]
            occupied = np.flatnonzero(total)
            centre = min(int(0.5 * bins), bins - 1)
            for cls in ("neg", "pos"):
                c = h[cls]
                small = np.flatnonzero((c > 0) & (c < K))
                assert small.size == 0 or occupied.size == 1, (
                    f"{where}: {name}: cells {small[:5]} hold 1..{K - 1} {cls}"
                )
                for field, power in ((f"{cls}_sum", 1), (f"{cls}_sq", 2)):
                    if field in h:
                        np.testing.assert_allclose(
                            h[field], c * mid**power, atol=1e-9, err_msg=f"{where}: {name}/{field}"
                        )
            lone = np.flatnonzero((total > 0) & (total < K))
            assert all(b == centre for b in lone), (
                f"{where}: {name}: a cell of < {K} patients is located at {lone}"
            )
            # a cell's mean score (sum / count) is what an exact sum would give away for a lone patient
            means = np.concatenate(
                [h[f"{c}_sum"][h[c] > 0] / h[c][h[c] > 0] for c in ("neg", "pos") if f"{c}_sum" in h]
                or [np.zeros(0)]
            )
            hit = np.isin(np.round(means, 12), np.round(scores, 12))
            assert not hit.any(), f"{where}: {name}: cell mean {means[hit][:3]} is a patient's probability"
            checked += 1
    assert checked > 50
