"""Aggregation maths against numpy, and the update guard."""

from __future__ import annotations

import numpy as np
import pytest

from server.aggregation import (
    BLOCK,
    coordinate_median,
    distance,
    robust_aggregate,
    screen_updates,
    trimmed_mean,
    weighted_mean,
)


def test_weighted_mean_matches_numpy_average() -> None:
    rng = np.random.default_rng(0)
    vs = [rng.normal(size=50).astype(np.float32) for _ in range(4)]
    w = [10, 30, 5, 55]
    np.testing.assert_allclose(weighted_mean(vs, w), np.average(np.stack(vs), axis=0, weights=w), rtol=1e-6)


def test_weighted_mean_of_float16_accumulates_in_float64() -> None:
    vs = [np.full(3, 1.0009765625, np.float16), np.full(3, 1.0, np.float16)]
    out = weighted_mean(vs, [1, 1])
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, 1.00048828125)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_weighted_mean_in_blocks_gives_the_bits_of_one_whole_vector_float64_pass(dtype: type) -> None:
    rng = np.random.default_rng(3)
    n = 3 * BLOCK + 17  # several blocks and a short last one
    vs = [rng.normal(scale=0.05, size=n).astype(dtype) for _ in range(3)]
    w = np.array([99.0, 13.0, 13.0])
    whole = np.zeros(n, np.float64)
    for v, wi in zip(vs, w / w.sum(), strict=True):
        whole += wi * v.astype(np.float64)
    assert np.array_equal(weighted_mean(vs, w), whole.astype(np.float32))
    grid = [v.reshape(1, n) for v in vs]  # any shape, averaged element by element
    assert weighted_mean(grid, w).shape == (1, n)


def test_weighted_mean_refuses_vectors_of_other_shapes_instead_of_truncating() -> None:
    a = np.zeros(BLOCK + 1, np.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_mean([a, np.zeros(BLOCK + 2, np.float32)], [1, 1])
    with pytest.raises(ValueError, match="2 vectors but 3 weights"):
        weighted_mean([a, a], [1, 1, 1])


def test_distance_in_blocks_matches_numpy() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(size=2 * BLOCK + 5).astype(np.float32)
    v = (ref + rng.normal(scale=1e-3, size=ref.size)).astype(np.float16)
    expected = np.linalg.norm(v.astype(np.float64) - ref.astype(np.float64))
    assert distance(v, ref) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        distance(v[:-1], ref)


def test_median_and_trimmed_mean_match_numpy() -> None:
    rng = np.random.default_rng(1)
    vs = [rng.normal(size=20) for _ in range(5)]
    np.testing.assert_allclose(coordinate_median(vs), np.median(np.stack(vs), axis=0), rtol=1e-6)
    s = np.sort(np.stack(vs), axis=0)
    np.testing.assert_allclose(trimmed_mean(vs, 0.2), s[1:4].mean(axis=0), rtol=1e-6)


def test_robust_aggregate_follows_the_rule_and_only_the_mean_uses_the_weights() -> None:
    rng = np.random.default_rng(2)
    vs = [rng.normal(size=30) for _ in range(5)]
    w = [1, 1, 1, 1, 1000]  # one site claiming many patients
    stack = np.stack(vs)
    np.testing.assert_allclose(robust_aggregate(vs, w, "mean", 0.2), np.average(stack, axis=0, weights=w), rtol=1e-6)
    np.testing.assert_allclose(robust_aggregate(vs, w, "median", 0.2), np.median(stack, axis=0), rtol=1e-6)
    trimmed = np.sort(stack, axis=0)[1:4].mean(axis=0)
    np.testing.assert_allclose(robust_aggregate(vs, w, "trimmed", 0.2), trimmed, rtol=1e-6)


def test_screen_drops_nan_wrong_shape_and_outsized_updates_with_reasons() -> None:
    ref = np.zeros(10, np.float32)
    good = [np.full(10, 0.1, np.float32), np.full(10, 0.12, np.float32), np.full(10, 0.09, np.float32)]
    nan = np.full(10, 0.1, np.float32)
    nan[3] = np.nan
    big = np.full(10, 100.0, np.float32)
    short = np.zeros(9, np.float32)
    screen = screen_updates([*good, nan, big, short], ref, norm_bound_factor=10.0, names=["a", "b", "c", "nan", "big", "short"])
    assert screen.kept == (0, 1, 2)
    assert "non-finite" in screen.dropped[3] and screen.dropped[3].startswith("nan:")
    assert "norm" in screen.dropped[4] and screen.dropped[4].startswith("big:")
    assert "shape" in screen.dropped[5]


def test_screen_keeps_everything_normal() -> None:
    ref = np.ones(5, np.float32)
    vs = [ref + d for d in (0.1, 0.2, 0.15, 0.12)]
    assert screen_updates(vs, ref, norm_bound_factor=10.0).kept == (0, 1, 2, 3)
