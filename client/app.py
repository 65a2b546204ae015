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

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from common.config import ExperimentConfig, from_dict
from common.gridstats import ClassHistogram
from common.models import ModelKind
from common.privacy import PrivacyBudgetExhausted
from common.records import (
    arrays_from_record,
    arrays_record,
    config_json,
    metric_record,
    weights_from_record,
    weights_record,
)
from common.sitedata import SiteDataError

from .site import SiteContext, SiteRunner

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
    return SiteContext(name=s["name"], data_dir=Path(s["data_dir"]), out_dir=Path(s["out_dir"]), threads=int(s.get("threads", 1)))


def _runner(msg: Message, context: Context) -> tuple[SiteRunner, ConfigRecord]:
    config = msg.content.config_records["config"]
    cfg: ExperimentConfig = from_dict(config_json(config, "experiment"))
    return SiteRunner(site_context(context), cfg, str(config["run-id"])), config


def _reply(msg: Message, site: str, records: dict[str, Any]) -> Message:
    content = RecordDict({"status": ConfigRecord({"state": "ok", "site": site}), **records})
    return Message(content, reply_to=msg)


def _safe(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn a site-side failure into an 'unavailable' reply instead of an error reply.

    The reason sent names the kind of problem only; the details (files,
    patients) are logged at the site.  A node started in report-only mode
    (node config ``unavailable``: the site's data failed validation) answers
    every message this way with that reason, so the server learns why the
    site is out instead of waiting for it.
    """

    def unavailable(msg: Message, site: str, reason: str) -> Message:
        status = ConfigRecord({"state": "unavailable", "site": site, "reason": reason})
        return Message(RecordDict({"status": status, "metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)

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
            elif isinstance(exc, PrivacyBudgetExhausted):
                reason = str(exc)
            return unavailable(msg, site, reason)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


@app.query("siteinfo")
@_safe
def siteinfo(msg: Message, context: Context) -> Message:
    """Validate and preprocess the site's data; reply with patient counts only."""
    runner, _ = _runner(msg, context)
    return _reply(msg, runner.ctx.name, {"metrics": metric_record(runner.info())})


@app.train()
@_safe
def train(msg: Message, context: Context) -> Message:
    """Local epochs from the global model; ``num-examples`` is the number of training patients."""
    runner, config = _runner(msg, context)
    kind = cast(ModelKind, str(config["model"]))
    flat, metrics = runner.train_round(
        kind,
        int(cast(int, config["fold"])),
        weights_from_record(msg.content.array_records["arrays"]),
        int(cast(int, config["global-round"])),
        int(cast(int, config["total-rounds"])),
        float(cast(float, config.get("proximal-mu", 0.0))),
    )
    dtype = str(runner.cfg.federation.transport_dtype)
    return _reply(msg, runner.ctx.name, {"arrays": weights_record(flat, dtype), "metrics": metric_record(metrics)})


@app.evaluate()
@_safe
def evaluate(msg: Message, context: Context) -> Message:
    """Validation-split grid statistics of the global model (no per-patient value)."""
    runner, config = _runner(msg, context)
    kind = cast(ModelKind, str(config["model"]))
    fold, rnd = int(cast(int, config["fold"])), int(cast(int, config["global-round"]))
    h = runner.validate_round(kind, fold, weights_from_record(msg.content.array_records["arrays"]), rnd)
    n = int(h.neg.sum() + h.pos.sum())
    return _reply(msg, runner.ctx.name, {"stats": arrays_record(h.to_arrays()), "metrics": metric_record({"num-examples": n})})


@app.evaluate("predict")
@_safe
def predict_fold(msg: Message, context: Context) -> Message:
    """Predict with a selected fold model; per-patient rows are written at the site only."""
    runner, config = _runner(msg, context)
    counts = runner.predict_fold(
        cast(ModelKind, str(config["model"])),
        int(cast(int, config["fold"])),
        weights_from_record(msg.content.array_records["arrays"]),
        int(cast(int, config["round"])),
        str(config["role"]),
        platt=config_json(config, "platt") if "platt" in config else None,  # checked by the site
    )
    return _reply(msg, runner.ctx.name, {"metrics": metric_record(counts)})


@app.evaluate("ensemble")
@_safe
def ensemble_search(msg: Message, context: Context) -> Message:
    """Validation histograms for every candidate ensemble weight vector."""
    runner, config = _runner(msg, context)
    stats = runner.ensemble_search_stats(
        str(config["role"]), config_json(config, "candidates"), int(cast(int, config["bins"]))
    )
    return _reply(msg, runner.ctx.name, {"stats": arrays_record(stats), "metrics": metric_record({"n-arrays": len(stats)})})


@app.evaluate("final")
@_safe
def final(msg: Message, context: Context) -> Message:
    """Internal-test or external histograms of every score with the fitted ensemble weights."""
    runner, config = _runner(msg, context)
    stats = runner.final_stats(str(config["role"]), config_json(config, "ensembles"))
    return _reply(msg, runner.ctx.name, {"stats": arrays_record(stats), "metrics": metric_record({"n-arrays": len(stats)})})


@app.evaluate("readers")
@_safe
def readers(msg: Message, context: Context) -> Message:
    """Reader-study grid statistics per tier and session (nothing when the site has no reader study)."""
    runner, _ = _runner(msg, context)
    stats = runner.reader_stats()
    return _reply(msg, runner.ctx.name, {"stats": arrays_record(stats), "metrics": metric_record({"n-arrays": len(stats)})})


@app.evaluate("delong")
@_safe
def delong(msg: Message, context: Context) -> Message:
    """DeLong step 2: placement-value sums against the global histograms (scalars only)."""
    runner, config = _runner(msg, context)
    arrays = arrays_from_record(msg.content.array_records["arrays"])
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, field = key.rsplit("/", 1)
        groups.setdefault(name, {})[field] = value
    hists = {name: ClassHistogram.from_arrays(d) for name, d in groups.items()}
    role = str(config["role"])
    sums = runner.delong_sums(
        config_json(config, "specs"),
        hists,
        config_json(config, "ensembles"),
        ("external",) if role == "external" else ("internal",),
    )
    sums["num-examples"] = 0
    return _reply(msg, runner.ctx.name, {"metrics": metric_record(sums)})


@app.query("featstats")
@_safe
def feature_moments(msg: Message, context: Context) -> Message:
    """Counts, sums and sums of squares of the handcrafted features (training split of the fold)."""
    runner, config = _runner(msg, context)
    stats = runner.feature_moments(int(cast(int, config["fold"])))
    return _reply(msg, runner.ctx.name, {"stats": arrays_record(stats), "metrics": metric_record({"num-examples": int(stats["n"][0])})})


@app.train("radiomics")
@_safe
def train_radiomics(msg: Message, context: Context) -> Message:
    """Fit the radiomics logistic regression locally on globally standardised features."""
    runner, config = _runner(msg, context)
    stats = arrays_from_record(msg.content.array_records["arrays"])
    params, n = runner.fit_radiomics(int(cast(int, config["fold"])), stats["mean"], stats["std"])
    return _reply(msg, runner.ctx.name, {"arrays": arrays_record({"params": params}), "metrics": metric_record({"num-examples": n})})

