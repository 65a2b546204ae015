"""Test-time flip averaging in the engine's predict."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.throughput import random_arrays
from common.configfile import load_config
from common.engine import predict, seed_everything
from common.models import build_model


@pytest.mark.parametrize("kind", ["densenet3d", "densenet2d"])
@pytest.mark.parametrize("mask_channel", [False, True])
def test_flip_averaging_is_the_mean_over_the_input_and_its_mirror(kind: str, mask_channel: bool) -> None:
    cfg = load_config("tiny", {"preprocess": {"mask_channel": mask_channel}})
    tta = dataclasses.replace(cfg, evaluation=dataclasses.replace(cfg.evaluation, tta_flip=True))
    arrays = random_arrays(5, 32, 32, 3, seed=3, mask_channel=mask_channel)
    mirrored = dataclasses.replace(
        arrays,
        vol3d=np.ascontiguousarray(arrays.vol3d[:, :, ::-1]),
        slices2d=np.ascontiguousarray(arrays.slices2d[..., ::-1, :]),
    )
    seed_everything(0)
    model = build_model(kind, getattr(cfg.models, kind), mask_channel=mask_channel).eval()  # type: ignore[arg-type]
    rows = range(len(arrays))
    plain, flipped = predict(model, arrays, rows, kind, cfg), predict(model, mirrored, rows, kind, cfg)  # type: ignore[arg-type]
    assert not np.allclose(plain, flipped, atol=1e-6)  # the model is not flip-invariant: the test can fail
    both = predict(model, arrays, rows, kind, tta)  # type: ignore[arg-type]
    assert both == pytest.approx((plain + flipped) / 2, abs=1e-6)
