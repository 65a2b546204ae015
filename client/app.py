"""The Flower ClientApp: messages in, engine calls, aggregate records out.

Which hospital this is comes from the node config: ``site``, ``data-dir``,
``out-dir`` (and optionally ``threads``) in a deployment; in simulation the
partition id picks one of the sites the run config lists.  Every reply holds
a model vector or aggregate statistics and a ``status`` ConfigRecord; a
failure at the site becomes ``state=unavailable`` with a reason free of
patient details, so one bad site never crashes the federation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from common.config import ConfigError, ExperimentConfig
from common.configparse import from_dict
from common.models import ModelKind
from common.privacy import PrivacyBudgetExhausted
from common.protocol import (
    CROSSSITE,
    DELONG,
    ENSEMBLE,
    EVALUATE,
    FEATSTATS,
    FINAL,
    PREDICT,
    RADIOMICS,
    READERS,
    ROLE_EXTERNAL,
    SITEINFO,
    STATE_OK,
    TRAIN,
    DelongReply,
    EnsembleReply,
    EvaluateReply,
    HistogramSetReply,
    MessageSpec,
    RadiomicsReply,
    ReadersReply,
    Status,
    reply,
    unavailable,
)
from common.sitedata import SiteDataError

from .clinical import SiteClinical
from .floor import PrivacyFloorViolation, load_floor
from .requestcheck import RequestRejected, check_request
from .site import RunIdRejected, SiteContext, SiteRunner
from .sitestats import SiteStatistics

log = logging.getLogger(__name__)
app = ClientApp()


def site_context(context: Context) -> SiteContext:
    """Resolve this node's site from its node config (deployment) or partition id (simulation)."""
    node = context.node_config
    if "site" in node:
        return SiteContext(
            name=str(node["site"]),
            data_dir=Path(str(node["data-dir"])),
            out_dir=Path(str(node.get("out-dir", "site-output"))),
            threads=int(cast(int, node.get("threads", 1))),
        )
    sites_file = str(context.run_config.get("sim-sites-file", ""))
    if not sites_file:
        raise SiteDataError("node config has no 'site' and the run config no 'sim-sites-file'")
    sites = json.loads(Path(sites_file).read_text())
    pid = int(cast(int, node["partition-id"]))
    if pid >= len(sites):
        raise SiteDataError(f"simulation partition {pid} has no site (run config lists {len(sites)})")
    s = sites[pid]
    return SiteContext(
        name=s["name"],
        data_dir=Path(s["data_dir"]),
        out_dir=Path(s["out_dir"]),
        threads=int(s.get("threads", 1)),
    )


def _runner(msg: Message, context: Context, spec: MessageSpec) -> tuple[SiteRunner, Any]:
    """The site's runner for this message, once the request passed the site's privacy floor (``client.floor``)."""
    header, body = spec.read_request(msg)
    cfg: ExperimentConfig = from_dict(header.experiment)
    ctx = site_context(context)
    bins = getattr(body, "bins", None)  # a grid the message itself asks for (the ensemble search)
    load_floor(ctx.data_dir, context.node_config).check(cfg, bins=bins, step=spec.name)
    check_request(body, cfg, spec.type)
    return SiteRunner(ctx, cfg, header.run_id), body


def _on(
    spec: MessageSpec,
) -> Callable[[Callable[[Message, Context], Message]], Callable[[Message, Context], Message]]:
    """Register a handler for one message of the protocol (``@app.<action>(<name>)``)."""
    register = getattr(app, spec.action)
    return cast(
        Callable[[Callable[[Message, Context], Message]], Callable[[Message, Context], Message]],
        register(spec.name) if spec.name else register(),
    )


