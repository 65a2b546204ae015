"""The clinical statistics' replies from another party are checked like every other reply.

Per-reader histograms (``evaluate.readers``, the ``mrmc`` record) and
cross-site histograms (``evaluate.crosssite``) pass the server's reply guard:
the run's grid, counts within the site's declared patients, well-formed names.
A hostile site's replies are dropped and recorded; the run finishes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from common.config import SiteConfig, with_sites
from common.configfile import load_config
from common.gridstats import ClassHistogram, ScoreGrid
from common.protocol import (
    CROSSSITE,
    MRMC,
    READERS,
    EvaluateReply,
    ReadersReply,
    Status,
    reply,
)
from common.records import arrays_from_record, arrays_record
from common.replycheck import ReplyRejected
from server.replyguard import ReplyContext, check_histograms
from server.runner import PlanRunner

from .test_hostile_replies import SITES, HostileGrid, _with

CFG = load_config("tiny")
BINS = CFG.evaluation.grid_bins


def _h(n: int, bins: int = BINS) -> ClassHistogram:
    rng = np.random.default_rng(n)
    y = np.arange(n) % 2
    return ClassHistogram.from_scores(y, rng.random(n), ScoreGrid(bins))


def test_honest_per_reader_and_cross_site_histograms_pass() -> None:
    ctx = ReplyContext(CFG, patients=10)
    body = ReadersReply(
        histograms={("junior", "with_ai"): _h(20)},  # (patient, reader) readings: may exceed the patients
        readings={("junior", "r1@with_ai"): _h(10), ("junior", "r1@without_ai"): _h(10)},
        n_arrays=3,
    )
    check_histograms(READERS, body, ctx)
    check_histograms(CROSSSITE, EvaluateReply(histogram=_h(10), num_examples=10), ctx)


@pytest.mark.parametrize(
    ("readings", "match"),
    [
        ({("junior", "r1"): _h(4)}, "not named"),  # no reader@session
        ({("junior", "a/b@with_ai"): _h(4)}, "not named"),  # a '/' would shift the fields
        ({("junior", "@with_ai"): _h(4)}, "not named"),
        ({("junior", "r1@with_ai"): _h(11)}, "more than"),  # one reader reads each case once
        ({("junior", "r1@with_ai"): _h(4, bins=100)}, "grid"),
    ],
)
def test_hostile_per_reader_histograms_are_rejected(
    readings: dict[tuple[str, str], ClassHistogram], match: str
) -> None:
    body = ReadersReply(histograms={}, readings=readings, n_arrays=1)
    with pytest.raises(ReplyRejected, match=match):
        check_histograms(READERS, body, ReplyContext(CFG, patients=10))


@pytest.mark.parametrize(("h", "match"), [(_h(11), "more than"), (_h(4, bins=100), "grid")])
def test_hostile_cross_site_histograms_are_rejected(h: ClassHistogram, match: str) -> None:
    with pytest.raises(ReplyRejected, match=match):
        check_histograms(CROSSSITE, EvaluateReply(histogram=h, num_examples=h.n), ReplyContext(CFG, 10))


@pytest.mark.usefixtures("task_identity")
def test_reader_reply_round_trips_and_the_per_reader_set_is_optional() -> None:
    """Decoded from the records as the server reads them (a site without per-reader data sends none)."""
    body = ReadersReply(
        histograms={("senior", "without_ai"): _h(6)},
        readings={("all", "s1@without_ai"): _h(3)},
        n_arrays=2,
    )
    content = reply(
        Message(RecordDict(), dst_node_id=1, message_type=READERS.type), Status("ok", "c"), body
    ).content
    got = READERS.read_reply(Message(content, dst_node_id=1, message_type=READERS.type))
    assert set(got.readings) == {("all", "s1@without_ai")}
    np.testing.assert_array_equal(
        got.readings[("all", "s1@without_ai")].pos, body.readings[("all", "s1@without_ai")].pos
    )
    del content[MRMC]  # an older site: tier histograms only
    assert READERS.read_reply(Message(content, dst_node_id=1, message_type=READERS.type)).readings == {}


def _inflate_crosssite(r: Message) -> RecordDict:
    arrays = arrays_from_record(r.content.array_records["stats"])
    arrays["pos"] = arrays["pos"] + 10**6
    return _with(r, arrays={"stats": arrays_record(arrays)})


def _rename_readings(r: Message) -> RecordDict:
    arrays = arrays_from_record(r.content.array_records[MRMC])
    return _with(r, arrays={MRMC: arrays_record({f"x/../{k}": v for k, v in arrays.items()})})


@pytest.mark.usefixtures("task_identity")
def test_a_hostile_site_in_the_cross_site_and_reader_steps_is_dropped(
    tiny_cohort: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        "tiny",
        {
            "run_folds": [0],
            "train": {"rounds": 1},
            "models": {"densenet2d": {"enabled": False}},
            "evaluation": {"cross_site": True},
        },
    )
    cfg = with_sites(cfg, tuple(SiteConfig(name=s) for s in SITES))
    tamper = {"evaluate.crosssite": _inflate_crosssite, "evaluate.readers": _rename_readings}
    grid = HostileGrid(
        {s: tiny_cohort / s for s in SITES}, tmp_path / "sites", bad_site="centre2", tamper=tamper
    )
    summary = PlanRunner(grid, cfg, tmp_path / "run", "hostile-clinical").run(expected_sites=2, wait_s=1)

    steps = {reason.split(":")[0] for reason in summary["rejected_replies"]["centre2"]}
    assert steps == {"crosssite", "readers"}
    assert "centre1" not in summary["rejected_replies"]
    matrix = summary["cross_site"]["matrix"]
    assert set(matrix) == {"global", "local:centre1", "local:centre2"}
    for row in matrix.values():  # every model at the honest site only
        assert set(row) == {"centre1"} and row["centre1"]["n"] > 0
