"""Report notes for the selection guard and for an ensemble below its best member on test."""

from __future__ import annotations

from typing import Any

from common.report_federation import training_section
from common.report_tables import table4_section
from common.reportdoc import Note


def _pooled(auc: float) -> dict[str, Any]:
    return {"pooled": {"auc": auc, "n": 40}}


def _notes(section: Any) -> list[str]:
    return [b.text for b in section.blocks if isinstance(b, Note)]


def test_an_ensemble_below_its_best_member_on_test_is_flagged() -> None:
    models = {
        "densenet3d": {"internal": _pooled(0.90), "external": _pooled(0.80)},
        "radiologist": {"internal": _pooled(0.85), "external": _pooled(0.84)},
        "ensemble_3d_radiologist": {
            "internal": _pooled(0.92),
            "external": _pooled(0.83),
            "weights": {"densenet3d": 0.6, "radiologist": 0.4},
            "val_auc": 0.93,
        },
    }
    notes = _notes(table4_section({"models": models}))
    assert any("below its best member on external test" in n and "radiologist 0.840" in n for n in notes)
    assert not any("internal test" in n for n in notes)


def test_a_guarded_fold_is_named_in_the_training_section() -> None:
    summary = {
        "rounds": {
            "densenet3d/fold0": [{"round": 1, "val_auc": 0.4}],
            "densenet3d/fold1": [{"round": 1, "val_auc": 0.8}],
        },
        "selection": {
            "densenet3d": {
                "0": {
                    "round": 1,
                    "val_auc": 0.4,
                    "guard": "inverted on validation (pooled validation AUC 0.400 < 0.5)",
                },
                "1": {"round": 1, "val_auc": 0.8},
            }
        },
    }
    notes = _notes(training_section(summary))
    assert len([n for n in notes if "left out of the external average" in n]) == 1
    assert any("fold 0" in n and "inverted" in n for n in notes)
