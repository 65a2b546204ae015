"""The wire protocol: every message of the plan, typed, and how it maps onto Flower records.

Client, server, simulation and bench build and read messages only through
this module, so the whole wire format (message names, record names, keys,
the status of a reply, how a dead node's reply is attributed) can be
audited here and in the table it generates (``python -m common.protocol >
docs/protocol.md``).  A request is a :class:`Header` (the experiment and the
run id, on every request) plus a frozen body dataclass; a reply is a
:class:`Status` plus a body.  Each body field says where it travels
(:func:`wire`); :func:`encode` and :func:`decode` are generic over them and
go through :mod:`common.records`, the only module that knows Flower's record
types.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from .delong import PlacementSums
from .foldcalibration import check_platt
from .gridstats import ClassHistogram
from .records import (
    WEIGHTS_KEY,
    RecordError,
    arrays_from_record,
    arrays_record,
    config_record,
    metric_record,
    to_transport,
)

# -- the records of a message ---------------------------------------------------------------------
CONFIG = "config"  # request parameters (ConfigRecord)
ARRAYS = "arrays"  # a model vector or model parameters (ArrayRecord)
STATS = "stats"  # aggregate statistics: histograms, moments (ArrayRecord)
METRICS = "metrics"  # scalars (MetricRecord)
STATUS = "status"  # every reply: state, site, reason (ConfigRecord)
MRMC = "mrmc"  # per-reader histograms for the multi-reader analysis (ArrayRecord)

NUM_EXAMPLES = "num-examples"  # the FedAvg weight; Flower's own strategies read it
PROXIMAL_MU = "proximal-mu"  # where Flower's FedProx puts its mu in the train config

STATE_OK = "ok"
STATE_UNAVAILABLE = "unavailable"
ROLE_TRAIN = "train"
ROLE_EXTERNAL = "external"
ROLES = (ROLE_TRAIN, ROLE_EXTERNAL)

K = TypeVar("K")
B = TypeVar("B")
HistogramSet = dict[tuple[str, ...], ClassHistogram]
"""Named histograms, e.g. ``(score, subset)`` -> histogram; on the wire ``score/subset/<field>``."""


class ProtocolError(RecordError):
    """A message does not have the layout its type promises (wrong peer, corrupt or hostile message)."""


class Place(Enum):
    """Where a body field travels."""

    CONFIG = "config scalar"
    JSON = "config JSON"
    WEIGHTS = "model vector"
    ARRAY = "array"
    HISTOGRAM = "histogram"
    HISTOGRAMS = "histogram set"
    PLACEMENTS = "placement sums"
    METRIC = "metric"


_RECORD_OF = {
    Place.CONFIG: CONFIG,
    Place.JSON: CONFIG,
    Place.WEIGHTS: ARRAYS,
    Place.ARRAY: ARRAYS,
    Place.HISTOGRAM: STATS,
    Place.HISTOGRAMS: STATS,
    Place.PLACEMENTS: METRICS,
    Place.METRIC: METRICS,
}


@dataclass(frozen=True)
class Wire:
    """How one body field travels: record, key, conversion on decode, documented size."""

    key: str
    place: Place
    record: str
    convert: Callable[[Any], Any] | None
    size: str
    depth: int = 0  # HISTOGRAMS: parts of a histogram's name
    counts_only: bool = False  # HISTOGRAM(S): no score sums (a third of the size)


def _whole(value: Any) -> int:
    """A count from another party: a finite whole number (NaN, inf and 2.5 are refused, not truncated)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{type(value).__name__} is not a number")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{x} is not finite")
    if x != round(x):
        raise ValueError(f"{x} is not a whole number")
    return int(x)


def _flag(value: Any) -> bool:
    """A yes/no metric from another party: exactly 0 or 1 (a metric record has no booleans)."""
    if _whole(value) not in (0, 1):
        raise ValueError(f"{value} is not 0 or 1")
    return bool(value)


