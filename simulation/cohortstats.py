"""What ``cohort.json`` records of a generated cohort: every simulated reading's AUC and the demographics.

Kept apart from the writing (``simulation.synth``): these are the cohort's
reference figures (the oracle, the radiologist, the handcrafted-feature
logistic regression) that a run's results are read against, computed from
the plans and the rendered volumes' handcrafted features.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from common.sitedata import ReaderScore
from simulation import readers
from simulation.cohortplan import CentrePlan, PatientPlan

HANDCRAFTED = ("log_roi_ml", "roi_mean_hu", "roi_sd_hu", "shell_mean_hu")  # simulation.synth.handcrafted_features


def auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return None
    return round(float(roc_auc_score(y, np.asarray(scores, dtype=np.float64))), 4)


def cv_lr_scores(x: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray | None:
    """Out-of-fold probabilities of a standardised logistic regression (stratified, up to 5 folds)."""
    n_splits = min(5, int(np.bincount(y, minlength=2).min()))
    if n_splits < 2:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return cross_val_predict(model, x, y, cv=cv, method="predict_proba")[:, 1]


def summarise(plans: Sequence[CentrePlan], feats: dict[str, dict[str, float]], seed: int) -> dict[str, Any]:
    """AUCs of every simulated reading per centre, the external pool and overall.

    Single-feature AUCs are raw (the feature used as the score): below 0.5
    means benign lesions score higher.
    """
    groups: dict[str, list[PatientPlan]] = {cp.spec.name: list(cp.patients) for cp in plans}
    external = [p for cp in plans if cp.spec.external for p in cp.patients]
    if external and len(plans) > 1:
        groups["external"] = external
    groups["all"] = [p for cp in plans for p in cp.patients]
    d_e, d_c = readers.EVIDENCE_SEPARATION, readers.CLINICAL_SEPARATION

    def per_group(score: Callable[[PatientPlan], float]) -> dict[str, float | None]:
        return {g: auc([p.label for p in ps], [score(p) for p in ps]) for g, ps in groups.items()}

    def design(ps: Sequence[PatientPlan]) -> tuple[np.ndarray, np.ndarray]:
        x = np.array([[feats[p.patient_id][f] for f in HANDCRAFTED] for p in ps], dtype=np.float64)
        return x, np.array([p.label for p in ps], dtype=np.int64)

    lr: dict[str, float | None] = {}
    for g, ps in groups.items():
        x, y = design(ps)
        oof = cv_lr_scores(x, y, seed)
        lr[g if g != "external" else "external_cv"] = None if oof is None else auc(y, oof)
    development = [p for cp in plans if not cp.spec.external for p in cp.patients]
    if external and development:
        x_dev, y_dev = design(development)
        x_ext, y_ext = design(external)
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_dev, y_dev)
        lr["external_from_development"] = auc(y_ext, model.predict_proba(x_ext)[:, 1])

    oracle = per_group(lambda p: p.evidence)
    gap: dict[str, float | None] = {}
    for g, value in lr.items():
        ref = oracle.get("external" if g.startswith("external") else g)
        gap[g] = None if ref is None or value is None else round(ref - value, 4)

    label_of = {p.patient_id: p.label for p in groups["all"]}
    rows_by_group: dict[str, list[ReaderScore]] = {cp.spec.name: list(cp.reader_rows) for cp in plans}
    if "external" in groups:
        rows_by_group["external"] = [r for cp in plans if cp.spec.external for r in cp.reader_rows]
    rows_by_group["all"] = [r for cp in plans for r in cp.reader_rows]
    reader_study: dict[str, dict[str, dict[str, float | None]]] = {}
    for g, rows in rows_by_group.items():
        reader_study[g] = {}
        for tier in ("junior", "mid", "senior"):
            sel = [r for r in rows if r.tier == tier]
            y_t = [label_of[r.patient_id] for r in sel]
            reader_study[g][tier] = {
                "without_ai": auc(y_t, [r.score_without_ai for r in sel]),
                "with_ai": auc(y_t, [r.score_with_ai for r in sel]),
            }
    return {
        "oracle_auc": oracle,
        "oracle_full_auc": per_group(lambda p: d_e * p.evidence + d_c * p.clinical),
        "radiologist_auc": per_group(lambda p: p.radiologist_score),
        "model_proxy_auc": per_group(lambda p: p.model_reading),
        "handcrafted_lr_auc": lr,
        "oracle_minus_handcrafted": gap,
        "size_only_auc": per_group(lambda p: feats[p.patient_id]["log_roi_ml"]),
        "mean_hu_only_auc": per_group(lambda p: feats[p.patient_id]["roi_mean_hu"]),
        "sd_hu_only_auc": per_group(lambda p: feats[p.patient_id]["roi_sd_hu"]),
        "shell_hu_only_auc": per_group(lambda p: feats[p.patient_id]["shell_mean_hu"]),
        "reader_study_auc": reader_study,
        "reader_study_expected_auc": {
            pr.reader: {
                "without_ai": round(readers.expected_auc(pr), 4),
                "with_ai": round(readers.expected_auc(pr, True), 4),
            }
            for pr in readers.READERS
        },
        "radiologist_expected_auc": round(readers.expected_auc(readers.RADIOLOGIST), 4),
    }


def demographics(cps: Sequence[CentrePlan]) -> dict[str, Any]:
    ps = [p for cp in cps for p in cp.patients]
    ages = np.array([p.age for p in ps], dtype=np.float64)
    return {
        "patients": len(ps),
        "benign": sum(p.label == 0 for p in ps),
        "malignant": sum(p.label == 1 for p in ps),
        "age_mean": round(float(ages.mean()), 2),
        "age_min": int(ages.min()),
        "age_max": int(ages.max()),
        "male": sum(p.sex == "M" for p in ps),
        "female": sum(p.sex == "F" for p in ps),
    }