def _safe(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn a site-side failure into an 'unavailable' reply instead of an error reply.

    The reason sent names the kind of problem only; the details (files,
    patients) are logged at the site.  A node started in report-only mode
    (node config ``unavailable``: the site's data failed validation) answers
    every message this way with that reason, so the server learns why the
    site is out instead of waiting for it.
    """

    def wrapped(msg: Message, context: Context) -> Message:
        report_only = context.node_config.get("unavailable")
        if report_only:  # `flower-client run` found no usable data: say why, touch nothing
            return unavailable(msg, str(context.node_config.get("site", "?")), str(report_only))
        try:
            return handler(msg, context)
        except Exception as exc:
            site = "?"
            with contextlib.suppress(Exception):  # the node config itself may be broken
                site = site_context(context).name
            log.error("site %s failed on %s:\n%s", site, msg.metadata.message_type, traceback.format_exc())
            reason = f"{type(exc).__name__} at the site while handling {msg.metadata.message_type}"
            if isinstance(exc, SiteDataError):
                reason = "site data failed validation (details in the site's log)"
            elif isinstance(
                exc, PrivacyBudgetExhausted | PrivacyFloorViolation | RunIdRejected | RequestRejected | ConfigError
            ):
                reason = str(exc)
            return unavailable(msg, site, reason)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _ok(msg: Message, runner: SiteRunner, body: Any, *, dtype: str = "float32") -> Message:
    return reply(msg, Status(STATE_OK, runner.ctx.name), body, dtype=dtype)


@_on(SITEINFO)
@_safe
def siteinfo(msg: Message, context: Context) -> Message:
    """Validate and preprocess the site's data; reply with patient counts only."""
    runner, _ = _runner(msg, context, SITEINFO)
    return _ok(msg, runner, runner.info())


@_on(TRAIN)
@_safe
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global model; ``num-examples`` is the number of training patients.

    With ``validate``, the received model (the previous round's aggregate) is
    first validated as the evaluate message would (``SiteRunner.train_round``,
    released the same way), and the statistics travel back with the update.
    """
    runner, req = _runner(msg, context, TRAIN)
    kind = cast(ModelKind, req.model)
    out = runner.train_round(
        kind, req.fold, req.weights, req.global_round, req.total_rounds, req.proximal_mu, validate=req.validate
    )
    dtype = str(runner.cfg.federation.transport_dtype)
    return _ok(msg, runner, out, dtype=dtype)


@_on(EVALUATE)
@_safe
def evaluate(msg: Message, context: Context) -> Message:
    """Validation-split grid statistics of the global model (no per-patient value).

    With ``stage`` the site keeps this model's validation and test probabilities
    here, for a prediction request that names the model instead of sending it.
    """
    runner, req = _runner(msg, context, EVALUATE)
    h = runner.validate_round(cast(ModelKind, req.model), req.fold, req.weights, req.global_round, stage=req.stage)
    return _ok(msg, runner, EvaluateReply(histogram=h, num_examples=h.n))


@_on(PREDICT)
@_safe
def predict_fold(msg: Message, context: Context) -> Message:
    """Predict with a selected fold model (or the kept predictions of the one named); rows stay at the site."""
    runner, req = _runner(msg, context, PREDICT)
    out = runner.predict_fold(req.model, req.fold, req.weights, req.round, req.role, platt=req.platt, staged=req.staged)
    return _ok(msg, runner, out)


@_on(ENSEMBLE)
@_safe
def ensemble_search(msg: Message, context: Context) -> Message:
    """Validation histograms for every candidate ensemble weight vector."""
    runner, req = _runner(msg, context, ENSEMBLE)
    hists = SiteStatistics(runner).ensemble_search_stats(req.role, req.candidates, req.bins)
    return _ok(msg, runner, EnsembleReply(histograms=hists, n_arrays=len(hists)))


@_on(FINAL)
@_safe
def final(msg: Message, context: Context) -> Message:
    """Internal-test or external histograms of every score with the fitted ensemble weights."""
    runner, req = _runner(msg, context, FINAL)
    hists = SiteStatistics(runner).final_stats(req.role, req.ensembles)
    return _ok(msg, runner, HistogramSetReply(histograms=hists, n_arrays=len(hists)))


@_on(CROSSSITE)
@_safe
def cross_site(msg: Message, context: Context) -> Message:
    """Cross-site evaluation: one model's grid statistics on this site's test patients (weights in, counts out)."""
    runner, req = _runner(msg, context, CROSSSITE)
    h = SiteClinical(runner).cross_site_stats(
        cast(ModelKind, req.model), req.fold, req.weights, req.role, req.name, req.folds
    )
    return _ok(msg, runner, EvaluateReply(histogram=h, num_examples=h.n))


@_on(READERS)
@_safe
def readers(msg: Message, context: Context) -> Message:
    """Reader-study grid statistics per tier and session (nothing when the site has no reader study)."""
    runner, _ = _runner(msg, context, READERS)
    hists, readings = SiteStatistics(runner).reader_stats(), SiteClinical(runner).mrmc_stats()
    return _ok(msg, runner, ReadersReply(histograms=hists, readings=readings, n_arrays=len(hists) + len(readings)))


@_on(DELONG)
@_safe
def delong(msg: Message, context: Context) -> Message:
    """DeLong step 2: placement-value sums against the global histograms (scalars only)."""
    runner, req = _runner(msg, context, DELONG)
    bins = runner.cfg.evaluation.grid_bins
    if any(h.bins != bins for h in req.histograms.values()):
        raise ValueError(f"DeLong step 2: the server's histograms are not on this run's {bins}-bin grid")
    subsets = (ROLE_EXTERNAL,) if req.role == ROLE_EXTERNAL else ("internal",)
    sums = SiteStatistics(runner).delong_sums(req.specs, req.histograms, req.ensembles, subsets)
    return _ok(msg, runner, DelongReply(sums=sums))


@_on(FEATSTATS)
@_safe
def feature_moments(msg: Message, context: Context) -> Message:
    """Counts, sums and sums of squares of the handcrafted features (training split of the fold)."""
    runner, req = _runner(msg, context, FEATSTATS)
    return _ok(msg, runner, runner.feature_moments(req.fold))


@_on(RADIOMICS)
@_safe
def train_radiomics(msg: Message, context: Context) -> Message:
    """Fit the radiomics logistic regression locally on globally standardised features."""
    runner, req = _runner(msg, context, RADIOMICS)
    params, n = runner.fit_radiomics(req.fold, req.mean, req.std)
    return _ok(msg, runner, RadiomicsReply(params=params, num_examples=n))