def wire(
    key: str,
    place: Place,
    size: str,
    *,
    convert: Callable[[Any], Any] | None = None,
    record: str | None = None,
    depth: int = 0,
    counts_only: bool = False,
    default: Any = dataclasses.MISSING,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A body field and where it travels (``record`` defaults by place)."""
    meta = {"wire": Wire(key, place, record or _RECORD_OF[place], convert, size, depth, counts_only)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _wires(cls: type) -> list[tuple[str, Wire]]:
    return [(f.name, f.metadata["wire"]) for f in dataclasses.fields(cls)]


# -- histogram sets ----------------------------------------------------------------------------------
def histograms_to_arrays(
    hists: Mapping[tuple[str, ...], ClassHistogram], *, counts_only: bool = False
) -> dict[str, np.ndarray]:
    """Flat named arrays ``<name parts>/<field>`` of a histogram set."""
    return {
        "/".join((*name, key)): arr
        for name, h in hists.items()
        for key, arr in h.to_arrays(include_sums=not counts_only).items()
    }


def histograms_from_arrays(arrays: Mapping[str, np.ndarray], depth: int) -> HistogramSet:
    """Inverse of :func:`histograms_to_arrays`; the last name part keeps any further ``/``."""
    groups: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        name, sep, fld = key.rpartition("/")
        parts = tuple(name.split("/", depth - 1))
        if not sep or len(parts) != depth or not all(parts):
            raise ProtocolError(f"array {key!r} is not named <{depth} name part(s)>/<field>")
        groups.setdefault(parts, {})[fld] = value
    out: HistogramSet = {}
    for hname, d in groups.items():
        try:
            out[hname] = ClassHistogram.from_arrays(d)
        except ValueError as exc:
            raise ProtocolError(f"histogram {'/'.join(hname)}: {exc}") from exc
    return out


def aggregate(sets: Iterable[Mapping[K, ClassHistogram]]) -> dict[K, ClassHistogram]:
    """The one way sites' histogram sets are pooled: per name, :meth:`ClassHistogram.aggregate`."""
    grouped: dict[K, list[ClassHistogram]] = {}
    for s in sets:
        for name, h in s.items():
            grouped.setdefault(name, []).append(h)
    return {name: ClassHistogram.aggregate(hs) for name, hs in grouped.items()}


# -- request header and reply status ---------------------------------------------------------------------
@dataclass(frozen=True)
class Header:
    """On every request: the whole experiment config (the site builds the same model) and the run id."""

    experiment: dict[str, Any] = wire("experiment", Place.JSON, "the YAML config, ~2 KB")
    run_id: str = wire("run-id", Place.CONFIG, "short text", convert=str)


@dataclass(frozen=True)
class Status:
    """On every reply: ``ok``, or ``unavailable`` with a reason free of patient details."""

    state: str
    site: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.state == STATE_OK

    def record(self) -> ConfigRecord:
        values: dict[str, Any] = {"state": self.state, "site": self.site}
        if self.reason:
            values["reason"] = self.reason
        return ConfigRecord(values)

    @classmethod
    def from_record(cls, rec: ConfigRecord) -> Status:
        return cls(
            state=str(rec.get("state", STATE_OK)),
            site=str(rec.get("site", "")),
            reason=str(rec.get("reason", "")),
        )


# -- message bodies ------------------------------------------------------------------------------------------
_MODEL = "one float vector, the model codec's size (float32 or the run's transport_dtype)"
_HIST = "per histogram: 2 count arrays + 4 sum arrays of grid_bins"


@dataclass(frozen=True)
class Empty:
    """No body field."""


@dataclass(frozen=True)
class SiteInfoReply:
    patients: int = wire("patients", Place.METRIC, "1 int", convert=int)
    benign: int = wire("benign", Place.METRIC, "1 int", convert=int)
    malignant: int = wire("malignant", Place.METRIC, "1 int", convert=int)
    refused: int = wire("refused", Place.METRIC, "1 int", convert=int)
    environment: dict[str, Any] | None = wire(
        "environment", Place.JSON, "CPU, library versions, threads, device: ~0.5 KB text", default=None
    )
    device: dict[str, Any] | None = wire(
        "device",
        Place.JSON,
        "where it trains: device, its name, AMP, augmentation: ~0.1 KB text",
        default=None,
    )


@dataclass(frozen=True)
class RoundRequest:
    """Train (or validate) fold ``fold``'s model from the global weights of a round."""

    weights: np.ndarray = wire(WEIGHTS_KEY, Place.WEIGHTS, _MODEL)
    model: str = wire("model", Place.CONFIG, "name", convert=str)
    fold: int = wire("fold", Place.CONFIG, "1 int", convert=int)
    server_round: int = wire("server-round", Place.CONFIG, "1 int", convert=int)
    global_round: int = wire(
        "global-round", Place.CONFIG, "1 int (counts rounds of earlier processes)", convert=int
    )
    total_rounds: int = wire("total-rounds", Place.CONFIG, "1 int", convert=int)
    proximal_mu: float = wire(PROXIMAL_MU, Place.CONFIG, "1 float (FedProx)", convert=float, default=0.0)


@dataclass(frozen=True)
class TrainRequest(RoundRequest):
    """A round's training; with ``validate``, first the validation of the model it starts from.

    That model is the previous round's aggregate: validating it here, before
    the local epochs, saves the separate evaluate exchange (the model goes
    down once per round).  The server attributes the statistics to that round.
    """

    validate: bool = wire(
        "validate",
        Place.CONFIG,
        "1 bool: validate the received model (the previous round's aggregate) before training",
        convert=bool,
        default=False,
    )


@dataclass(frozen=True)
class EvaluateRequest(RoundRequest):
    """The fold's closing validation; with ``stage``, the site also keeps this model's predictions.

    The model validated last is usually the one selected, and predicting with
    it would send it down a third time: the site scores its fold's validation
    and test patients now and keeps the raw probabilities beside its other
    per-patient files, for a :class:`PredictRequest` naming this model by its
    digest (``client.stagedrows``).
    """

    stage: bool = wire(
        "stage",
        Place.CONFIG,
        "1 bool: keep this model's validation and test probabilities at the site for the prediction",
        convert=bool,
        default=False,
    )


@dataclass(frozen=True)
class TrainReply:
    weights: np.ndarray = wire(WEIGHTS_KEY, Place.WEIGHTS, _MODEL)
    num_examples: int = wire(
        NUM_EXAMPLES, Place.METRIC, "1 int: training patients (the FedAvg weight)", convert=_whole
    )
    loss: float = wire("loss", Place.METRIC, "1 float", convert=float)
    seconds: float = wire("seconds", Place.METRIC, "1 float", convert=float)
    steps: int = wire("steps", Place.METRIC, "1 int", convert=int)
    lr: float = wire("lr", Place.METRIC, "1 float", convert=float)
    epsilon: float | None = wire(
        "epsilon", Place.METRIC, "1 float, with DP only", convert=float, default=None
    )
    validation: ClassHistogram | None = wire(
        "",
        Place.HISTOGRAM,
        _HIST + ": the validation split under the received model, when the request asked (`validate`)",
        default=None,
    )


@dataclass(frozen=True)
class EvaluateReply:
    histogram: ClassHistogram = wire("", Place.HISTOGRAM, _HIST)
    num_examples: int = wire(NUM_EXAMPLES, Place.METRIC, "1 int: validation patients", convert=_whole)


def _digest(value: Any) -> str:
    """A model digest from the server: 64 lowercase hex digits (SHA-256), nothing else."""
    text = str(value)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"model digest {text[:80]!r} is not 64 hex digits")
    return text


