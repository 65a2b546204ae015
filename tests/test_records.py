"""The model codec and the record conversions shared by server and client."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.config import ModelConfig
from common.models import build_model, is_norm_key
from common.records import (
    PACKED_INDEX,
    ModelCodec,
    RecordError,
    arrays_from_record,
    arrays_record,
    weights_from_record,
    weights_record,
)


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model("densenet3d", ModelConfig(arch="small")).state_dict()


def test_pack_unpack_round_trip_skips_integer_buffers() -> None:
    state = _state()
    codec = ModelCodec.for_state_dict(state)
    assert all(torch.is_floating_point(state[k]) for k in codec.keys)
    assert any(k.endswith("num_batches_tracked") for k in state) and not any(k.endswith("num_batches_tracked") for k in codec.keys)
    back = codec.unpack(codec.pack(state))
    for k in codec.keys:
        torch.testing.assert_close(back[k], state[k].float())


def test_fedbn_codec_leaves_norm_layers_out() -> None:
    state = _state()
    codec = ModelCodec.for_state_dict(state, exclude_norm=True)
    assert codec.keys and not any(is_norm_key(k) for k in codec.keys)
    assert any(is_norm_key(k) for k in state)


def test_one_array_on_the_wire_and_float16_halves_bytes() -> None:
    codec = ModelCodec.for_state_dict(_state())
    flat = codec.pack(_state())
    r32, r16 = weights_record(flat, "float32"), weights_record(flat, "float16")
    assert len(r32) == 1
    n32 = sum(len(a.data) for a in r32.values())
    n16 = sum(len(a.data) for a in r16.values())
    assert n16 < 0.51 * n32
    np.testing.assert_allclose(weights_from_record(r16), flat, atol=2e-3, rtol=1e-3)


def test_wrong_size_vector_is_refused() -> None:
    codec = ModelCodec.for_state_dict(_state())
    with pytest.raises(RecordError, match="expected"):
        codec.unpack(np.zeros(codec.size - 1, np.float32))


def test_float16_overflow_is_refused() -> None:
    with pytest.raises(RecordError, match="float16 range"):
        weights_record(np.array([1e6], np.float32), "float16")


def test_statistics_arrays_round_trip() -> None:
    d = {"neg": np.arange(5, dtype=np.int64), "pos_sum": np.linspace(0, 1, 5)}
    back = arrays_from_record(arrays_record(d))
    for k, v in d.items():
        np.testing.assert_array_equal(back[k], v)


def test_a_histogram_set_travels_as_one_array_per_dtype() -> None:
    rng = np.random.default_rng(0)
    d = {
        f"mrmc/{g}/r{i}@s/{f}": (rng.integers(0, 9, 50) if f.endswith("n") else rng.random(50))
        for g in ("all", "junior")
        for i in range(30)
        for f in ("neg_n", "pos_n", "neg_sum")
    }
    d["grid"] = rng.random((2, 3)).astype(np.float32)
    rec = arrays_record(d)
    assert len(rec) == 4  # index + int64 + float64 + float32, not 181 objects
    back = arrays_from_record(rec)
    assert list(back) == list(d)
    for k, v in d.items():
        assert back[k].dtype == np.asarray(v).dtype and back[k].shape == np.asarray(v).shape
        np.testing.assert_array_equal(back[k], v)
    plain = arrays_record(d, pack=False)
    assert len(plain) == len(d) and all(np.array_equal(arrays_from_record(plain)[k], v) for k, v in d.items())


def _packed(index: object, **arrays: np.ndarray) -> ArrayRecord:
    raw = json.dumps(index).encode() if not isinstance(index, bytes) else index
    rec = {PACKED_INDEX: Array(np.frombuffer(raw, dtype=np.uint8))}
    rec.update({f"packed/{k}": Array(v) for k, v in arrays.items()})
    return ArrayRecord(rec)


F8 = {"<f8": np.zeros(4)}


@pytest.mark.parametrize(
    ("record", "why"),
    [
        (_packed(b"\xff{not json", **F8), "unreadable index"),
        (_packed({"a": 1}, **F8), "not a list"),
        (_packed([["a", "<f8"]], **F8), "bad index entry"),
        (_packed([["a", "|O", [4]]], **F8), "bad index entry"),  # object arrays never travel
        (_packed([["a", "<f8", [-4]]], **F8), "bad index entry"),
        (_packed([["a", "<f8", [True]]], **F8), "bad index entry"),
        (_packed([["a", "<f8", [2]], ["a", "<f8", [2]]], **F8), "twice"),
        (_packed([["a", "<f8", [5]]], **F8), "runs past the end"),
        (_packed([["a", "<f8", [2**30, 2**30]]], **F8), "runs past the end"),  # no huge view from a tiny array
        (_packed([["a", "<f8", [3]]], **F8), "does not cover"),  # bytes left over: refused, not ignored
        (_packed([["a", "<i8", [4]]], **F8), "no <i8 array"),
        (ArrayRecord({PACKED_INDEX: Array(np.frombuffer(b"[]", np.uint8)), "extra": Array(np.zeros(2))}), "unexpected array"),
        (_packed([["a", "<f8", [4]]], **{"<f8": np.zeros(4, np.float32)}), "expected flat <f8"),
        (_packed([["a", "<f8", [4]]], **{"<f8": np.zeros((2, 2))}), "expected flat <f8"),
    ],
)
def test_a_hostile_packed_record_is_refused_with_the_reason(record: ArrayRecord, why: str) -> None:
    with pytest.raises(RecordError, match=why):
        arrays_from_record(record)


def test_an_array_of_an_unlisted_dtype_is_not_packed() -> None:
    with pytest.raises(RecordError, match="does not travel"):
        arrays_record({"names": np.array(["a", "b"])})
