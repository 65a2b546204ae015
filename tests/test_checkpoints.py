"""Round checkpoints: selection of the best pooled validation AUC, resume, config guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.checkpoints import CheckpointError, CheckpointStore


def test_best_round_is_selected_earliest_on_ties(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "cfgA")
    for r, auc in [(1, 0.61), (2, 0.74), (3, 0.74), (4, None)]:
        store.save("densenet3d", 0, r, np.full(4, r, np.float32), {"val_auc": auc})
    best = store.select_best("densenet3d", 0)
    assert best == {"round": 2, "val_auc": 0.74}
    np.testing.assert_array_equal(store.load("densenet3d", 0, best["round"]), np.full(4, 2, np.float32))
    assert store.finished("densenet3d", 0) == best


def test_selection_window_keeps_early_rounds_out_unless_none_later_finished(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "cfgA")
    for r, auc in [(1, 0.95), (2, 0.70), (3, 0.80), (4, 0.78)]:
        store.save("densenet3d", 0, r, np.full(4, r, np.float32), {"val_auc": auc})
    assert store.select_best("densenet3d", 0)["round"] == 1  # the study's rule: every round competes
    assert store.select_best("densenet3d", 0, first_round=3) == {"round": 3, "val_auc": 0.80}
    assert store.finished("densenet3d", 0) == {"round": 3, "val_auc": 0.80}
    # a fold stopped after round 2 (e.g. run_folds smoke runs, or fewer rounds done) still selects
    for r, auc in [(1, 0.6), (2, 0.7)]:
        store.save("densenet3d", 1, r, np.full(4, r, np.float32), {"val_auc": auc})
    assert store.select_best("densenet3d", 1, first_round=3)["round"] == 2


def test_resume_point_is_the_last_finished_round(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "cfgA")
    assert store.last_round("densenet3d", 1) == 0
    for r in (1, 2, 3):
        store.save("densenet3d", 1, r, np.zeros(3, np.float32), {"val_auc": 0.5})
    (tmp_path / "densenet3d_fold1" / ".round4.tmp.npz").write_bytes(b"partial write")
    assert store.last_round("densenet3d", 1) == 3
    assert store.finished("densenet3d", 1) is None


def test_checkpoints_of_another_config_are_refused(tmp_path: Path) -> None:
    CheckpointStore(tmp_path, "cfgA").save("densenet2d", 0, 1, np.zeros(2, np.float32), {"val_auc": 0.5})
    with pytest.raises(CheckpointError, match="written under config cfgA"):
        CheckpointStore(tmp_path, "cfgB").load("densenet2d", 0, 1)


def test_status_command_reads_progress_from_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli import main

    store = CheckpointStore(tmp_path / "checkpoints", "cfgA")
    store.save("densenet3d", 0, 1, np.zeros(2, np.float32), {"val_auc": 0.61, "trained": ["c1", "c2"], "dropped": {}})
    store.save("densenet3d", 0, 2, np.zeros(2, np.float32), {"val_auc": 0.7, "trained": ["c1"], "dropped": {"c2": "train: 3 non-finite values"}})
    assert main(["status", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "in progress" in out and "rounds done   2" in out and "validation AUC 0.7000" in out and "non-finite" in out


def test_a_rounds_validation_goes_beside_its_checkpoint_which_is_never_rewritten(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "cfgA")
    store.save("densenet3d", 0, 1, np.zeros(3, np.float32), {"val_auc": 0.6})  # written before this change
    assert store.validated("densenet3d", 0, 1)
    store.save("densenet3d", 0, 2, np.ones(3, np.float32), {"val_auc": None, "validated": False})
    assert not store.validated("densenet3d", 0, 2)
    ckpt = tmp_path / "densenet3d_fold0" / "round2.npz"
    before = ckpt.stat().st_mtime_ns
    store.save_validation("densenet3d", 0, 2, {"val_auc": 0.8, "evaluated": ["a", "b"]})
    assert ckpt.stat().st_mtime_ns == before and store.rounds("densenet3d", 0) == [1, 2]
    meta = store.meta("densenet3d", 0, 2)
    assert meta["val_auc"] == 0.8 and meta["evaluated"] == ["a", "b"] and store.validated("densenet3d", 0, 2)
    assert store.select_best("densenet3d", 0)["round"] == 2
    with pytest.raises(CheckpointError, match="written under config cfgA"):
        CheckpointStore(tmp_path, "cfgB").meta("densenet3d", 0, 2)
