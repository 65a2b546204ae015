"""The radiomics baseline: handcrafted features with logistic regression.

The floor the deep models must beat (a prior sacral-tumour radiomics model
reached AUC ~0.90; four such features reached 0.888 on our held-out
cohort).  Features come from ``SiteArrays.features`` (computed once with the
preprocessing, from the RAS volume and the largest-component mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from .dataset import SiteArrays


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
