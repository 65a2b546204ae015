"""The run report: built from a synthetic run folder (no Flower), self-contained, numbers traceable."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.gridstats import ClassHistogram, ScoreGrid, pooled_metrics
from common.report import load_statistics, render_report

BINS = 100
FOLDS = (0, 1)
SINGLES = ("densenet2d", "densenet3d", "radiologist")
ENSEMBLE_WEIGHTS = {
    "ensemble_2d3d": {"densenet2d": 0.3, "densenet3d": 0.7},
    "ensemble_3d_radiologist": {"densenet3d": 0.6, "radiologist": 0.4},
    "ensemble_2d3d_radiologist": {"densenet2d": 0.2, "densenet3d": 0.5, "radiologist": 0.3},
}
SCORES = (*SINGLES, *ENSEMBLE_WEIGHTS)


def _histograms(rng: np.random.Generator, separation: float) -> dict[str, ClassHistogram]:
    """Random scores for two internal folds and an external set, one histogram per subset."""
    grid = ScoreGrid(BINS)
    out = {}
    for subset, n in (("fold0", 40), ("fold1", 40), ("external", 25)):
        y = np.array([0, 1] * (n // 2) + [1] * (n % 2))
        s = np.clip(rng.normal(0.5 + separation * (y - 0.5), 0.2), 0.0, 1.0)
        out[subset] = ClassHistogram.from_scores(y, s, grid)
    return out


def _entry(h: dict[str, ClassHistogram]) -> dict[str, Any]:
    """A summary model entry computed the way server.runner does."""
    folds = [pooled_metrics(h[f"fold{k}"]).to_dict() for k in FOLDS]
    return {
        "internal": {
            "pooled": pooled_metrics(ClassHistogram.aggregate(h[f"fold{k}"] for k in FOLDS)).to_dict(),
            "folds": folds,
            "fold_mean_auc": float(np.mean([f["auc"] for f in folds])),
        },
        "external": {"pooled": pooled_metrics(h["external"]).to_dict()},
    }


def _round_logs(rng: np.random.Generator) -> list[dict[str, Any]]:
    logs = []
    for r in (1, 2, 3):
        dropped = {"centre2": "update norm 41.0 above bound 12.5"} if r == 2 else {}
        trained = ["centre1"] + ([] if dropped else ["centre2"])
        logs.append({"round": r, "trained": trained, "evaluated": ["centre1", "centre2"], "dropped": dropped,
                     "missing": [], "val_auc": float(rng.uniform(0.5, 0.9)), "val_n": 16,
                     "train_loss": 0.7 / r, "seconds": 1.5})
    return logs


def _write_run(run_dir: Path, full: bool) -> dict[str, Any]:
    """A run folder as server.runner writes it; ``full`` adds every optional section."""
    rng = np.random.default_rng(7)
    hists = {score: _histograms(rng, sep) for score, sep in zip(SCORES, (0.2, 0.4, 0.35, 0.4, 0.5, 0.5), strict=True)}
    (run_dir / "stats").mkdir(parents=True)
    np.savez_compressed(run_dir / "stats" / "final.npz", **{  # type: ignore[arg-type]
        f"{score}/{subset}/{k}": v
        for score, subsets in hists.items() for subset, h in subsets.items() for k, v in h.to_arrays().items()
    })
    models = {score: _entry(h) for score, h in hists.items()}
    for name, w in ENSEMBLE_WEIGHTS.items():
        models[name] |= {"weights": w, "val_auc": 0.8}
    summary: dict[str, Any] = {
        "plan": "federated",
        "config": "unit",
        "config_digest": "0123456789abcdef",
        "sites": {"centre1": {"role": "train", "patients": 40, "benign": 20, "malignant": 20},
                  "centre2": {"role": "train", "patients": 40, "benign": 20, "malignant": 20},
                  "centre3": {"role": "external", "patients": 25, "benign": 12, "malignant": 13}},
        "unavailable_sites": {},
        "models": models,
        "selection": {m: {str(k): {"round": 2, "val_auc": 0.8} for k in FOLDS} for m in ("densenet3d", "densenet2d")},
        "rounds": {f"{m}/fold{k}": _round_logs(rng) for m in ("densenet3d", "densenet2d") for k in FOLDS},
        "communication": {s: {"bytes_sent": 1000 * i, "bytes_received": 2000 * i}
                          for i, s in enumerate(("centre1", "centre2", "centre3"), 1)},
        "wall_seconds": 3725.0,
    }
    if full:
        summary["baselines"] = {
            "pooled": {s: _entry(_histograms(rng, 0.45)) for s in ("densenet3d", "densenet2d")},
            "local": {site: {"densenet3d": _entry(_histograms(rng, 0.3))} for site in ("centre1", "centre2")},
            "local_mean": {"densenet3d": {"internal_auc": 0.71}},
        }
        # the shape simulation.cli.cohort_reference writes: per-centre AUCs with the cohort's under "all"
        summary["cohort"] = {"oracle_auc": {"centre1": 0.94, "centre2": 0.9, "all": 0.93},
                             "radiologist_auc": {"centre1": 0.86, "all": 0.85}, "handcrafted_lr_auc": {"all": 0.8},
                             "generator": "simulation.synth 1"}
        summary["delong"] = {"ensemble_3d_radiologist vs densenet3d (internal)": {
            "auc1": 0.9, "auc2": 0.85, "z": 2.1, "p": 0.036, "ci1": [0.85, 0.95], "ci2": [0.8, 0.9],
            "n_pos": 40, "n_neg": 40}}
        summary["reader_study"] = {tier: {
            "without_ai": pooled_metrics(_histograms(rng, 0.2)["external"]).to_dict() | {"mae": 0.4},
            "with_ai": pooled_metrics(_histograms(rng, 0.4)["external"]).to_dict() | {"mae": 0.3},
            "delong": {"p": 0.01}} for tier in ("junior", "mid-level", "senior")}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return summary


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("run")
    summary = _write_run(run_dir, full=True)
    return render_report(run_dir), summary


def test_html_is_self_contained(full_report: tuple[Path, dict[str, Any]]) -> None:
    path, _ = full_report
    assert path == path.parent.parent / "report" / "report.html" and path.is_file()
    text = path.read_text()
    assert 'src="http' not in text and "href=\"http" not in text and "<script" not in text
    assert '<link' not in text  # no external stylesheet
    srcs = re.findall(r'<img[^>]*\ssrc="([^"]*)"', text)
    assert len(srcs) >= 7
    assert all(s.startswith("data:image/png;base64,") for s in srcs)


def test_html_has_tables_and_every_score(full_report: tuple[Path, dict[str, Any]]) -> None:
    text = full_report[0].read_text()
    for heading in ("Table 2.", "Table 3.", "Table 4a.", "Table 4b.", "Table 4c.", "ROC curves", "Calibration curves",
                    "Decision curves", "Confusion matrices", "Validation AUC per round", "Participation per site",
                    "Federated vs pooled vs local-only", "Communication per site", "mean of folds"):
        assert heading in text, heading
    for score in SCORES:
        assert score in text, score
    assert "update norm 41.0 above bound 12.5" in text  # the drop reason reaches the reader
    assert "1:02:05" in text  # wall time 3725 s


def test_files_exist_and_csv_matches_summary(full_report: tuple[Path, dict[str, Any]]) -> None:
    path, summary = full_report
    folder = path.parent
    for png in ("roc", "calibration", "decision_curves", "confusion_matrices", "validation_auc_per_round",
                "baselines", "communication"):
        assert (folder / f"{png}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    rows = _csv_rows(folder / "table2_single_scores.csv")
    for score in SINGLES:
        internal = summary["models"][score]["internal"]
        by_subset = {r["subset"]: r for r in rows if r["score"] == score}
        assert float(by_subset["internal: pooled"]["auc"]) == internal["pooled"]["auc"]
        assert float(by_subset["internal: mean of folds"]["auc"]) == internal["fold_mean_auc"]
        assert float(by_subset["internal: fold 1"]["f1"]) == internal["folds"][1]["f1"]
        tn, fp = internal["pooled"]["confusion_matrix"][0]
        assert (int(by_subset["internal: pooled"]["tn"]), int(by_subset["internal: pooled"]["fp"])) == (tn, fp)
        ext = summary["models"][score]["external"]["pooled"]
        assert float(by_subset["external"]["accuracy"]) == ext["accuracy"]
    ens = _csv_rows(folder / "table4_ensembles.csv")
    assert {r["score"] for r in ens} == set(ENSEMBLE_WEIGHTS)
    weights = {r["score"]: r["weights"] for r in _csv_rows(folder / "table4_weights.csv")}
    assert weights["ensemble_3d_radiologist"] == "densenet3d 0.60, radiologist 0.40"
    assert len(_csv_rows(folder / "table3_reader_study.csv")) == 6
    base = _csv_rows(folder / "baselines.csv")
    assert {r["training"] for r in base} == {"federated", "pooled", "local", "local mean"}
    cohort = {r["quantity"]: r["value"] for r in _csv_rows(folder / "cohort.csv")}
    assert float(cohort["oracle_auc"]) == 0.93 and float(cohort["handcrafted_lr_auc"]) == 0.8
    sites = {r["site"]: r for r in _csv_rows(folder / "participation_sites.csv")}
    assert sites["centre2"]["dropped"] == "4" and sites["centre1"]["trained"] == "12"


def test_curves_come_from_the_statistics(full_report: tuple[Path, dict[str, Any]]) -> None:
    """The plotted curves are the grid statistics' (their AUC is the summary's pooled AUC)."""
    path, summary = full_report
    curves = json.loads((path.parent / "curves.json").read_text())
    for score in SCORES:
        internal = curves["internal pooled"][score]
        assert internal["auc"] == pytest.approx(summary["models"][score]["internal"]["pooled"]["auc"], abs=1e-12)
        assert internal["roc"]["fpr"][0] == 0.0 and internal["roc"]["tpr"][-1] == 1.0
        assert len(internal["calibration"]["counts"]) == 10 and sum(internal["calibration"]["counts"]) == 80
        assert curves["external"][score]["n"] == 25


def test_minimal_summary_still_renders(tmp_path: Path) -> None:
    """No optional section, no external set, a score missing: notes instead of crashes."""
    summary = _write_run(tmp_path, full=False)
    stats = load_statistics(tmp_path / "stats" / "final.npz")
    keep = {s: {k: h for k, h in subsets.items() if k != "external"} for s, subsets in stats.items() if s != "densenet2d"}
    np.savez_compressed(tmp_path / "stats" / "final.npz", **{  # type: ignore[arg-type]
        f"{s}/{sub}/{k}": v for s, subsets in keep.items() for sub, h in subsets.items() for k, v in h.to_arrays().items()
    })
    del summary["models"]["densenet2d"]
    for entry in summary["models"].values():
        entry.pop("external")
    for key in ("rounds", "communication", "selection", "unavailable_sites"):
        del summary[key]
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    text = render_report(tmp_path).read_text()
    assert "No reader study in this run" in text and "No pooled or local-only baselines" in text
    assert "2D DenseNet121 (densenet2d): not in this run" in text
    assert "No external statistics" in text
    assert not (tmp_path / "report" / "table3_reader_study.csv").exists()
    assert (tmp_path / "report" / "roc.png").exists()


def test_missing_statistics_and_rerender(tmp_path: Path) -> None:
    """Without stats/final.npz the tables still render; a rerun replaces the folder (no stale files)."""
    _write_run(tmp_path, full=True)
    render_report(tmp_path)
    assert (tmp_path / "report" / "roc.png").exists()
    (tmp_path / "stats" / "final.npz").unlink()
    text = render_report(tmp_path).read_text()
    assert "No grid statistics" in text and "Table 2." in text
    assert not (tmp_path / "report" / "roc.png").exists()
    assert not list(tmp_path.glob(".report-*"))


def test_bad_input_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"summary\.json"):
        render_report(tmp_path)
    (tmp_path / "summary.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"summary\.json: not valid JSON"):
        render_report(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"models": []}))
    with pytest.raises(ValueError, match="'models' must be an object"):
        render_report(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"models": {"densenet3d": {"internal": {"fold_mean_auc": "high"}}}}))
    with pytest.raises(ValueError, match=r"summary\.json: expected a number in the summary, got 'high'"):
        render_report(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"models": {}}))
    (tmp_path / "stats").mkdir()
    np.savez(tmp_path / "stats" / "final.npz", **{"densenet3d/fold0": np.zeros(10)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"final\.npz: array 'densenet3d/fold0'"):
        render_report(tmp_path)


def test_rendering_imports_no_deep_learning_stack(full_report: tuple[Path, dict[str, Any]]) -> None:
    """The report is statistics and plots: rendering it in a fresh interpreter loads no torch, MONAI or SciPy.

    ``flower-server run`` renders it after every run; those imports cost the run's tail ~6 s.
    """
    import subprocess
    import sys

    report, _ = full_report
    run_dir = report.parent.parent
    code = (
        "import sys; from pathlib import Path; from common.report import render_report; "
        f"render_report(Path({str(run_dir)!r})); "
        "print(sorted(m for m in ('torch', 'monai', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
