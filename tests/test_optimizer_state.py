"""A site's Adam state carried across rounds: in the engine, on the site's disk, and what a bad file does."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.optimstore import OptimizerStore
from client.site import SiteContext, SiteRunner
from common.config import SiteConfig, with_sites
from common.configfile import load_config
from common.engine import Schedule, TrainResult, train
from common.models import build_model
from common.optimstate import OptimizerStateError, load_optimizer_state
from common.tensortree import read_tree, write_tree

from .test_engine import tiny_arrays, tiny_cfg


def _cfg(keep: bool = True):  # type: ignore[no-untyped-def]
    cfg = tiny_cfg()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, keep_optimizer_state=keep))


def _epoch(model: torch.nn.Module, cfg, state=None, epoch: int = 0) -> TrainResult:  # type: ignore[no-untyped-def]
    return train(
        model, tiny_arrays(16), range(16), "densenet3d", cfg, epochs=1, schedule=Schedule(epoch, 2), seed=epoch,
        optimizer_state=state,
    )  # fmt: skip


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_a_kept_state_resumes_adam_where_the_last_round_left_it() -> None:
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model("densenet3d", cfg.models.densenet3d)
    first = _epoch(model, cfg)
    assert first.optimizer_state is not None and first.steps > 0
    steps = [float(s["step"]) for s in first.optimizer_state["state"].values()]
    assert steps and all(s == first.steps for s in steps)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    resumed = _epoch(model, cfg, first.optimizer_state, epoch=1)
    w_resumed = _params(model)
    assert resumed.optimizer_state is not None
    assert all(float(s["step"]) == first.steps + resumed.steps for s in resumed.optimizer_state["state"].values())

    model.load_state_dict(start)
    _epoch(model, cfg, None, epoch=1)  # the same epoch from a fresh Adam
    assert not torch.equal(w_resumed, _params(model))


def test_the_returned_state_is_a_copy_not_the_live_optimiser() -> None:
    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model("densenet3d", cfg.models.densenet3d)
    first = _epoch(model, cfg)
    assert first.optimizer_state is not None
    before = {i: s["exp_avg"].clone() for i, s in first.optimizer_state["state"].items()}
    _epoch(model, cfg, first.optimizer_state, epoch=1)
    assert all(torch.equal(before[i], s["exp_avg"]) for i, s in first.optimizer_state["state"].items())


def test_keep_off_trains_from_a_fresh_adam_and_returns_no_state() -> None:
    cfg = _cfg(keep=False)
    torch.manual_seed(0)
    model = build_model("densenet3d", cfg.models.densenet3d)
    first = _epoch(model, cfg)
    assert first.optimizer_state is None
    start = {k: v.clone() for k, v in model.state_dict().items()}
    kept = _epoch(model, _cfg(), None, epoch=1).optimizer_state
    model.load_state_dict(start)
    _epoch(model, cfg, kept, epoch=1)  # ignored: keep is off
    w_ignored = _params(model)
    model.load_state_dict(start)
    _epoch(model, cfg, None, epoch=1)
    assert torch.equal(w_ignored, _params(model))


def test_a_state_of_another_model_is_refused() -> None:
    cfg = _cfg()
    torch.manual_seed(0)
    m3 = build_model("densenet3d", cfg.models.densenet3d)
    state = _epoch(m3, cfg).optimizer_state
    assert state is not None
    m2 = build_model("densenet2d", cfg.models.densenet2d)
    with pytest.raises(OptimizerStateError, match="does not fit"):
        load_optimizer_state(torch.optim.Adam(m2.parameters()), state)
    # same number of tensors, other shapes: torch accepts it, the check does not
    shuffled = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
    a, b = next((i, j) for i in shuffled["state"] for j in shuffled["state"] if state["state"][i]["exp_avg"].shape != state["state"][j]["exp_avg"].shape)
    shuffled["state"][a], shuffled["state"][b] = state["state"][b], state["state"][a]
    with pytest.raises(OptimizerStateError, match="of shape"):
        load_optimizer_state(torch.optim.Adam(m3.parameters()), shuffled)


def test_the_store_resumes_only_from_an_earlier_round(tmp_path: Path) -> None:
    store = OptimizerStore(tmp_path / "state" / "densenet3d_fold0_optimizer.tensors")
    assert store.load(1) is None
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}}, "param_groups": [{"params": [0]}]}
    store.save(2, state)
    assert store.load(2) is None  # a repeated round 2 does not resume from its own end
    loaded = store.load(3)
    assert loaded is not None and torch.equal(loaded["state"][0]["exp_avg"], torch.ones(2))
    assert [p.name for p in store.path.parent.iterdir()] == [store.path.name]  # no temporary left behind


class _Foreign:
    pass


def _saved(path: Path) -> Any:
    """What the store wrote, read as it reads it."""
    with path.open("rb") as fh:
        return read_tree(fh, path.stat().st_size)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a tensor-tree file", "pickle", "list", "torch.save"],
)
def test_a_torn_or_foreign_store_file_means_a_fresh_optimiser(
    tmp_path: Path, content: object, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "densenet3d_fold0_optimizer.tensors"
    if content == "pickle":  # a pickled object (nothing in the file is ever unpickled)
        torch.save({"round": 1, "state": _Foreign()}, path)
    elif content == "list":  # the right format, the wrong contents
        with path.open("wb") as fh:
            write_tree(fh, {"round": 1, "state": [1, 2]})
    elif content == "torch.save":  # the format before common.tensortree: a fresh optimiser, not a failed round
        torch.save({"round": 1, "state": {"state": {}, "param_groups": []}}, path)
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert OptimizerStore(path).load(2) is None
    assert "unreadable optimiser state" in caplog.text and str(path) in caplog.text


def _site_and_initial_3d(cohort: dict[str, Path], tmp_path: Path) -> tuple[SiteRunner, np.ndarray]:
    """Site centre1 of a tiny 3D-only run, and a fresh 3D model packed as the server sends it."""
    cfg = with_sites(
        load_config("tiny", {"models": {"densenet2d": {"enabled": False}, "radiomics": False}}),
        (SiteConfig(name="centre1"),),
    )
    site = SiteRunner(SiteContext("centre1", cohort["centre1"], tmp_path / "centre1"), cfg, "r1")
    model = build_model("densenet3d", cfg.models.densenet3d, mask_channel=cfg.preprocess.mask_channel)
    return site, site.models.codec("densenet3d").pack(model.state_dict())


def test_a_site_round_survives_a_bad_state_file_and_replaces_it(
    cohort: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site, flat = _site_and_initial_3d(cohort, tmp_path)
    cfg = site.cfg
    path = site.run_dir / "state" / "densenet3d_fold0_optimizer.tensors"

    site.train_round("densenet3d", 0, flat, 1, 4)
    saved = _saved(path)
    assert saved["round"] == 1 and saved["state"]["state"]

    # a state of another network (2D), written as if by round 1: refused at load, the round runs afresh
    m2 = build_model("densenet2d", cfg.models.densenet2d, mask_channel=cfg.preprocess.mask_channel)
    foreign = torch.optim.Adam(m2.parameters())
    m2(torch.zeros(2, *_input_2d(cfg))).sum().backward()
    foreign.step()
    with path.open("wb") as fh:
        write_tree(fh, {"round": 1, "state": foreign.state_dict()})
    with caplog.at_level(logging.WARNING):
        reply = site.train_round("densenet3d", 0, flat, 2, 4)
    assert "does not fit" in caplog.text and "fresh optimiser" in caplog.text
    assert np.all(np.isfinite(reply.weights)) and reply.num_examples > 0
    assert _saved(path)["round"] == 2  # replaced by this round's own state

    path.write_bytes(b"\x00" * 7)  # torn
    reply = site.train_round("densenet3d", 0, flat, 3, 4)
    assert np.all(np.isfinite(reply.weights)) and _saved(path)["round"] == 3


def test_a_fold_leaves_no_optimiser_state_once_its_model_is_chosen(cohort: dict[str, Path], tmp_path: Path) -> None:
    site, flat = _site_and_initial_3d(cohort, tmp_path)
    path = site.run_dir / "state" / "densenet3d_fold0_optimizer.tensors"
    other = site.run_dir / "state" / "densenet3d_fold1_optimizer.tensors"
    site.train_round("densenet3d", 1, flat, 1, 2)  # another fold, still training

    site.train_round("densenet3d", 0, flat, 1, 2)
    site.train_round("densenet3d", 0, flat, 2, 2)  # the last round: nothing reads a state after it
    assert _saved(path)["round"] == 1
    assert OptimizerStore(path).load(2) is not None  # a repeated last round still resumes from round 1
    site.predict_fold("densenet3d", 0, flat, 2, "train")  # the server chose fold 0's model
    assert not path.exists() and other.exists()


def _input_2d(cfg) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    from common.models import in_channels

    size = cfg.preprocess.d2.size
    return (in_channels("densenet2d", cfg.preprocess.mask_channel), size, size)
