"""The only module that knows Flower's record types.

Both sides convert through here: model state dict <-> ArrayRecord (the model
codec), aggregate statistics <-> ArrayRecord/MetricRecord, config <->
ConfigRecord.  Keeping Flower in one module keeps the rest testable without
it and makes the wire format auditable in one place.

The codec packs every floating tensor of a state dict into ONE flat array.
Flower sends each array of a record as its own object; DenseNet121's 727
tensors made a loopback deployment 9.5x slower than a plain loop, one flat
array brings that to ~2.6x (stack notes).  Integer buffers
(``num_batches_tracked``) never travel: averaging them is meaningless and
adaptive optimisers turn them into NaN.  Reduced precision (float16) is a
transport choice made here; the server always aggregates in float64.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

# torch is imported where a model is (un)packed: the statistics and the report need none of it.
if TYPE_CHECKING:
    import torch

WEIGHTS_KEY = "weights"
TRANSPORT_DTYPES = {"float32": np.float32, "float16": np.float16}
FLOAT16_MAX = float(np.finfo(np.float16).max)


class RecordError(ValueError):
    """A record does not have the expected layout (wrong model, corrupt message)."""


@dataclass(frozen=True)
class ModelCodec:
    """Which state-dict entries travel, in which order and shapes.

    Built from the model on both sides (same factory, same config), so the
    layout itself never needs to travel.  ``exclude_norm`` keeps
    normalisation layers local (FedBN).
    """

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def for_state_dict(cls, state: Mapping[str, torch.Tensor], *, exclude_norm: bool = False) -> ModelCodec:
        import torch

        from .models import is_norm_key

        keys, shapes = [], []
        for k, v in state.items():
            if not torch.is_floating_point(v) or (exclude_norm and is_norm_key(k)):
                continue
            keys.append(k)
            shapes.append(tuple(v.shape))
        return cls(tuple(keys), tuple(shapes))

    @property
    def size(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    def pack(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """Flat float32 vector of the travelling entries, in codec order."""
        return np.concatenate(
            [state[k].detach().cpu().numpy().astype(np.float32, copy=False).ravel() for k in self.keys]
        )

    def unpack(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """State-dict fragment (float32 tensors) from a flat vector."""
        import torch

        flat = np.asarray(flat)
        if flat.ndim != 1 or flat.size != self.size:
            raise RecordError(f"model vector has {flat.size} values, expected {self.size} for this model")
        out: dict[str, torch.Tensor] = {}
        pos = 0
        for k, shape in zip(self.keys, self.shapes, strict=True):
            n = int(np.prod(shape))
            out[k] = torch.from_numpy(flat[pos : pos + n].astype(np.float32).reshape(shape))
            pos += n
        return out


def to_transport(flat: np.ndarray, dtype: str) -> np.ndarray:
    """Cast a float vector for the wire; refuse float16 when values would overflow."""
    if dtype not in TRANSPORT_DTYPES:
        raise RecordError(f"unknown transport dtype {dtype!r}")
    if dtype == "float16" and flat.size and float(np.max(np.abs(flat))) > FLOAT16_MAX:
        raise RecordError("model values exceed the float16 range; use transport_dtype float32")
    return np.ascontiguousarray(flat, dtype=TRANSPORT_DTYPES[dtype])


def model_digest(flat: np.ndarray, dtype: str) -> str:
    """SHA-256 of a model vector as it travels in ``dtype``: the same on both sides of the wire.

    The server hashes its float32 checkpoint cast for the wire, the site the float32
    view of what it received cast back (exact: float16 -> float32 -> float16 is the
    identity), so a site can tell that a request names the very model it already holds.
    """
    return hashlib.sha256(to_transport(np.asarray(flat).ravel(), dtype).tobytes()).hexdigest()


def weights_record(flat: np.ndarray, dtype: str = "float32") -> ArrayRecord:
    """One-array ArrayRecord carrying a packed model."""
    return ArrayRecord({WEIGHTS_KEY: Array(to_transport(flat, dtype))})


def weights_from_record(record: ArrayRecord) -> np.ndarray:
    """The packed model of a record, as float32 (whatever the transport dtype)."""
    if WEIGHTS_KEY not in record:
        raise RecordError(f"record has no {WEIGHTS_KEY!r} array (keys: {list(record.keys())})")
    return np.asarray(record[WEIGHTS_KEY].numpy(), dtype=np.float32).ravel()


# Statistics records (histogram sets) pack their named arrays the same way: one array per dtype
# plus a JSON index of (name, dtype, shape), so a reply of a few hundred histograms is three
# objects on the wire instead of hundreds of round trips (each its own request at every hop).
# A grid histogram has 10,000 bins for a site's few dozen patients, so nearly all of its
# bytes are zeros: a dtype's array travels zlib-compressed when that halves it (the reader
# study's 14 MB reply per site becomes tens of kB), checked against the index on arrival.
PACKED_INDEX = "packed-index"
PACKED_PREFIX = "packed/"
PACKED_ZLIB_PREFIX = "packed-zlib/"
PACKABLE_DTYPES = frozenset({"<f2", "<f4", "<f8", "<i4", "<i8", "|u1"})
MAX_PACKED_ENTRIES = 1_000_000
MAX_INFLATED_BYTES = 256 * 2**20  # a compressed array may not claim more (no zip bomb from another party)
ZLIB_LEVEL = 1  # the fastest: runs of zeros compress as well at every level


def arrays_record(arrays: Mapping[str, np.ndarray], *, pack: bool = True) -> ArrayRecord:
    """Named arrays (histograms, sums) as a record: packed (default) or one Flower array each."""
    if not pack:
        return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    index: list[list[Any]] = []
    parts: dict[str, list[np.ndarray]] = {}
    for name, value in arrays.items():
        a = np.ascontiguousarray(value)
        dt = a.dtype.str  # e.g. '<f8'; a big-endian array is refused below
        if dt not in PACKABLE_DTYPES:
            raise RecordError(f"array {name!r}: dtype {a.dtype} does not travel")
        index.append([str(name), dt, [int(n) for n in a.shape]])
        parts.setdefault(dt, []).append(a.ravel())
    rec = {PACKED_INDEX: Array(np.frombuffer(json.dumps(index).encode(), dtype=np.uint8))}
    for dt, arrs in parts.items():
        flat = np.concatenate(arrs).astype(np.dtype(dt), copy=False)
        deflated = zlib.compress(flat.tobytes(), ZLIB_LEVEL)
        if 2 * len(deflated) <= flat.nbytes:
            rec[PACKED_ZLIB_PREFIX + dt] = Array(np.frombuffer(deflated, dtype=np.uint8))
        else:
            rec[PACKED_PREFIX + dt] = Array(flat)
    return ArrayRecord(rec)


def _inflate(key: str, raw: np.ndarray, dt: str, values: int) -> np.ndarray:
    """The flat ``dt`` array a compressed one holds: exactly the ``values`` its index lists, or refused."""
    nbytes = values * np.dtype(dt).itemsize
    if nbytes > MAX_INFLATED_BYTES:
        raise RecordError(f"packed record: {key!r} would inflate to {nbytes} bytes (at most {MAX_INFLATED_BYTES})")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise RecordError(f"packed record: {key!r} is {raw.dtype} of shape {raw.shape}, expected flat bytes")
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(raw.tobytes(), nbytes + 1)  # one byte more than listed shows an overrun
    except zlib.error as exc:
        raise RecordError(f"packed record: {key!r} is not zlib data ({exc})") from None
    if len(out) != nbytes or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise RecordError(f"packed record: {key!r} does not inflate to the {values} values its index lists")
    return np.frombuffer(out, dtype=np.dtype(dt))


def _packed_index(raw: np.ndarray) -> list[tuple[str, str, tuple[int, ...]]]:
    try:
        index = json.loads(np.asarray(raw, dtype=np.uint8).tobytes().decode())
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise RecordError(f"packed record: unreadable index ({exc})") from None
    if not isinstance(index, list) or len(index) > MAX_PACKED_ENTRIES:
        raise RecordError("packed record: the index is not a list of at most 1e6 entries")
    out = []
    for entry in index:
        if not (
            isinstance(entry, list)
            and len(entry) == 3
            and isinstance(entry[0], str)
            and entry[1] in PACKABLE_DTYPES
            and isinstance(entry[2], list)
            and len(entry[2]) <= 8
            and all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**31 for n in entry[2])
        ):
            raise RecordError(f"packed record: bad index entry {str(entry)[:80]}")
        out.append((entry[0], entry[1], tuple(entry[2])))
    return out


def arrays_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The named arrays of a record (either layout); a packed one must tile its arrays exactly."""
    if PACKED_INDEX not in record:
        return {k: np.asarray(v.numpy()) for k, v in record.items()}
    index = _packed_index(record[PACKED_INDEX].numpy())
    listed: dict[str, int] = {}
    for _, dt, shape in index:
        listed[dt] = listed.get(dt, 0) + int(np.prod(shape, dtype=object))
    data: dict[str, np.ndarray] = {}
    for key in record:
        if key == PACKED_INDEX:
            continue
        deflated = key.startswith(PACKED_ZLIB_PREFIX)
        dt = key.removeprefix(PACKED_ZLIB_PREFIX if deflated else PACKED_PREFIX)
        if not (deflated or key.startswith(PACKED_PREFIX)) or dt not in PACKABLE_DTYPES:
            raise RecordError(f"packed record: unexpected array {key!r}")
        if dt in data:
            raise RecordError(f"packed record: two {dt} arrays")
        arr = np.asarray(record[key].numpy())
        if deflated:
            arr = _inflate(key, arr, dt, listed.get(dt, 0))
        elif arr.ndim != 1 or arr.dtype != np.dtype(dt):
            raise RecordError(f"packed record: {key!r} is {arr.dtype} of shape {arr.shape}, expected flat {dt}")
        data[dt] = arr
    out: dict[str, np.ndarray] = {}
    pos = dict.fromkeys(data, 0)
    for name, dt, shape in index:
        if name in out:
            raise RecordError(f"packed record: {name!r} twice")
        if dt not in data:
            raise RecordError(f"packed record: {name!r} is {dt}, but no {dt} array travelled")
        n = int(np.prod(shape, dtype=object))
        if pos[dt] + n > data[dt].size:
            raise RecordError(f"packed record: {name!r} runs past the end of the {dt} array")
        out[name] = data[dt][pos[dt] : pos[dt] + n].reshape(shape)
        pos[dt] += n
    short = [dt for dt, arr in data.items() if pos[dt] != arr.size]
    if short:
        raise RecordError(f"packed record: the index does not cover the {', '.join(short)} array(s)")
    return out


def metric_record(values: Mapping[str, float | int]) -> MetricRecord:
    """Scalars only: a MetricRecord is never used for per-patient lists here."""
    clean: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, bool | int | np.integer):
            clean[k] = int(v)
        else:
            clean[k] = float(v)
    return MetricRecord(clean)


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    """Config for a message; nested values are carried as a JSON string."""
    clean: dict[str, Any] = {}
    for k, v in values.items():
        clean[k] = json.dumps(v) if isinstance(v, dict | list | tuple) else v
    return ConfigRecord(clean)


def config_json(record: ConfigRecord, key: str) -> Any:
    """Decode a JSON value carried by :func:`config_record`."""
    if key not in record:
        raise RecordError(f"config has no {key!r}")
    return json.loads(str(record[key]))


def config_values(record: ConfigRecord, keys: Iterable[str]) -> dict[str, Any]:
    return {k: record[k] for k in keys if k in record}