@dataclass(frozen=True)
class PredictRequest:
    """Predict with a selected fold model: its ``weights``, or at a training site ``staged``, the
    digest (``common.records.model_digest``) of the model the site validated last and kept
    the predictions of (:class:`EvaluateRequest`); exactly one of the two."""

    model: str = wire("model", Place.CONFIG, "name", convert=str)
    fold: int = wire("fold", Place.CONFIG, "1 int", convert=int)
    round: int = wire("round", Place.CONFIG, "1 int: the selected round", convert=int)
    role: str = wire("role", Place.CONFIG, "train | external", convert=str)
    weights: np.ndarray | None = wire(
        WEIGHTS_KEY, Place.WEIGHTS, _MODEL + "; radiomics: 3F+1 floats; absent with `staged`", default=None
    )
    staged: str | None = wire(
        "staged",
        Place.CONFIG,
        "64 hex digits: SHA-256 of the model as the closing validation sent it; absent with `weights`",
        convert=_digest,
        default=None,
    )
    platt: tuple[float, float] | None = wire(
        "platt",
        Place.JSON,
        "2 floats (a, b): the fold's calibration sigmoid(a logit p + b), a > 0; absent: none",
        convert=check_platt,
        default=None,
    )


@dataclass(frozen=True)
class PredictReply:
    predicted: int = wire("predicted", Place.METRIC, "1 int", convert=int)
    resend: bool = wire(
        "resend",
        Place.METRIC,
        "1 bool: no kept predictions of the `staged` model here (predicted 0): send the weights",
        convert=_flag,
        default=False,
    )


