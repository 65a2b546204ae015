"""The server's reply validators: every decoded reply passes these before it is used.

:class:`server.messenger.Messenger` runs :data:`REPLY_CHECKS` on each reply it
decodes (and the strategy on the round loop's replies), with the sender's
:class:`ReplyContext`: the run's configuration and the patients the site
declared at discovery.  Each check wraps the pure functions of
``common.replycheck`` and raises :class:`common.replycheck.ReplyRejected`
(a ``ValueError``) naming the field; the messenger drops that site for that
step and records why, and the run goes on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from common.config import ExperimentConfig
from common.features import FEATURE_NAMES
from common.gridstats import ClassHistogram
from common.protocol import (
    CROSSSITE,
    DELONG,
    ENSEMBLE,
    EVALUATE,
    FEATSTATS,
    FINAL,
    RADIOMICS,
    READERS,
    SITEINFO,
    TRAIN,
    MessageSpec,
)
from common.replycheck import (
    ReplyLimits,
    ReplyRejected,
    check_delong_sums,
    check_feature_moments,
    check_histogram_arrays,
    check_num_examples,
    check_params,
    check_site_info,
)

READINGS_PER_PATIENT = 50  # a reader-study histogram counts (patient, reader) readings: bound generously
RADIOMICS_MAX_COEF = 1e3  # logistic regression on standardised features: honest coefficients are O(1)


@dataclass(frozen=True)
class ReplyContext:
    """What a reply is checked against: the run's config and the sender's declared patients (None: unknown)."""

    cfg: ExperimentConfig
    patients: int | None = None

    def limits(self, bins: int) -> ReplyLimits:
        return ReplyLimits(bins, self.cfg.evaluation.stats_noise)

    def max_count(self, bins: int, per_patient: int = 1) -> int | None:
        return self.limits(bins).max_count(None if self.patients is None else self.patients * per_patient)


ReplyCheck = Callable[[MessageSpec, Any, ReplyContext], None]


def _grid_bins(spec: MessageSpec, cfg: ExperimentConfig) -> int:
    return min(cfg.evaluation.grid_bins, 1000) if spec is ENSEMBLE else cfg.evaluation.grid_bins


def check_histograms(spec: MessageSpec, body: Any, ctx: ReplyContext) -> None:
    """Histograms on the grid the server asked for, whole counts within the site's patients, possible sums.

    A train reply's validation statistics (``TrainReply.validation``) are held to the evaluate reply's rules.
    """
    if spec not in (TRAIN, EVALUATE, CROSSSITE, FINAL, READERS, ENSEMBLE):
        return
    if spec is TRAIN and body.validation is None:
        return
    bins = _grid_bins(spec, ctx.cfg)
    hists: Iterable[tuple[Any, ClassHistogram]]
    if spec is TRAIN:
        hists = [("validation", body.validation)]
    elif spec in (EVALUATE, CROSSSITE):
        hists = [("validation", body.histogram)]
    else:
        hists = body.histograms.items()
    _check_set(hists, bins, ctx.max_count(bins, READINGS_PER_PATIENT if spec is READERS else 1), spec)
    if spec is READERS:  # one reader's readings: each case at most once
        for group, reading in body.readings:
            reader, at, session = reading.rpartition("@")
            if not (group and reader and at and session) or "/" in reading:
                raise ReplyRejected("reader statistics are not named (<group>, <reader>@<session>)")
        _check_set(body.readings.items(), bins, ctx.max_count(bins), spec)


def _check_set(
    hists: Iterable[tuple[Any, ClassHistogram]], bins: int, cap: int | None, spec: MessageSpec
) -> None:
    for name, h in hists:
        if h.bins != bins:
            raise ReplyRejected(f"histograms on a {h.bins}-bin grid, expected {bins} (shape ({h.bins},))")
        try:
            check_histogram_arrays(
                h.to_arrays(include_sums=spec is not ENSEMBLE), bins=bins, max_patients=cap
            )
        except ReplyRejected as exc:
            label = "/".join(name) if isinstance(name, tuple) else str(name)
            raise ReplyRejected(f"{label}: {exc}") from None


def check_counts(spec: MessageSpec, body: Any, ctx: ReplyContext) -> None:
    """Discovery counts that add up; example counts finite, > 0 and within the site's patients."""
    if spec is SITEINFO:
        check_site_info({"patients": body.patients, "benign": body.benign, "malignant": body.malignant})
    elif spec is RADIOMICS:
        check_num_examples(body.num_examples, ctx.patients)
        check_params(body.params, len(FEATURE_NAMES) + 1, max_abs=RADIOMICS_MAX_COEF)
    elif spec is FEATSTATS:
        check_feature_moments(
            {"n": body.n, "sum": body.sum, "sumsq": body.sumsq}, len(FEATURE_NAMES), ctx.patients
        )


def check_delong(spec: MessageSpec, body: Any, ctx: ReplyContext) -> None:
    """DeLong step-2 scalars: finite, counts within the site's patients (readers: per reading)."""
    if spec is not DELONG:
        return
    flat = {f"{j}/{k}": v for j, ps in body.sums.items() for k, v in dataclasses.asdict(ps).items()}
    check_delong_sums(
        flat,
        max(body.sums, default=-1) + 1,
        ctx.max_count(ctx.cfg.evaluation.grid_bins, READINGS_PER_PATIENT),
    )


REPLY_CHECKS: tuple[ReplyCheck, ...] = (check_histograms, check_counts, check_delong)
