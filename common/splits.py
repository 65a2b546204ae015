"""Patient-level, stratified, seeded splits: the study's fivefold cross-validation.

Fold ``k``'s test set is the ``k``-th stratified fold; the other folds are
split, stratified again, into train and validation (8:2 by default).  Splits
depend only on the set of (patient id, label) pairs and the seed: ids are
sorted first, so the order a hospital lists its patients in does not matter.
The assignment is saved with each run (``save_splits``) for audit and its
``split_digest`` goes into checkpoints, so a model is never evaluated on a
split it was not trained for.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold

from .atomicfile import write_atomic

SPLITS_FORMAT = 1


class SplitError(ValueError):
    """Patients cannot be split as asked (too few per class, duplicate ids, bad file)."""


@dataclass(frozen=True)
class Fold:
    """One fold's patient ids (each tuple sorted)."""

    k: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def _sorted_pairs(
    patient_ids: Sequence[str], labels: Sequence[int] | np.ndarray
) -> tuple[list[str], np.ndarray]:
    ids = [str(p) for p in patient_ids]
    y = np.asarray(labels).astype(np.int64).ravel()
    if len(ids) != len(y):
        raise SplitError(f"{len(ids)} patient ids but {len(y)} labels")
    dup = sorted(p for p, n in Counter(ids).items() if n > 1)
    if dup:
        raise SplitError(f"duplicate patient ids {dup[:5]}: a patient must be in exactly one fold")
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    return [ids[i] for i in order], y[order]


def _stratified_pick(y: np.ndarray, n_pick: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n_pick`` rows with class shares as close as possible to ``y``'s.

    Quotas by largest remainder (ties: smaller class label first), so the total
    is exact; rows within a class are drawn by ``rng``.
    """
    classes, counts = np.unique(y, return_counts=True)
    exact = counts * n_pick / len(y)
    quota = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - quota), kind="stable")[: n_pick - int(quota.sum())]:
        quota[c] += 1
    picked = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota, strict=True)]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def fivefold(
    patient_ids: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    *,
    folds: int = 5,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[Fold, ...]:
    """Stratified ``folds``-fold patient split; each fold's remainder split into train/val.

    The validation set of fold k holds ``round(val_fraction * n_rest)``
    patients (at least 1, leaving at least 1 for training), stratified by
    label.  Raises ``SplitError`` when a class has fewer patients than folds.
    """
    if folds < 2:
        raise SplitError(f"folds must be at least 2, got {folds}")
    if not 0.0 < val_fraction < 1.0:
        raise SplitError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids, y = _sorted_pairs(patient_ids, labels)
    counts = Counter(y.tolist())
    small = {c: n for c, n in sorted(counts.items()) if n < folds}
    if small:
        raise SplitError(
            f"cannot make {folds} stratified folds from {len(ids)} patients: class(es) "
            + ", ".join(f"{c} has {n} patient(s)" for c, n in small.items())
            + f"; every class needs at least {folds}"
        )
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = []
    for k, (rest, test) in enumerate(skf.split(np.zeros(len(ids)), y)):
        n_val = min(max(1, round(val_fraction * len(rest))), len(rest) - 1)
        rng = np.random.default_rng([seed, k])
        val_pos = _stratified_pick(y[rest], n_val, rng)
        val = rest[val_pos]
        train = np.setdiff1d(rest, val)
        out.append(
            Fold(
                k=k,
                train=tuple(sorted(ids[i] for i in train)),
                val=tuple(sorted(ids[i] for i in val)),
                test=tuple(sorted(ids[i] for i in test)),
            )
        )
    return tuple(out)


def external_split(patient_ids: Sequence[str]) -> Fold:
    """An external site: every patient is test data (the fold models' probabilities are averaged)."""
    ids, _ = _sorted_pairs(patient_ids, np.zeros(len(patient_ids)))
    return Fold(k=0, train=(), val=(), test=tuple(ids))


def _as_plain(folds: Sequence[Fold]) -> list[dict[str, Any]]:
    return [{"k": f.k, "train": list(f.train), "val": list(f.val), "test": list(f.test)} for f in folds]


def split_digest(folds: Sequence[Fold]) -> str:
    """Short stable hash of the assignment, stored with checkpoints."""
    blob = json.dumps(_as_plain(folds), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_splits(path: Path, site: str, folds: Sequence[Fold]) -> None:
    """Write a site's split assignment as JSON (atomically); it stays at the site."""
    doc = {"format": SPLITS_FORMAT, "site": site, "digest": split_digest(folds), "folds": _as_plain(folds)}
    write_atomic(Path(path), json.dumps(doc, indent=1), mode_bits=0o600)


def load_splits(path: Path) -> tuple[str, tuple[Fold, ...]]:
    """Read ``save_splits``'s file: (site, folds); raises ``SplitError`` if it was altered or is broken."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        folds = tuple(
            Fold(k=int(f["k"]), train=tuple(f["train"]), val=tuple(f["val"]), test=tuple(f["test"]))
            for f in doc["folds"]
        )
        site, digest = str(doc["site"]), str(doc["digest"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SplitError(f"{path}: cannot read split file ({type(exc).__name__}: {exc})") from exc
    if split_digest(folds) != digest:
        raise SplitError(
            f"{path}: split digest mismatch (file edited or corrupt): {digest} != {split_digest(folds)}"
        )
    return site, folds
