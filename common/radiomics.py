"""The radiomics baseline: handcrafted features with logistic regression.

The floor the deep models must beat (a prior sacral-tumour radiomics model
reached AUC ~0.90; four such features reached 0.888 on our held-out
cohort).  Features come from ``SiteArrays.features`` (computed once with the
preprocessing, from the RAS volume and the largest-component mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from .sitearrays import SiteArrays


def fit(arrays: SiteArrays, indices: Sequence[int], *, c: float = 1.0, seed: int = 0) -> Pipeline:
    """Standardise, then L2-regularised logistic regression (class-balanced)."""
    idx = np.asarray(indices, dtype=int)
    model = make_pipeline(
        StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed)
    )
    model.fit(arrays.features[idx], arrays.labels[idx])
    return model


def predict(model: Pipeline, arrays: SiteArrays, indices: Sequence[int]) -> np.ndarray:
    """Probability of malignancy per patient."""
    idx = np.asarray(indices, dtype=int)
    if idx.size == 0:
        return np.zeros(0)
    return np.asarray(model.predict_proba(arrays.features[idx])[:, 1], dtype=np.float64)


@dataclass(frozen=True)
class FederatedLogit:
    """Logistic regression on features standardised with *global* moments.

    Federated in one shot: the server pools the sites' feature counts, sums
    and sums of squares into a global mean and SD, each site fits on its own
    standardised training patients, and the server averages the parameters
    weighted by patient count.  The model is tiny and convex, so one
    averaging step loses little against pooled fitting (compared in the
    baselines).
    """

    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float

    @staticmethod
    def moments_to_mean_std(n: float, total: np.ndarray, sumsq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = total / max(n, 1.0)
        var = np.maximum(sumsq / max(n, 1.0) - mean**2, 0.0)
        return mean, np.where(var > 1e-12, np.sqrt(var), 1.0)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, mean: np.ndarray, std: np.ndarray, *, c: float = 1.0, seed: int = 0) -> FederatedLogit:
        z = (x - mean) / std
        if np.unique(y).size < 2:  # a site with one class cannot fit; it contributes a null model
            return cls(mean, std, np.zeros(x.shape[1]), 0.0)
        lr = LogisticRegression(C=c, class_weight="balanced", max_iter=2000, random_state=seed).fit(z, y)
        return cls(mean, std, lr.coef_[0].astype(np.float64), float(lr.intercept_[0]))

    def predict(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros(0)
        logit = ((x - self.mean) / self.std) @ self.coef + self.intercept
        return np.asarray(1.0 / (1.0 + np.exp(-logit)), dtype=np.float64)

    def pack(self) -> np.ndarray:
        """Parameters only (no patient data): [coef..., intercept]."""
        return np.concatenate([self.coef, [self.intercept]]).astype(np.float64)

    @classmethod
    def from_params(cls, params: np.ndarray, mean: np.ndarray, std: np.ndarray) -> FederatedLogit:
        return cls(mean, std, params[:-1], float(params[-1]))

    def pack_full(self) -> np.ndarray:
        """Mean, SD and parameters in one vector, as sent to the sites for prediction."""
        return np.concatenate([self.mean, self.std, self.coef, [self.intercept]]).astype(np.float64)

    @classmethod
    def unpack(cls, flat: np.ndarray) -> FederatedLogit:
        f = (flat.size - 1) // 3
        if flat.size != 3 * f + 1:
            raise ValueError(f"radiomics parameter vector of size {flat.size} is not 3F+1")
        flat = np.asarray(flat, np.float64)
        return cls(flat[:f], flat[f : 2 * f], flat[2 * f : 3 * f], float(flat[-1]))
