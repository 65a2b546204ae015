"""The model codec and the record conversions shared by server and client."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ModelConfig
from common.models import build_model, is_norm_key
from common.records import (
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