@dataclass(frozen=True)
class EnsembleRequest:
    candidates: dict[str, list[list[float]]] = wire(
        "candidates", Place.JSON, "the simplex grid of weights per ensemble"
    )
    bins: int = wire("bins", Place.CONFIG, "1 int (<= 1000)", convert=int)
    role: str = wire("role", Place.CONFIG, "train", convert=str)


@dataclass(frozen=True)
class HistogramSetReply:
    histograms: HistogramSet = wire("", Place.HISTOGRAMS, _HIST, depth=2)
    n_arrays: int = wire("n-arrays", Place.METRIC, "1 int", convert=int)


@dataclass(frozen=True)
class ReadersReply:
    """Reader-study histograms per tier and session, and per reader for the multi-reader analysis."""

    histograms: HistogramSet = wire("", Place.HISTOGRAMS, _HIST + " per (tier, session)", depth=2)
    readings: HistogramSet = wire(
        "",
        Place.HISTOGRAMS,
        _HIST + " per (group, reader@session): the cases every reader of the group read",
        record=MRMC,
        depth=2,
        default_factory=dict,
    )
    n_arrays: int = wire("n-arrays", Place.METRIC, "1 int", convert=int, default=0)


@dataclass(frozen=True)
class CrossSiteRequest:
    """One fold model (the global one or a site's local-only one) to score at a site."""

    weights: np.ndarray = wire(WEIGHTS_KEY, Place.WEIGHTS, _MODEL)
    model: str = wire("model", Place.CONFIG, "name", convert=str)
    fold: int = wire("fold", Place.CONFIG, "1 int", convert=int)
    role: str = wire("role", Place.CONFIG, "train | external", convert=str)
    name: str = wire("name", Place.CONFIG, "global | local:<site>", convert=str)
    folds: list[int] = wire("folds", Place.JSON, "the folds of this model (external sites average them)")


@dataclass(frozen=True)
class EnsembleReply:
    histograms: HistogramSet = wire(
        "", Place.HISTOGRAMS, "2 count arrays of `bins` per (ensemble, candidate)", depth=2, counts_only=True
    )
    n_arrays: int = wire("n-arrays", Place.METRIC, "1 int", convert=int)


@dataclass(frozen=True)
class FinalRequest:
    ensembles: dict[str, list[float]] = wire("ensembles", Place.JSON, "fitted weights per ensemble")
    role: str = wire("role", Place.CONFIG, "train | external", convert=str)


@dataclass(frozen=True)
class DelongRequest:
    histograms: HistogramSet = wire(
        "",
        Place.HISTOGRAMS,
        "pooled counts: 2 arrays of grid_bins per (score, subset)",
        record=ARRAYS,
        depth=2,
        counts_only=True,
    )
    specs: list[list[str]] = wire(
        "specs",
        Place.JSON,
        "[score1, score2, subset] per comparison (subset `internal`, `external`, `readers/<tier>`, "
        "or `mrmc/<group>` with scores `<reader>@<session>`)",
    )
    ensembles: dict[str, list[float]] = wire("ensembles", Place.JSON, "fitted weights per ensemble")
    role: str = wire("role", Place.CONFIG, "train | external", convert=str)


