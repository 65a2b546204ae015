"""Aggregation maths on packed model vectors (pure numpy, tested against numpy).

The strategies call these; keeping them free of Flower makes the guard rules
and the averages easy to test and to read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Screening:
    """Which site updates are kept, and why the others were dropped."""

    kept: tuple[int, ...]
    dropped: dict[int, str]


# Elements per block in the float64 passes below: 512 KiB per temporary, so the passes stay in the
# cache instead of writing whole-model float64 copies (a DenseNet121 is 11 M values; three updates
# took 0.16 s unblocked and 0.05 s blocked, while every site waits for the next round).
BLOCK = 1 << 16


def weighted_mean(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Weighted average accumulated in float64 (float16 transport loses nothing more here).

    Each element is ``sum_i (w_i / W) * float64(v_i)`` summed in site order, then cast to float32,
    computed block by block: the same operations per element as one whole-vector pass, so the same
    bits.
    """
    if not vectors:
        raise ValueError("no vectors to average")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {w.tolist()}")
    if len(w) != len(vectors):
        raise ValueError(f"{len(vectors)} vectors but {len(w)} weights")
    shape = np.shape(vectors[0])
    if any(np.shape(v) != shape for v in vectors):
        raise ValueError(f"vectors differ in shape: {sorted({np.shape(v) for v in vectors})}")
    flat = [np.asarray(v).ravel() for v in vectors]
    w = w / w.sum()
    out = np.empty(flat[0].size, np.float32)
    acc, term = np.empty(BLOCK, np.float64), np.empty(BLOCK, np.float64)
    for start in range(0, out.size, BLOCK):
        stop = min(start + BLOCK, out.size)
        a, t = acc[: stop - start], term[: stop - start]
        a.fill(0.0)
        for v, wi in zip(flat, w, strict=True):
            np.multiply(v[start:stop], wi, out=t, dtype=np.float64)
            a += t
        out[start:stop] = a
    return out.reshape(shape)


def distance(v: np.ndarray, reference: np.ndarray) -> float:
    """Euclidean distance in float64, block by block (no whole-model float64 copies)."""
    a, b = np.asarray(v).ravel(), np.asarray(reference).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shape {np.shape(v)} != {np.shape(reference)}")
    total = 0.0
    for start in range(0, a.size, BLOCK):
        d = a[start : start + BLOCK].astype(np.float64) - b[start : start + BLOCK].astype(np.float64)
        total += float(np.dot(d, d))
    return total**0.5


def coordinate_median(vectors: Sequence[np.ndarray]) -> np.ndarray:
    """Coordinate-wise median (robust to a minority of bad sites)."""
    return np.median(np.stack([np.asarray(v, np.float64) for v in vectors]), axis=0).astype(np.float32)


def trimmed_mean(vectors: Sequence[np.ndarray], fraction: float) -> np.ndarray:
    """Coordinate-wise mean after dropping ``fraction`` of values at each end."""
    stack = np.sort(np.stack([np.asarray(v, np.float64) for v in vectors]), axis=0)
    k = int(np.floor(fraction * len(vectors)))
    if 2 * k >= len(vectors):
        k = (len(vectors) - 1) // 2
    return stack[k : len(vectors) - k].mean(axis=0).astype(np.float32)


def robust_aggregate(
    vectors: Sequence[np.ndarray], weights: Sequence[float], rule: str, trim_fraction: float
) -> np.ndarray:
    """The kept updates' aggregate under ``federation.robust``.

    ``mean``: FedAvg's patient-weighted mean; ``median``: coordinate-wise
    median; ``trimmed``: coordinate-wise mean after trimming ``trim_fraction``
    at each end.  The robust rules ignore the weights: a site cannot buy
    influence by claiming more patients.
    """
    if rule == "median":
        return coordinate_median(vectors)
    if rule == "trimmed":
        return trimmed_mean(vectors, trim_fraction)
    return weighted_mean(vectors, weights)


def screen_updates(
    vectors: Sequence[np.ndarray],
    reference: np.ndarray,
    *,
    norm_bound_factor: float,
    max_norm: float = 0.0,
    names: Sequence[str] | None = None,
) -> Screening:
    """Drop updates with the wrong shape or dtype, non-finite values or an outsized norm.

    The norm rule compares each update's distance to the round's global
    model with the median distance of the round: an update more than
    ``norm_bound_factor`` times the median is dropped.  With fewer than three
    updates the median is not a meaningful reference, so only the absolute
    checks apply; among them ``max_norm`` (when > 0) bounds every update's
    distance to the global model, so that with two sites one cannot replace
    the model with an arbitrary vector.
    """
    names = list(names) if names is not None else [str(i) for i in range(len(vectors))]
    dropped: dict[int, str] = {}
    norms: dict[int, float] = {}
    for i, v in enumerate(vectors):
        v = np.asarray(v)
        if v.shape != reference.shape:
            dropped[i] = f"shape {v.shape} != expected {reference.shape}"
        elif not np.issubdtype(v.dtype, np.floating):
            dropped[i] = f"dtype {v.dtype} is not floating point"
        elif not np.all(np.isfinite(v)):
            dropped[i] = f"{int(np.size(v) - np.isfinite(v).sum())} non-finite values"
        else:
            norm = distance(v, reference)
            if max_norm > 0 and not norm <= max_norm:
                dropped[i] = f"update norm {norm:.3g} > the absolute bound {max_norm:g}"
            else:
                norms[i] = norm
    if len(norms) >= 3 and norm_bound_factor > 0:
        med = float(np.median(list(norms.values())))
        bound = norm_bound_factor * max(med, 1e-12)
        for i, n in norms.items():
            if n > bound:
                dropped[i] = f"update norm {n:.3g} > {norm_bound_factor:g} x round median {med:.3g}"
    kept = tuple(i for i in range(len(vectors)) if i not in dropped)
    return Screening(kept=kept, dropped={i: f"{names[i]}: {r}" for i, r in dropped.items()})
