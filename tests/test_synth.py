"""The synthetic cohort: study shape, site format, determinism, centre effects, difficulty."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from common import sitedata
from simulation import anatomy, cohortplan, readers, synth


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The floor cohort (scale 0: 3 centres x 10 benign + 10 malignant), generated once."""
    out = tmp_path_factory.mktemp("synth") / "cohort"
    return out, synth.generate_cohort(out, scale=0.0, seed=0, workers=1)


def _nifti(path: Path) -> nib.Nifti1Image:
    img = nib.load(str(path))
    assert isinstance(img, nib.Nifti1Image), path
    return img


def _labels_and(out: Path, centre: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    with (out / centre / sitedata.MANIFEST).open() as fh:
        rows = list(csv.DictReader(fh))
    return np.array([int(r["label"]) for r in rows]), np.array([float(r[column]) for r in rows])


# ---------------------------------------------------------------- study shape
def test_default_centres_have_the_study_counts_and_demographics() -> None:
    c1, c2, c3 = synth.default_centres(1.0)
    assert (c1.benign, c1.malignant, c1.n_patients) == (129, 385, 514)
    assert (c2.benign + c3.benign, c2.malignant + c3.malignant) == (19, 36)
    assert c1.n_male == 276 and c2.n_male + c3.n_male == 27
    assert not c1.external and c2.external and c3.external
    assert {c.orientation for c in (c1, c2, c3)} == {"LAS", "LPS", "RAI"}
    ages = cohortplan._ages(c1)
    assert ages.min() == 6 and ages.max() == 81 and abs(ages.mean() - 42.0) < 0.5


def test_scale_shrinks_with_a_floor_of_ten_per_class() -> None:
    assert [(c.benign, c.malignant) for c in synth.default_centres(0.0)] == [(10, 10)] * 3
    c1, c2, c3 = synth.default_centres(0.35)
    assert (c1.benign, c1.malignant) == (45, 135)
    assert (c2.benign, c2.malignant, c3.benign, c3.malignant) == (10, 10, 10, 10)
    with pytest.raises(synth.CohortError, match="scale"):
        synth.default_centres(-0.1)


def test_bad_centre_specs_are_rejected_with_the_centre_named() -> None:
    with pytest.raises(synth.CohortError, match=r"centre 'x'.*orientation"):
        synth.CentreSpec("x", 10, 10, orientation="RAX")
    with pytest.raises(synth.CohortError, match=r"centre 'x'.*patients"):
        synth.CentreSpec("x", 0, 0)


def test_latent_model_reaches_the_paper_auc_levels_at_full_size() -> None:
    """Planning alone (no voxels) for the 569 study patients: oracle, radiologist, reader tiers."""
    plans = [synth.plan_centre(c, seed=0) for c in synth.default_centres(1.0)]
    patients = [p for cp in plans for p in cp.patients]
    y = np.array([p.label for p in patients])
    oracle = roc_auc_score(y, [p.evidence for p in patients])
    radiologist = roc_auc_score(y, [p.radiologist_score for p in patients])
    model = roc_auc_score(y, [p.model_reading for p in patients])
    assert 0.92 <= oracle <= 0.97
    assert 0.81 <= radiologist <= 0.90
    assert 0.81 <= model <= 0.90
    # Fusing radiologist and an image reading beats both (partly independent errors).
    fused = np.array([p.model_reading for p in patients]) + 0.5 * np.array(
        [p.radiologist_score for p in patients]
    )
    assert roc_auc_score(y, fused) > max(radiologist, model) + 0.02
    label_of = {p.patient_id: p.label for p in patients}
    rows = [r for cp in plans for r in cp.reader_rows]
    auc = {}
    for tier in sitedata.READER_TIERS:
        sel = [r for r in rows if r.tier == tier]
        yt = [label_of[r.patient_id] for r in sel]
        auc[tier] = (
            roc_auc_score(yt, [r.score_without_ai for r in sel]),
            roc_auc_score(yt, [r.score_with_ai for r in sel]),
        )
    assert auc["junior"][0] < auc["mid"][0] < auc["senior"][0]
    assert all(with_ai > without for without, with_ai in auc.values())
    assert 0.60 <= auc["junior"][0] <= 0.73 and 0.83 <= auc["senior"][0] <= 0.91


def test_expected_reader_aucs_match_the_paper_tiers() -> None:
    by_tier: dict[str, list[tuple[float, float]]] = {}
    for r in readers.READERS:
        by_tier.setdefault(r.tier, []).append((readers.expected_auc(r), readers.expected_auc(r, True)))
    target = {"junior": (0.666, 0.768), "mid": (0.776, 0.871), "senior": (0.872, 0.911)}
    for tier, (without, with_ai) in target.items():
        got = np.mean(by_tier[tier], axis=0)
        assert abs(got[0] - without) < 0.02 and abs(got[1] - with_ai) < 0.02, (tier, got)


def test_scores_are_on_the_nine_point_scale_without_the_midpoint() -> None:
    z = np.linspace(-4, 4, 801)
    s = readers.to_score(z)
    assert set(s.tolist()) == {1, 2, 3, 4, 6, 7, 8, 9}
    assert np.all(np.diff(s) >= 0)


# ---------------------------------------------------------------- files
def test_cohort_json_summarises_the_written_cohort(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, cohort = tiny
    assert json.loads((out / synth.COHORT_JSON).read_text()) == cohort
    assert cohort["generator"] == synth.GENERATOR_VERSION and cohort["seed"] == 0
    assert cohort["external"] == ["centre2", "centre3"]
    for name in ("centre1", "centre2", "centre3"):
        d = cohort["demographics"][name]
        assert (d["benign"], d["malignant"], d["male"] + d["female"]) == (10, 10, 20)
        assert len(list((out / name / "images").glob("*.nii.gz"))) == 20
    assert cohort["generation_seconds"] > 0
    for key in ("oracle_auc", "radiologist_auc", "size_only_auc", "mean_hu_only_auc", "handcrafted_lr_auc"):
        assert key in cohort


def test_sites_load_in_ras_with_matching_shapes(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, _ = tiny
    for spec in synth.default_centres(0.0):
        cases = list(sitedata.iter_cases(out / spec.name))
        assert [c.patient_id for c in cases[:2]] == [f"c{spec.name[-1]}-0001", f"c{spec.name[-1]}-0002"]
        for case in cases[:2]:
            raw = _nifti(case.image)
            assert "".join(nib.aff2axcodes(raw.affine)) == spec.orientation
            assert raw.get_data_dtype() == np.int16 and _nifti(case.mask).get_data_dtype() == np.uint8
            vol = sitedata.load_case(case)
            assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
            assert vol.image.shape == vol.mask.shape == spec.shape
            assert np.allclose(vol.spacing, spec.spacing_mm)
            assert vol.mask.sum() > 50
            # Identical to the RAS+ rendering: the stored orientation is undone exactly.
            image, mask, affine = synth.render_patient(
                spec, synth.plan_centre(spec, 0).patients[case_index(case)]
            )
            assert np.array_equal(vol.image, image) and np.array_equal(vol.mask, mask)
            assert np.allclose(vol.affine, affine)


def case_index(case: sitedata.Case) -> int:
    return int(case.patient_id.split("-")[1]) - 1


def test_reader_study_is_complete_for_every_site(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, _ = tiny
    for name in ("centre1", "centre2", "centre3"):
        scores = sitedata.read_reader_study(out / name)
        assert len(scores) == 20 * 6
        assert {s.tier for s in scores} == set(sitedata.READER_TIERS)
        values = {s.score_without_ai for s in scores} | {s.score_with_ai for s in scores}
        assert values <= {1, 2, 3, 4, 6, 7, 8, 9}


def test_masks_sit_in_the_sacrum(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, _ = tiny
    for spec in synth.default_centres(0.0):
        plans = synth.plan_centre(spec, 0).patients
        for case in list(sitedata.iter_cases(out / spec.name))[:4]:
            plan = plans[case_index(case)]
            scene = anatomy.render(spec.grid(), plan.anatomy, plan.lesion, np.random.default_rng(0))
            mask = sitedata.load_case(case).mask.astype(bool)
            # The lesion replaces bone: a good part of it lies where the intact sacrum was.
            assert (mask & scene.bone).sum() / mask.sum() > 0.15, case.patient_id
            centre = np.argwhere(mask).mean(axis=0).round().astype(int)
            assert scene.bone[tuple(centre)] or mask[tuple(centre)], case.patient_id


# ---------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files_and_a_centre_alone_matches(
    tiny: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    out, _ = tiny
    spec = synth.default_centres(0.0)[1]
    again = tmp_path / "again"
    synth.generate_cohort(again, scale=0.0, seed=0, centres=[spec])
    for name in (sitedata.MANIFEST, sitedata.READER_STUDY):
        assert (again / spec.name / name).read_bytes() == (out / spec.name / name).read_bytes()
    for pid in ("c2-0001", "c2-0007", "c2-0020"):
        for kind in ("images", "masks"):
            a = _nifti(again / spec.name / kind / f"{pid}.nii.gz")
            b = _nifti(out / spec.name / kind / f"{pid}.nii.gz")
            assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            assert (again / spec.name / kind / f"{pid}.nii.gz").read_bytes() == (
                out / spec.name / kind / f"{pid}.nii.gz"
            ).read_bytes()


def test_another_seed_gives_another_cohort() -> None:
    spec = synth.default_centres(0.0)[1]
    a, b = synth.plan_centre(spec, 0), synth.plan_centre(spec, 1)
    assert [p.label for p in a.patients] != [p.label for p in b.patients]
    assert not np.array_equal(
        synth.render_patient(spec, a.patients[0])[0], synth.render_patient(spec, b.patients[0])[0]
    )


# ---------------------------------------------------------------- centre effects and difficulty
def _fat_and_noise(image: np.ndarray) -> tuple[float, float]:
    """Median HU of fat-range voxels and a noise estimate (MAD of x-differences inside fat)."""
    fat = (image > -250) & (image < -30)
    inner = fat[1:] & fat[:-1]
    diffs = np.diff(image, axis=0)[inner]
    return float(np.median(image[fat])), float(1.4826 * np.median(np.abs(diffs - np.median(diffs))))


def test_centres_differ_in_calibration_and_noise(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, _ = tiny
    fat: dict[str, list[float]] = {}
    noise: dict[str, list[float]] = {}
    for name in ("centre2", "centre3"):
        for case in list(sitedata.iter_cases(out / name))[:8]:
            f, n = _fat_and_noise(sitedata.load_case(case).image)
            fat.setdefault(name, []).append(f)
            noise.setdefault(name, []).append(n)
    assert stats.ttest_ind(fat["centre2"], fat["centre3"]).pvalue < 1e-4
    assert np.mean(fat["centre2"]) - np.mean(fat["centre3"]) > 20  # +28 HU vs -22 HU offsets
    assert np.mean(noise["centre2"]) > 1.5 * np.mean(noise["centre3"])


def test_auc_summaries_match_the_files_and_stay_in_range(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, cohort = tiny
    with (out / synth.LATENT_CSV).open() as fh:
        latent = {r["patient_id"]: r for r in csv.DictReader(fh)}
    labels, rad, evidence = [], [], []
    for name in ("centre1", "centre2", "centre3"):
        y, r = _labels_and(out, name, "radiologist_score")
        _, age = _labels_and(out, name, "age")
        assert age.min() >= 6 and age.max() <= 82
        labels += y.tolist()
        rad += r.tolist()
    with (out / synth.LATENT_CSV).open() as fh:
        order = [r["patient_id"] for r in csv.DictReader(fh)]
    evidence = [float(latent[p]["evidence"]) for p in order]
    y_latent = [int(latent[p]["label"]) for p in order]
    assert y_latent == labels  # latent.csv lists patients in manifest order
    oracle = roc_auc_score(labels, evidence)
    radiologist = roc_auc_score(labels, rad)
    assert cohort["oracle_auc"]["all"] == pytest.approx(oracle, abs=1e-4)
    assert cohort["radiologist_auc"]["all"] == pytest.approx(radiologist, abs=1e-4)
    assert 0.85 <= oracle <= 0.995
    assert 0.70 <= radiologist <= 0.97


def test_size_or_mean_hu_alone_does_not_separate_the_classes(tiny: tuple[Path, dict[str, Any]]) -> None:
    out, cohort = tiny
    y, volume_ml, mean_hu = [], [], []
    for spec in synth.default_centres(0.0):
        for case in sitedata.iter_cases(out / spec.name):
            vol = sitedata.load_case(case)
            roi = vol.mask > 0
            y.append(case.label)
            volume_ml.append(roi.sum() * np.prod(vol.spacing) / 1000.0)
            mean_hu.append(float(vol.image[roi].mean()))
    for values in (volume_ml, mean_hu):
        auc = roc_auc_score(y, values)
        assert max(auc, 1 - auc) < 0.8
    assert cohort["size_only_auc"]["all"] == pytest.approx(roc_auc_score(y, np.log(volume_ml)), abs=1e-3)
    assert np.all(np.array(volume_ml) > 2.0)  # sacral tumours are centimetres, not voxels


def test_handcrafted_features_on_a_known_cube() -> None:
    image = np.full((20, 20, 20), 100, dtype=np.int16)
    mask = np.zeros_like(image, dtype=np.uint8)
    mask[5:15, 5:15, 5:15] = 1
    image[mask > 0] = 40
    image[10, 10, 10] = 140
    f = synth.handcrafted_features(image, mask, (1.0, 1.0, 2.0))
    assert f["log_roi_ml"] == pytest.approx(np.log(2.0))
    assert f["roi_mean_hu"] == pytest.approx(40.1)
    assert f["shell_mean_hu"] == pytest.approx(100.0)
    with pytest.raises(synth.CohortError, match="empty"):
        synth.handcrafted_features(image, np.zeros_like(mask), (1.0, 1.0, 1.0))


@pytest.mark.parametrize("code", ["RAS", "LPS", "LAS", "RAI", "PIR"])
def test_reorient_round_trips_through_canonical(code: str) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([1.5, 1.0, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    stored, stored_affine = synth.reorient(data, affine, code)
    assert "".join(nib.aff2axcodes(stored_affine)) == code
    back = nib.as_closest_canonical(nib.Nifti1Image(stored, stored_affine))
    assert np.array_equal(np.asarray(back.dataobj), data)
    assert np.allclose(back.affine, affine)


# ---------------------------------------------------------------- failure modes
def test_interrupted_generation_leaves_no_cohort_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "cohort"
    out.mkdir()
    (out / synth.COHORT_JSON).write_text("{}")

    def boom(task: Any) -> dict[str, float]:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_make_patient", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        synth.generate_cohort(out, scale=0.0, centres=[synth.default_centres(0.0)[2]])
    assert not (out / synth.COHORT_JSON).exists()


def test_refuses_to_overwrite_a_folder_that_is_not_a_site(tmp_path: Path) -> None:
    precious = tmp_path / "centre3"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    spec = dataclasses.replace(synth.default_centres(0.0)[2])
    with pytest.raises(synth.CohortError, match="refusing"):
        synth.generate_cohort(tmp_path, centres=[spec])
    assert (precious / "notes.txt").read_text() == "keep me"