@dataclass(frozen=True)
class DelongReply:
    sums: dict[int, PlacementSums] = wire("", Place.PLACEMENTS, "12 scalars per comparison")
    num_examples: int = wire(NUM_EXAMPLES, Place.METRIC, "1 int, always 0", convert=_whole, default=0)


@dataclass(frozen=True)
class FoldRequest:
    fold: int = wire("fold", Place.CONFIG, "1 int", convert=int)


@dataclass(frozen=True)
class FeatstatsReply:
    """Count, sum and sum of squares of the handcrafted features (the fold's training patients)."""

    n: np.ndarray = wire("n", Place.ARRAY, "1 float", record=STATS)
    sum: np.ndarray = wire("sum", Place.ARRAY, "F floats", record=STATS)
    sumsq: np.ndarray = wire("sumsq", Place.ARRAY, "F floats", record=STATS)
    num_examples: int = wire(NUM_EXAMPLES, Place.METRIC, "1 int", convert=_whole)

    def __add__(self, other: FeatstatsReply) -> FeatstatsReply:
        return FeatstatsReply(
            np.asarray(self.n, np.float64) + other.n,
            np.asarray(self.sum, np.float64) + other.sum,
            np.asarray(self.sumsq, np.float64) + other.sumsq,
            self.num_examples + other.num_examples,
        )


@dataclass(frozen=True)
class RadiomicsRequest:
    fold: int = wire("fold", Place.CONFIG, "1 int", convert=int)
    mean: np.ndarray = wire("mean", Place.ARRAY, "F floats: pooled feature means")
    std: np.ndarray = wire("std", Place.ARRAY, "F floats: pooled feature SDs")


@dataclass(frozen=True)
class RadiomicsReply:
    params: np.ndarray = wire("params", Place.ARRAY, "F+1 floats")
    num_examples: int = wire(NUM_EXAMPLES, Place.METRIC, "1 int", convert=_whole)


# -- encode / decode ------------------------------------------------------------------------------------------
def _encode_into(obj: Any, out: dict[str, dict[str, Any]], dtype: str, plain: set[str]) -> None:
    for name, w in _wires(type(obj)):
        value = getattr(obj, name)
        if value is None:
            continue
        rec = out.setdefault(w.record, {})
        if w.place in (Place.WEIGHTS, Place.ARRAY):
            plain.add(w.record)
        if w.place is Place.JSON:
            rec[w.key] = json.dumps(value)
        elif w.place is Place.WEIGHTS:
            rec[w.key] = to_transport(np.asarray(value), dtype)
        elif w.place is Place.HISTOGRAM:
            rec.update(value.to_arrays(include_sums=not w.counts_only))
        elif w.place is Place.HISTOGRAMS:
            rec.update(histograms_to_arrays(value, counts_only=w.counts_only))
        elif w.place is Place.PLACEMENTS:
            rec.update({f"{i}/{k}": float(v) for i, ps in value.items() for k, v in ps.to_dict().items()})
        else:
            rec[w.key] = value


