"""The model-selection guard: constant or inverted fold models are left out of the external average."""

from __future__ import annotations

from server.foldguard import GUARD_KEY, external_folds, selection_problem


def test_constant_inverted_and_undefined_are_flagged() -> None:
    assert selection_problem(0.81) is None
    assert selection_problem(0.5001) is None
    assert "constant" in (selection_problem(0.5) or "")
    assert "inverted" in (selection_problem(0.31) or "")
    assert "no validation AUC" in (selection_problem(None) or "")


def test_flagged_folds_are_left_out_unless_all_are() -> None:
    sel = {
        0: {"round": 2, "val_auc": 0.8},
        1: {"round": 1, "val_auc": 0.4, GUARD_KEY: "inverted"},
        2: {"round": 3},
    }
    assert external_folds(sel) == (0, 2)
    every = {k: {GUARD_KEY: "constant"} for k in range(3)}
    assert external_folds(every) == (0, 1, 2)
