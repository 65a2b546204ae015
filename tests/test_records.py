"""The model codec and the record conversions shared by server and client."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from common.config import ModelConfig
from common.models import build_model, is_norm_key
from common.records import (
    MAX_INFLATED_BYTES,
    PACKED_INDEX,
    PACKED_PREFIX,
    PACKED_ZLIB_PREFIX,
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


def test_a_sparse_histogram_set_travels_compressed_and_comes_back_exact() -> None:
    """10,000-bin histograms of a few dozen patients: nearly all zeros, so the float64 array travels deflated."""
    rng = np.random.default_rng(1)
    d = {}
    for i in range(12):
        for field in ("neg", "pos"):
            h = np.zeros(10_000)
            h[rng.integers(0, 10_000, 30)] += 1.0
            d[f"r{i}/{field}"] = h
    d["n"] = rng.integers(0, 2**62, 7)  # no runs of zeros: deflating would not halve it, so it travels as is
    rec = arrays_record(d)
    assert set(rec) == {PACKED_INDEX, PACKED_ZLIB_PREFIX + "<f8", PACKED_PREFIX + "<i8"}
    assert sum(len(a.data) for a in rec.values()) < 0.05 * sum(v.nbytes for v in d.values())
    back = arrays_from_record(rec)
    assert list(back) == list(d)
    for k, v in d.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)


def test_dense_statistics_travel_as_they_are() -> None:
    d = {"sums": np.random.default_rng(2).random(5000)}  # noise-protected or summed values do not deflate
    rec = arrays_record(d)
    assert PACKED_PREFIX + "<f8" in rec and PACKED_ZLIB_PREFIX + "<f8" not in rec
    np.testing.assert_array_equal(arrays_from_record(rec)["sums"], d["sums"])


def _deflated(index: list[list[object]], dt: str, payload: bytes) -> ArrayRecord:
    rec = {PACKED_INDEX: Array(np.frombuffer(json.dumps(index).encode(), dtype=np.uint8))}
    rec[PACKED_ZLIB_PREFIX + dt] = Array(np.frombuffer(payload, dtype=np.uint8))
    return ArrayRecord(rec)


ZEROS_4 = zlib.compress(np.zeros(4).tobytes())


@pytest.mark.parametrize(
    ("record", "why"),
    [
        # a bomb: the stream holds far more than its index lists; it is cut at the listed size, then refused
        (_deflated([["a", "<f8", [4]]], "<f8", zlib.compress(bytes(16 * 2**20))), "does not inflate to the 4 values"),
        (_deflated([["a", "<f8", [8]]], "<f8", ZEROS_4), "does not inflate to the 8 values"),  # less than listed
        (_deflated([["a", "<f8", [4]]], "<f8", ZEROS_4 + b"trailing"), "does not inflate"),
        (_deflated([["a", "<f8", [4]]], "<f8", ZEROS_4[:-6]), "does not inflate"),  # truncated stream
        (_deflated([["a", "<f8", [4]]], "<f8", b"not zlib at all"), "not zlib data"),
        # an index claiming more than the cap is refused before anything is inflated
        (_deflated([["a", "<f8", [MAX_INFLATED_BYTES // 8 + 1]]], "<f8", ZEROS_4), "would inflate to"),
        (_deflated([["a", "<f8", [2**30, 2**30]]], "<f8", ZEROS_4), "would inflate to"),
        (
            ArrayRecord(
                {
                    PACKED_INDEX: Array(np.frombuffer(json.dumps([["a", "<f8", [4]]]).encode(), dtype=np.uint8)),
                    PACKED_PREFIX + "<f8": Array(np.zeros(4)),
                    PACKED_ZLIB_PREFIX + "<f8": Array(np.frombuffer(ZEROS_4, dtype=np.uint8)),
                }
            ),
            "two <f8 arrays",
        ),
        (
            ArrayRecord(
                {
                    PACKED_INDEX: Array(np.frombuffer(json.dumps([["a", "<f8", [4]]]).encode(), dtype=np.uint8)),
                    PACKED_ZLIB_PREFIX + "<f8": Array(np.zeros(4)),  # not bytes
                }
            ),
            "expected flat bytes",
        ),
        (_deflated([["a", "<f8", [4]]], "|O", ZEROS_4), "unexpected array"),
    ],
)
def test_a_hostile_compressed_record_is_refused_with_the_reason(record: ArrayRecord, why: str) -> None:
    with pytest.raises(RecordError, match=why):
        arrays_from_record(record)


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