def _records(values: dict[str, dict[str, Any]], plain: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, d in values.items():
        if name == CONFIG:
            out[name] = config_record(d)
        elif name == METRICS:
            out[name] = metric_record(d)
        else:  # a model vector's record stays plain: Flower's strategies aggregate it by key
            out[name] = arrays_record(d, pack=name not in plain)
    return out


def encode(*parts: Any, dtype: str = "float32") -> RecordDict:
    """The records of a message from its parts (header and body, or body alone); model vectors in ``dtype``."""
    values: dict[str, dict[str, Any]] = {}
    plain: set[str] = set()
    for p in parts:
        _encode_into(p, values, dtype, plain)
    return RecordDict(_records(values, plain))


def _record(content: RecordDict, name: str, place: Place) -> Any:
    """The record ``name`` of the Flower type ``place`` travels in (a record of another type does not count)."""
    group: Mapping[str, Any]
    if place in (Place.CONFIG, Place.JSON):
        group, kind = content.config_records, "config"
    elif place in (Place.METRIC, Place.PLACEMENTS):
        group, kind = content.metric_records, "metric"
    else:
        group, kind = content.array_records, "array"
    if name not in group:
        raise ProtocolError(f"message has no {name!r} {kind} record (records: {sorted(content.keys())})")
    return group[name]


def decode(content: RecordDict, cls: type[B]) -> B:
    """A body of type ``cls`` from a message's records; :class:`ProtocolError` when it does not fit."""
    values: dict[str, Any] = {}
    cache: dict[str, Any] = {}

    def arrays(rec: str) -> dict[str, np.ndarray]:
        if rec not in cache:
            cache[rec] = arrays_from_record(_record(content, rec, Place.ARRAY))
        return cache[rec]

    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name, w in _wires(cls):
        f = fields[name]
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        try:
            if w.place in (Place.CONFIG, Place.JSON, Place.METRIC):
                try:
                    rec = _record(content, w.record, w.place)
                except ProtocolError:
                    if has_default:  # an optional record left out altogether
                        continue
                    raise
                if w.key not in rec:
                    if has_default:
                        continue
                    raise ProtocolError(f"{w.record} has no {w.key!r}")
                raw = json.loads(str(rec[w.key])) if w.place is Place.JSON else rec[w.key]
                values[name] = w.convert(raw) if w.convert else raw
            elif w.place in (Place.WEIGHTS, Place.ARRAY):
                if has_default and (
                    w.record not in content.array_records or w.key not in arrays(w.record)
                ):  # an optional vector left out
                    continue
                arrs = arrays(w.record)
                if w.key not in arrs:
                    raise ProtocolError(f"{w.record} has no {w.key!r} array (keys: {sorted(arrs)[:8]})")
                dtype = np.float32 if w.place is Place.WEIGHTS else None
                values[name] = np.asarray(arrs[w.key], dtype=dtype).ravel()
            elif w.place is Place.HISTOGRAM:
                if has_default and w.record not in content.array_records:  # an optional histogram left out
                    continue
                values[name] = ClassHistogram.from_arrays(arrays(w.record))
            elif w.place is Place.HISTOGRAMS:
                if has_default and w.record not in content.array_records:  # an optional set left out
                    continue
                values[name] = histograms_from_arrays(arrays(w.record), w.depth)
            elif w.place is Place.PLACEMENTS:
                values[name] = _placements(_record(content, w.record, w.place))
        except ProtocolError:
            raise
        except (KeyError, ValueError, TypeError, OverflowError) as exc:
            raise ProtocolError(f"{cls.__name__}.{name}: {exc}") from exc
    return cls(**values)


def _placements(rec: Mapping[str, Any]) -> dict[int, PlacementSums]:
    per: dict[int, dict[str, Any]] = {}
    for key, value in rec.items():
        if "/" in key:
            idx, fld = key.split("/", 1)
            per.setdefault(int(idx), {})[fld] = value
    return {i: PlacementSums.from_dict(d) for i, d in per.items()}


# -- messages -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MessageSpec:
    """One message of the plan: its Flower type, bodies, parties and the privacy control on its reply."""

    action: str
    name: str
    request: type
    reply: type
    sender: str
    receiver: str
    purpose: str
    privacy: str

    @property
    def type(self) -> str:
        return f"{self.action}.{self.name}" if self.name else self.action

    def message(self, header: Header, body: Any, dst: int, *, dtype: str = "float32") -> Message:
        return self.messages(header, body, [dst], dtype=dtype)[0]

    def messages(self, header: Header, body: Any, dsts: Iterable[int], *, dtype: str = "float32") -> list[Message]:
        """The same request to every node in ``dsts``, encoded once: the model is cast for the wire
        once per exchange, not once per site (the messages share records that nothing changes once sent)."""
        content = encode(header, body, dtype=dtype)
        return [Message(content, message_type=self.type, dst_node_id=d) for d in dsts]

    def read_request(self, msg: Message) -> tuple[Header, Any]:
        return decode(msg.content, Header), decode(msg.content, self.request)

    def read_reply(self, msg: Message) -> Any:
        return decode(msg.content, self.reply)


_SERVER = "server"
_TRAINING = "training sites"
_ALL = "every site"
_ROLE = "training sites, then external sites"
_RELEASE = "grid histograms only; evaluation.min_cell_count and stats_noise applied at the site (`release`)"

SITEINFO = MessageSpec(
    MessageType.QUERY,
    "siteinfo",
    Empty,
    SiteInfoReply,
    _SERVER,
    _ALL,
    "discovery and rejoin: who a node is; validates and preprocesses the site's data",
    "patient counts only",
)
TRAIN = MessageSpec(
    MessageType.TRAIN,
    "",
    TrainRequest,
    TrainReply,
    _SERVER,
    _TRAINING,
    "one round of local epochs from the global model; from round 2 (or on resuming after an unvalidated "
    "checkpoint) it first validates that model, the previous round's aggregate, if that round competes "
    "for selection (evaluation.select_from_round): the model goes down once and up once per round",
    "model weights: DP-SGD (Opacus) when dp.enabled; norm screening at the server. Validation: " + _RELEASE,
)
EVALUATE = MessageSpec(
    MessageType.EVALUATE,
    "",
    EvaluateRequest,
    EvaluateReply,
    _SERVER,
    _TRAINING,
    "the last round's global model on the validation split (model selection): once per fold, after the "
    "final round (earlier rounds are validated by the next round's train message); with `stage` the site "
    "keeps that model's validation and test probabilities for the prediction",
    _RELEASE + "; kept probabilities stay at the site",
)
PREDICT = MessageSpec(
    MessageType.EVALUATE,
    "predict",
    PredictRequest,
    PredictReply,
    _SERVER,
    _ROLE,
    "predict with a selected fold model (or the radiomics model); when the fold's last round is selected, "
    "training sites get its digest instead of its weights and use the probabilities kept at its validation "
    "(`resend`: the weights follow)",
    "per-patient rows written at the site only; the reply is a count and a flag",
)
ENSEMBLE = MessageSpec(
    MessageType.EVALUATE,
    "ensemble",
    EnsembleRequest,
    EnsembleReply,
    _SERVER,
    _TRAINING,
    "validation histograms of every candidate ensemble weight vector",
    _RELEASE + "; counts only",
)
FINAL = MessageSpec(
    MessageType.EVALUATE,
    "final",
    FinalRequest,
    HistogramSetReply,
    _SERVER,
    _ROLE,
    "histograms of every score: internal-test (`fold<k>`) and validation (`val<k>`, where the operating "
    "threshold is chosen) at training sites, `external` at external sites",
    _RELEASE,
)
READERS = MessageSpec(
    MessageType.EVALUATE,
    "readers",
    Empty,
    ReadersReply,
    _SERVER,
    _ALL,
    "reader-study histograms per tier and session, and per reader (Obuchowski-Rockette multi-reader analysis)",
    _RELEASE,
)
CROSSSITE = MessageSpec(
    MessageType.EVALUATE,
    "crosssite",
    CrossSiteRequest,
    EvaluateReply,
    _SERVER,
    _ROLE,
    "cross-site evaluation (evaluation.cross_site): one fold model, global or a site's local-only one, "
    "on the site's internal-test patients (external: fold-averaged, answered after the last fold)",
    _RELEASE + "; model weights travel to the sites, patients never",
)
DELONG = MessageSpec(
    MessageType.EVALUATE,
    "delong",
    DelongRequest,
    DelongReply,
    _SERVER,
    _ROLE,
    "DeLong step 2: placement sums against the pooled histograms",
    "12 scalars per comparison; skipped when statistics are protected",
)
FEATSTATS = MessageSpec(
    MessageType.QUERY,
    "featstats",
    FoldRequest,
    FeatstatsReply,
    _SERVER,
    _TRAINING,
    "moments of the handcrafted features (federated standardisation)",
    "sums over the fold's training patients only",
)
RADIOMICS = MessageSpec(
    MessageType.TRAIN,
    "radiomics",
    RadiomicsRequest,
    RadiomicsReply,
    _SERVER,
    _TRAINING,
    "fit the radiomics logistic regression locally",
    "model parameters only",
)

MESSAGES: tuple[MessageSpec, ...] = (
    SITEINFO,
    TRAIN,
    EVALUATE,
    PREDICT,
    ENSEMBLE,
    FINAL,
    READERS,
    DELONG,
    CROSSSITE,
    FEATSTATS,
    RADIOMICS,
)


def spec_for(message_type: str) -> MessageSpec:
    for spec in MESSAGES:
        if spec.type == message_type:
            return spec
    raise ProtocolError(f"unknown message type {message_type!r}")


# -- replies --------------------------------------------------------------------------------------------------------
def reply(msg: Message, status: Status, body: Any, *, dtype: str = "float32") -> Message:
    """The reply to ``msg``: status plus body (model vectors in ``dtype``)."""
    content = encode(body, dtype=dtype)
    content[STATUS] = status.record()
    return Message(content, reply_to=msg)


def unavailable(msg: Message, site: str, reason: str) -> Message:
    """``state=unavailable`` with a reason (and ``num-examples`` 0, which Flower's own strategies read)."""
    content = RecordDict(
        {STATUS: Status(STATE_UNAVAILABLE, site, reason).record(), METRICS: metric_record({NUM_EXAMPLES: 0})}
    )
    return Message(content, reply_to=msg)


def status_of(msg: Message) -> Status | None:
    """The status a reply carries (``None`` when it has none, e.g. the SuperLink's error replies)."""
    if msg.has_error() or STATUS not in msg.content.config_records:
        return None
    return Status.from_record(msg.content.config_records[STATUS])


def reply_node(reply_msg: Message, sent: Sequence[Message]) -> int:
    """The node a reply stands for.

    When a node is gone (no heartbeat), the SuperLink itself answers in its
    place, from its own node id: the node is then the destination of the
    message that reply is about (Flower sets message ids when it pushes).
    """
    src = reply_msg.metadata.src_node_id
    if any(m.metadata.dst_node_id == src for m in sent):
        return src
    for m in sent:
        if m.metadata.message_id == reply_msg.metadata.reply_to_message_id:
            return m.metadata.dst_node_id
    return src


# -- the table --------------------------------------------------------------------------------------------------------
def _fields(cls: type) -> str:
    rows = []
    for _, w in _wires(cls):
        key = w.key or {Place.HISTOGRAM: "<field>", Place.PLACEMENTS: "<i>/<field>"}.get(
            w.place, "<name>/<field>"
        )
        rows.append(f"`{w.record}/{key}` ({w.place.value}; {w.size})")
    return "<br>".join(rows) or "—"


def protocol_table() -> str:
    """``docs/protocol.md``: every message, who sends it, its fields and sizes, the privacy control."""
    head = [
        "# Wire protocol",
        "",
        "Generated by `python -m common.protocol > docs/protocol.md` from `common/protocol.py`; "
        "`tests/test_protocol.py` fails when this file and the module disagree.",
        "",
        f"Every request also carries `{CONFIG}/experiment` (the config as JSON) and `{CONFIG}/run-id`. "
        f"Every reply carries `{STATUS}` (`state` = `{STATE_OK}` | `{STATE_UNAVAILABLE}`, `site`, `reason`); "
        "an unavailable reply has no body. "
        "F is the number of handcrafted features; grid_bins comes from the evaluation config. "
        "A record of histograms travels packed: one array per dtype plus a JSON index of "
        "(name, dtype, shape) (`common/records.py`), so hundreds of histograms are a few objects on the wire; "
        "a dtype's array travels zlib-compressed when that halves it (grid histograms are mostly empty bins), "
        "and must inflate to exactly what the index lists; a model vector's record is one plain array.",
        "",
        "| message | from → to | purpose | request fields | reply fields | privacy control |",
        "|---|---|---|---|---|---|",
    ]
    rows = [
        f"| `{s.type}` | {s.sender} → {s.receiver} | {s.purpose} | {_fields(s.request)} | {_fields(s.reply)} | {s.privacy} |"
        for s in MESSAGES
    ]
    return "\n".join(head + rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(protocol_table())
