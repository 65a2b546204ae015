"""common.tensortree: an optimiser state round-trips exactly; a damaged or foreign file is refused, never run."""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import pytest
import torch

from common.tensortree import ALIGN, MAGIC, TensorTreeError, read_tree, write_tree


def _roundtrip(tree: Any) -> Any:
    buf = io.BytesIO()
    write_tree(buf, tree)
    data = buf.getvalue()
    return read_tree(io.BytesIO(data), len(data))


def _adam_state(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 3), torch.nn.BatchNorm1d(3), torch.nn.Flatten(), torch.nn.Linear(3 * 6, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 2, 8)).square().sum().backward()
        opt.step()
    return model, opt


def test_an_adam_state_round_trips_and_resumes_the_same_step() -> None:
    model, opt = _adam_state()
    saved = opt.state_dict()
    back = _roundtrip({"round": 3, "state": saved})
    assert back["round"] == 3
    assert set(back["state"]["state"]) == set(saved["state"])  # int keys stay ints
    assert back["state"]["param_groups"][0]["betas"] == (0.8, 0.99)  # a tuple stays a tuple
    for k, entry in saved["state"].items():
        for name, t in entry.items():
            got = back["state"]["state"][k][name]
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)
    # the next step from the reloaded state is the next step from the original
    twin = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 2, 8)
    opt.zero_grad()
    model(x).square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    params = [torch.nn.Parameter(t) for t in twin]
    opt2 = torch.optim.Adam(params, lr=1e-3, betas=(0.8, 0.99))
    opt2.load_state_dict(back["state"])
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    opt2.step()
    for a, b in zip(model.parameters(), params, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_every_kept_kind_of_value_round_trips() -> None:
    tree = {
        "ints": [0, -3, 2**40],
        "floats": (0.5, float("inf")),
        "flags": [True, False, None],
        "text": "é",
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7.0, dtype=torch.float64),
        "half": torch.arange(5, dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous: stored as its values
        7: {"nested": [torch.ones(2, dtype=torch.int64)]},
    }
    back = _roundtrip(tree)
    assert back.keys() == tree.keys()
    assert back["ints"] == tree["ints"] and back["floats"] == tree["floats"] and back["flags"] == tree["flags"]
    assert back["text"] == "é"
    for key in ("empty", "scalar", "half", "mask", "strided"):
        assert back[key].dtype == tree[key].dtype and torch.equal(back[key], tree[key])
    assert torch.equal(back[7]["nested"][0], tree[7]["nested"][0])


@pytest.mark.parametrize("value", [object(), {(1, 2): 3}, {True: 1}, torch.zeros(2, dtype=torch.complex64)])
def test_what_it_cannot_keep_is_refused_when_written(value: object) -> None:
    with pytest.raises(TypeError):
        write_tree(io.BytesIO(), {"x": value})


def _file(header: dict[str, Any], data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return MAGIC + struct.pack("<Q", len(raw)) + raw + data


def _refused(blob: bytes, match: str) -> None:
    with pytest.raises(TensorTreeError, match=match):
        read_tree(io.BytesIO(blob), len(blob))


def test_damaged_and_foreign_files_are_refused() -> None:
    good = io.BytesIO()
    write_tree(good, {"a": torch.arange(100.0)})
    blob = good.getvalue()
    _refused(b"", "not a tensor-tree")
    _refused(b"PK\x03\x04" + blob[4:], "not a tensor-tree")  # a torch.save zip, say
    _refused(blob[:-8], "data bytes where the header says")  # cut short
    _refused(blob + b"\0" * ALIGN, "data bytes where the header says")  # trailing bytes
    _refused(MAGIC + struct.pack("<Q", 2**62) + b"{}", "header of")  # a header length beyond the file
    _refused(MAGIC + struct.pack("<Q", 5) + b"{nope", "not JSON")


def _entry(**over: Any) -> dict[str, Any]:
    return {"dtype": "float32", "shape": [4], "offset": 0, "nbytes": 16} | over


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        (_entry(offset=64), "outside the data"),  # bytes past the end
        (_entry(offset=8), "outside the data"),  # not aligned
        (_entry(offset=-64), "outside the data"),
        (_entry(nbytes=12), "do not hold"),  # the size does not match the shape
        (_entry(shape=[-4]), "negative size"),
        (_entry(dtype="object"), "malformed tensor entry"),  # only plain numeric dtypes
        (_entry(dtype="complex64"), "malformed tensor entry"),
        ({"shape": [4]}, "malformed tensor entry"),
    ],
)
def test_a_tensor_table_that_does_not_add_up_is_refused(entry: dict[str, Any], match: str) -> None:
    _refused(_file({"tree": {"T": 0}, "tensors": [entry], "data_bytes": 64}, b"\0" * 64), match)


@pytest.mark.parametrize(
    ("tree", "match"),
    [
        ({"T": 1}, "outside the table"),
        ({"T": True}, "outside the table"),
        ({"x": 1}, "malformed node"),
        ({"v": [1, 2]}, "malformed node"),  # a value must be a plain scalar
        ({"d": [[[1], {"v": 1}]]}, "malformed dict item"),  # a key must be int or str
        ({"d": [{"v": 1}], "l": []}, "malformed node"),
        ("__import__('os')", "malformed node"),  # text is never evaluated
    ],
)
def test_a_structure_that_does_not_follow_the_format_is_refused(tree: Any, match: str) -> None:
    _refused(_file({"tree": tree, "tensors": [_entry()], "data_bytes": 64}, b"\0" * 64), match)


def test_a_header_without_its_table_or_size_is_refused() -> None:
    _refused(_file({"tree": {"v": 1}, "data_bytes": 0}, b""), "no tensor table")
    _refused(_file({"tree": {"v": 1}, "tensors": []}, b""), "no data size")
