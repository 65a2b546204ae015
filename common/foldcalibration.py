"""Per-fold Platt scaling from pooled validation statistics, so fold models share one scale.

Each fold's model is trained and selected on its own, so one fold's 0.6 can
mean another's 0.4: every fold ranks its own test patients well, yet pooled
over folds (and averaged over folds for an external site) the ranking mixes
scales and the AUC drops below the fold mean (measured: 0.798 pooled against
0.865 fold mean on a held-out cohort).  A monotone map per fold,
``p' = sigmoid(a * logit(p) + b)``, fitted by maximum likelihood on that
fold's validation patients, puts every fold on the probability scale without
changing its own ranking.  It is fitted from a ``ClassHistogram`` (the
pooled validation statistics the federation already has: bin means per
class, no patient-level value) with Platt's smoothed targets and a small
ridge toward the identity, so a tiny validation set cannot produce an
extreme map.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from common.gridstats import ClassHistogram

IDENTITY = (1.0, 0.0)
_EPS = 1e-6


def logit(p: ArrayLike) -> NDArray[np.float64]:
    q = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    return np.log(q) - np.log1p(-q)


def apply_platt(p: ArrayLike, params: tuple[float, float]) -> NDArray[np.float64]:
    """``sigmoid(a * logit(p) + b)``; identity params leave ``p`` unchanged (up to the clip at 1e-6)."""
    a, b = params
    if (a, b) == IDENTITY:
        return np.asarray(p, dtype=np.float64)
    z = a * logit(p) + b
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def fit_platt_weighted(
    x: ArrayLike, y: ArrayLike, w: ArrayLike, *, ridge: float = 1.0, iterations: int = 50
) -> tuple[float, float]:
    """Weighted logistic regression of ``y`` (targets in [0, 1]) on ``x``: ``(a, b)``.

    Newton's method on the log-likelihood minus ``ridge / 2 * ((a - 1)^2 + b^2)``
    (a pull toward the identity map, worth about ``ridge`` patients).
    """
    xv, yv, wv = (np.asarray(v, dtype=np.float64) for v in (x, y, w))
    prior = np.array(IDENTITY)
    design = np.column_stack([xv, np.ones_like(xv)])

    def objective(t: NDArray[np.float64]) -> float:  # negative penalised log-likelihood
        z = design @ t
        return float(np.sum(wv * (np.logaddexp(0.0, z) - yv * z)) + 0.5 * ridge * np.sum((t - prior) ** 2))

    theta = prior.copy()
    value = objective(theta)
    for _ in range(iterations):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ theta)))  # the logistic function, without overflow
        grad = design.T @ (wv * (yv - p)) - ridge * (theta - prior)
        hess = (design * (wv * p * (1.0 - p))[:, None]).T @ design + ridge * np.eye(2)
        step = np.linalg.solve(hess, grad)
        for _ in range(30):  # damped: halve the Newton step until the objective improves
            trial = theta + step
            new = objective(trial)
            if new <= value:
                break
            step = step / 2.0
        else:
            break
        theta, done = trial, float(np.abs(step).max()) < 1e-10 or value - new < 1e-12
        value = new
        if done:
            break
    return float(theta[0]), float(theta[1])


def fit_platt(h: ClassHistogram, *, ridge: float = 1.0) -> tuple[float, float]:
    """Platt parameters of one fold from its pooled validation histogram.

    Each occupied bin contributes its class's mean score with its count as
    weight; targets are Platt's ``(n_pos + 1) / (n_pos + 2)`` and
    ``1 / (n_neg + 2)``.  Returns the identity when a class is missing or the
    fit is not increasing (a constant or inverted fold: the selection guard's
    business, not calibration's).
    """
    n_pos, n_neg = h.n_pos, h.n_neg
    if n_pos == 0 or n_neg == 0:
        return IDENTITY
    neg_bins, pos_bins = np.flatnonzero(h.neg), np.flatnonzero(h.pos)
    x = np.concatenate([h.neg_sum[neg_bins] / h.neg[neg_bins], h.pos_sum[pos_bins] / h.pos[pos_bins]])
    y = np.concatenate(
        [np.full(neg_bins.size, 1.0 / (n_neg + 2)), np.full(pos_bins.size, (n_pos + 1) / (n_pos + 2))]
    )
    w = np.concatenate([h.neg[neg_bins], h.pos[pos_bins]]).astype(np.float64)
    a, b = fit_platt_weighted(logit(x), y, w, ridge=ridge)
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0.0:
        return IDENTITY
    return a, b


def check_platt(params: object) -> tuple[float, float]:
    """Calibration parameters received from another party: ``None`` is the identity.

    Anything but two finite numbers with ``a > 0`` is refused: a negative
    slope would silently invert the fold's ranking.
    """
    if params is None:
        return IDENTITY
    if not isinstance(params, list | tuple) or len(params) != 2:
        raise ValueError(f"calibration must be two numbers (a, b), got {params!r}")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in params):
        raise ValueError(f"calibration must be two finite numbers, got {params!r}")
    a, b = float(params[0]), float(params[1])
    if a <= 0:
        raise ValueError(f"calibration slope must be > 0 (a map that keeps the ranking), got {a}")
    return a, b
