"""Patient-level stratified splits: stratification, determinism, no leakage, audit files."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from common.splits import Fold, SplitError, external_split, fivefold, load_splits, save_splits, split_digest


def _cohort(n: int = 103, malignant: float = 0.75, seed: int = 1) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    ids = [f"p{i:04d}" for i in rng.permutation(n)]
    labels = (rng.random(n) < malignant).astype(int).tolist()
    return ids, labels


def test_each_fold_test_set_keeps_the_class_ratio() -> None:
    ids, labels = _cohort()
    by_id = dict(zip(ids, labels, strict=True))
    folds = fivefold(ids, labels, seed=3)
    n_pos = sum(labels)
    for f in folds:
        pos = sum(by_id[p] for p in f.test)
        assert abs(pos - n_pos * len(f.test) / len(ids)) <= 1.0, (f.k, pos, len(f.test))
        # the validation split is stratified too
        vpos = sum(by_id[p] for p in f.val)
        rest = len(f.train) + len(f.val)
        rest_pos = vpos + sum(by_id[p] for p in f.train)
        assert abs(vpos - rest_pos * len(f.val) / rest) <= 1.0


def test_no_leakage_and_every_patient_tested_exactly_once() -> None:
    ids, labels = _cohort()
    folds = fivefold(ids, labels, seed=0)
    assert [f.k for f in folds] == list(range(5))
    tested: list[str] = []
    for f in folds:
        train, val, test = set(f.train), set(f.val), set(f.test)
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == set(ids)
        tested += f.test
    assert sorted(tested) == sorted(ids)


def test_train_val_proportion_is_eight_to_two() -> None:
    ids, labels = _cohort(n=514)
    for f in fivefold(ids, labels, val_fraction=0.2, seed=0):
        rest = len(f.train) + len(f.val)
        assert len(f.val) == round(0.2 * rest)


def test_deterministic_and_input_order_irrelevant() -> None:
    ids, labels = _cohort()
    a = fivefold(ids, labels, seed=7)
    pairs = list(zip(ids, labels, strict=True))
    random.Random(0).shuffle(pairs)
    b = fivefold([p for p, _ in pairs], [y for _, y in pairs], seed=7)
    assert a == b
    assert split_digest(a) == split_digest(b)
    c = fivefold(ids, labels, seed=8)
    assert [f.test for f in a] != [f.test for f in c]
    assert split_digest(a) != split_digest(c)


def test_too_few_patients_in_a_class_is_a_clear_error() -> None:
    ids = [f"p{i}" for i in range(20)]
    labels = [1] * 16 + [0] * 4
    with pytest.raises(SplitError, match=r"class.*0 has 4 patient"):
        fivefold(ids, labels, folds=5)
    assert len(fivefold(ids, labels, folds=4)) == 4


def test_duplicate_ids_rejected() -> None:
    with pytest.raises(SplitError, match="duplicate"):
        fivefold(["a", "b", "a"] + [f"x{i}" for i in range(20)], [0, 1, 0] + [0, 1] * 10)


def test_external_split_is_all_test() -> None:
    f = external_split(["c", "a", "b"])
    assert f == Fold(k=0, train=(), val=(), test=("a", "b", "c"))


def test_save_and_load_round_trip_and_tamper_detection(tmp_path: Path) -> None:
    ids, labels = _cohort(n=40)
    folds = fivefold(ids, labels, seed=2)
    path = tmp_path / "run" / "splits.json"
    save_splits(path, "centre1", folds)
    site, loaded = load_splits(path)
    assert site == "centre1" and loaded == folds
    doc = json.loads(path.read_text())
    doc["folds"][0]["test"][0], doc["folds"][0]["train"][0] = (
        doc["folds"][0]["train"][0],
        doc["folds"][0]["test"][0],
    )
    path.write_text(json.dumps(doc))
    with pytest.raises(SplitError, match="digest mismatch"):
        load_splits(path)
    path.write_text("{not json")
    with pytest.raises(SplitError, match=re.escape(path.name)):
        load_splits(path)
