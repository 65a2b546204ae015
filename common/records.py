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

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from .models import is_norm_key

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


def weights_record(flat: np.ndarray, dtype: str = "float32") -> ArrayRecord:
    """One-array ArrayRecord carrying a packed model."""
    return ArrayRecord({WEIGHTS_KEY: Array(to_transport(flat, dtype))})


def weights_from_record(record: ArrayRecord) -> np.ndarray:
    """The packed model of a record, as float32 (whatever the transport dtype)."""
    if WEIGHTS_KEY not in record:
        raise RecordError(f"record has no {WEIGHTS_KEY!r} array (keys: {list(record.keys())})")
    return np.asarray(record[WEIGHTS_KEY].numpy(), dtype=np.float32).ravel()


def arrays_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Aggregate statistics (histograms, sums) as named arrays."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def arrays_from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.numpy()) for k, v in record.items()}


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
