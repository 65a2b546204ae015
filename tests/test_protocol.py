"""The wire protocol: one module, a table that cannot drift, round trips, hostile messages."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message, RecordDict

from client.app import app as client_app
from common.delong import PlacementSums
from common.gridstats import ClassHistogram, ScoreGrid
from common.protocol import (
    ARRAYS,
    CONFIG,
    DELONG,
    ENSEMBLE,
    EVALUATE,
    FEATSTATS,
    MESSAGES,
    METRICS,
    STATS,
    TRAIN,
    Header,
    HistogramSet,
    ProtocolError,
    RoundRequest,
    Status,
    aggregate,
    decode,
    encode,
    histograms_from_arrays,
    histograms_to_arrays,
    protocol_table,
    reply,
    reply_node,
    status_of,
)

pytestmark = pytest.mark.usefixtures("task_identity")
REPO = Path(__file__).resolve().parents[1]
HEADER = Header(experiment={"name": "x", "seed": 1}, run_id="run-1")


def _hist(seed: int, bins: int = 10) -> ClassHistogram:
    rng = np.random.default_rng(seed)
    return ClassHistogram.from_scores(rng.integers(0, 2, 30), rng.random(30), ScoreGrid(bins))


def test_docs_protocol_md_is_the_generated_table_with_a_row_per_message() -> None:
    doc = (REPO / "docs" / "protocol.md").read_text()
    assert doc == protocol_table(), (
        "docs/protocol.md is stale: run `python -m common.protocol > docs/protocol.md`"
    )
    rows = [line for line in doc.splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [s.type for s in MESSAGES]


def test_every_client_handler_is_a_protocol_message_and_back() -> None:
    registered = set(client_app._registered_funcs)
    expected = {s.type if "." in s.type else f"{s.type}.default" for s in MESSAGES}
    assert registered == expected


def test_round_request_travels_intact_in_float16() -> None:
    w = np.linspace(-1, 1, 50, dtype=np.float32)
    req = RoundRequest(weights=w, model="densenet3d", fold=2, server_round=1, global_round=3, total_rounds=5)
    msg = TRAIN.message(HEADER, req, dst=7, dtype="float16")
    assert msg.metadata.message_type == TRAIN.type
    assert msg.content.array_records[ARRAYS]["weights"].dtype == "float16"
    header, back = TRAIN.read_request(msg)
    assert header == HEADER
    assert (back.model, back.fold, back.global_round, back.proximal_mu) == ("densenet3d", 2, 3, 0.0)
    np.testing.assert_allclose(back.weights, w, atol=1e-3)
    assert list(msg.content.array_records[ARRAYS].keys()) == ["weights"]  # plain: Flower aggregates it by key


def test_a_request_to_every_site_is_cast_for_the_wire_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.protocol as protocol

    casts: list[str] = []
    real = protocol.to_transport

    def counted(flat: np.ndarray, dtype: str) -> np.ndarray:
        casts.append(dtype)
        return real(flat, dtype)

    monkeypatch.setattr(protocol, "to_transport", counted)
    w = np.linspace(-1, 1, 50, dtype=np.float32)
    req = RoundRequest(weights=w, model="densenet3d", fold=2, server_round=1, global_round=3, total_rounds=5)
    msgs = TRAIN.messages(HEADER, req, iter([11, 12, 13]), dtype="float16")
    assert casts == ["float16"]  # one cast for three sites
    assert [m.metadata.dst_node_id for m in msgs] == [11, 12, 13]
    for m in msgs:
        assert m.metadata.message_type == TRAIN.type
        header, back = TRAIN.read_request(m)
        assert header == HEADER and back.fold == 2
        np.testing.assert_allclose(back.weights, w, atol=1e-3)


def test_a_reply_of_many_histograms_is_a_few_arrays_on_the_wire() -> None:
    from common.protocol import EnsembleReply
    from common.records import PACKED_INDEX

    body = EnsembleReply(histograms={("a+b", str(i)): _hist(i) for i in range(66)}, n_arrays=132)
    rec = encode(body).array_records[STATS]
    assert PACKED_INDEX in rec and len(rec) <= 3  # not 132 objects, each a request at every hop
    back = decode(encode(body), EnsembleReply)
    assert {k: v.neg.tolist() for k, v in back.histograms.items()} == {k: v.neg.tolist() for k, v in body.histograms.items()}


def test_histogram_sets_round_trip_and_aggregate_as_numpy_sums() -> None:
    a: HistogramSet = {("densenet3d", "fold0"): _hist(0), ("with_ai", "readers/junior"): _hist(1)}
    b: HistogramSet = {("densenet3d", "fold0"): _hist(2)}
    back = histograms_from_arrays(histograms_to_arrays(a), depth=2)
    assert set(back) == set(a)  # a last name part may hold a '/'
    np.testing.assert_array_equal(
        back[("with_ai", "readers/junior")].pos, a[("with_ai", "readers/junior")].pos
    )
    total = aggregate([a, b])
    np.testing.assert_array_equal(
        total[("densenet3d", "fold0")].neg, a[("densenet3d", "fold0")].neg + b[("densenet3d", "fold0")].neg
    )
    np.testing.assert_allclose(
        total[("densenet3d", "fold0")].pos_sum,
        a[("densenet3d", "fold0")].pos_sum + b[("densenet3d", "fold0")].pos_sum,
    )
    assert total[("with_ai", "readers/junior")] is a[("with_ai", "readers/junior")]


def test_every_reply_body_round_trips_through_flower_records() -> None:
    from common.protocol import DelongReply, EnsembleReply, FeatstatsReply

    bodies: list[Any] = [
        EnsembleReply(histograms={("a+b", "0"): _hist(3)}, n_arrays=2),
        DelongReply(sums={0: PlacementSums(3, 4, *([0.5] * 10)), 5: PlacementSums.zeros()}),
        FeatstatsReply(np.array([3.0]), np.arange(4.0), np.arange(4.0) ** 2, 3),
    ]
    for body in bodies:
        back = decode(encode(body), type(body))
        for f in dataclasses.fields(body):
            x, y = getattr(body, f.name), getattr(back, f.name)
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y)
            elif isinstance(x, dict) and isinstance(next(iter(x.values())), ClassHistogram):
                assert {k: v.neg.tolist() for k, v in x.items()} == {k: v.neg.tolist() for k, v in y.items()}
            else:
                assert x == y, f.name
    assert np.isnan(
        decode(encode(bodies[0]), type(bodies[0])).histograms[("a+b", "0")].pos_sum
    ).all()  # counts only


@pytest.mark.parametrize(
    "content, match",
    [
        (RecordDict({}), "no 'stats' array record"),
        (encode(HEADER), "no 'stats' array record"),
        (RecordDict({STATS: encode(Header({}, "r")).config_records[CONFIG]}), "no 'stats' array record"),
    ],
)
def test_a_reply_missing_its_records_is_a_protocol_error(content: RecordDict, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode(content, ENSEMBLE.reply)


def test_hostile_replies_are_protocol_errors_not_crashes() -> None:
    from common.records import arrays_record, metric_record

    bad_name = RecordDict(
        {STATS: arrays_record({"nofield": np.zeros(3)}), METRICS: metric_record({"n-arrays": 1})}
    )
    with pytest.raises(ProtocolError, match="not named"):
        decode(bad_name, ENSEMBLE.reply)
    negative = RecordDict(
        {
            STATS: arrays_record({"neg": -np.ones(10), "pos": np.ones(10)}),
            METRICS: metric_record({"num-examples": 1}),
        }
    )
    with pytest.raises(ProtocolError, match="non-negative"):
        decode(negative, EVALUATE.reply)
    bad_index = RecordDict({METRICS: metric_record({"x/n_pos": 1})})
    with pytest.raises(ProtocolError):
        decode(bad_index, DELONG.reply)
    no_weights = encode(HEADER, FEATSTATS.reply(np.array([1.0]), np.zeros(2), np.zeros(2), 1))
    with pytest.raises(ProtocolError, match="no 'arrays' array record"):
        TRAIN.read_reply(Message(no_weights, dst_node_id=1, message_type=TRAIN.type))


def test_reply_status_and_attribution_of_a_dead_nodes_reply() -> None:
    req = RoundRequest(np.zeros(3, np.float32), "densenet3d", 0, 1, 1, 1)
    sent = [TRAIN.message(HEADER, req, dst=n) for n in (11, 12)]
    for i, m in enumerate(sent):
        m.metadata.__dict__["_message_id"] = f"id-{i}"  # what Flower sets when it pushes
    ok = reply(sent[0], Status("ok", "centre1"), EVALUATE.reply(_hist(0), 30))
    ok.metadata.__dict__["_src_node_id"] = 11
    assert reply_node(ok, sent) == 11 and status_of(ok) == Status("ok", "centre1")
    from_superlink = Message(RecordDict({}), reply_to=sent[1])
    from_superlink.metadata.__dict__["_src_node_id"] = 1  # the SuperLink answers for a node that is gone
    assert reply_node(from_superlink, sent) == 12
    assert status_of(from_superlink) is None


def _literals(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
    }
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    }


def test_no_message_name_or_record_key_literal_outside_the_protocol_module() -> None:
    """Client, server and report reach Flower records only through common.protocol.

    Plain words that are also field or message names (fold, role, radiomics,
    train) are everyday names elsewhere; what is checked is the protocol's
    own spellings and any direct access to a message's records.
    """
    wire_keys = {
        f.metadata["wire"].key
        for s in MESSAGES
        for cls in (s.request, s.reply)
        for f in dataclasses.fields(cls)
    }
    forbidden = {s.type for s in MESSAGES if "." in s.type} | {
        k for k in wire_keys if "-" in k and k != "run-id"
    }
    files = [
        REPO / "client" / "app.py",
        REPO / "client" / "site.py",
        REPO / "common" / "report.py",
        *sorted((REPO / "server").glob("*.py")),
    ]
    found = {f"{p.relative_to(REPO)}: {lit!r}" for p in files for lit in _literals(p) & forbidden}
    assert not found, f"wire literals outside common/protocol.py: {sorted(found)}"
    direct = {
        f"{p.relative_to(REPO)}:{n.lineno} .{n.attr}"
        for p in files
        if p.name != "meteredgrid.py"  # counts the bytes of every record, reads no key
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.Attribute)
        and n.attr in ("config_records", "array_records", "metric_records", "content")
    }
    assert not direct, f"records read outside common/protocol.py: {sorted(direct)}"


def test_the_messengers_reply_checks_reject_statistics_on_another_grid() -> None:
    from typing import cast

    from common.configfile import load_config
    from common.protocol import FINAL, HistogramSetReply
    from server.messenger import Messenger
    from server.meteredgrid import MeteredGrid
    from server.registry import SiteRegistry

    cfg = load_config("tiny")
    messenger = Messenger(cast(MeteredGrid, None), SiteRegistry(cfg), HEADER, timeout=1.0)
    bins = cfg.evaluation.grid_bins
    messenger.check(EVALUATE, EVALUATE.reply(_hist(0, bins), 30))
    with pytest.raises(ProtocolError, match=f"10-bin grid, expected {bins}"):
        messenger.check(EVALUATE, EVALUATE.reply(_hist(0, 10), 30))
    with pytest.raises(ProtocolError, match="10-bin grid"):
        messenger.check(
            FINAL,
            HistogramSetReply(
                {("densenet3d", "fold0"): _hist(0, bins), ("radiologist", "fold0"): _hist(1, 10)}, 2
            ),
        )
