"""Site validation: one run reports every seeded problem with its code, patient and file."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import common.filecheck as filecheck
from client.cli import build_parser, lazy_handler, main
from common.sitedata import MANIFEST, READER_STUDY, Case
from common.validation import Problem, SiteReport, validate_case, validate_site

SHAPE = (12, 12, 8)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])
FIELDS = ("patient_id", "label", "image", "mask", "radiologist_score", "age", "sex")


def _ct(seed: int) -> np.ndarray:
    """A tiny CT in HU: noisy air, a soft-tissue body, a bone core."""
    rng = np.random.default_rng(seed)
    ct = -1000.0 + rng.normal(0, 20, SHAPE)
    ct[2:10, 2:10, :] = 40 + rng.normal(0, 10, (8, 8, SHAPE[2]))
    ct[5:7, 5:7, :] = 700.0
    return ct


def _box_mask() -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[4:7, 4:7, 2:5] = 1
    return mask


def _save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _img(site: Path, pid: str) -> str:
    return str(site / "images" / f"{pid}.nii.gz")


def _msk(site: Path, pid: str) -> str:
    return str(site / "masks" / f"{pid}.nii.gz")


def _row(pid: str, **overrides: str) -> dict[str, str]:
    row = {
        "patient_id": pid,
        "label": "1",
        "image": f"images/{pid}.nii.gz",
        "mask": f"masks/{pid}.nii.gz",
        "radiologist_score": "7",
        "age": "54",
        "sex": "M",
    }
    row.update(overrides)
    return row


def _write_case(site: Path, pid: str, seed: int, image: np.ndarray | None = None) -> None:
    _save(Path(_img(site, pid)), (_ct(seed) if image is None else image).astype(np.int16))
    _save(Path(_msk(site, pid)), _box_mask())


def _make_bad_site(site: Path) -> None:
    """24 manifest rows: clean cases plus one of each problem."""
    rows = []
    for i, pid in enumerate(("c00", "c01", "c02", "c05", "c06", "c07", "c08", "c11", "c12", "c13")):
        _write_case(site, pid, seed=i)
    _save(Path(_msk(site, "c03")), _box_mask())  # c03's image is missing
    # c02: two boxes touching at one corner are ONE piece under full connectivity.
    corner = _box_mask()
    corner[7, 7, 5] = 1
    _save(Path(_msk(site, "c02")), corner)
    # c04: a truncated .nii.gz
    _write_case(site, "c04", seed=4)
    raw = Path(_img(site, "c04")).read_bytes()
    Path(_img(site, "c04")).write_bytes(raw[: int(len(raw) * 0.6)])
    _save(Path(_msk(site, "c05")), np.ones((12, 12, 7), np.uint8))  # shape mismatch
    shifted = AFFINE.copy()
    shifted[:3, 3] = (5.0, 0.0, 0.0)
    _save(Path(_msk(site, "c06")), _box_mask(), shifted)  # affine mismatch
    _save(Path(_msk(site, "c07")), np.zeros(SHAPE, np.uint8))  # empty mask
    two = _box_mask()
    two[9:11, 9:11, 6:8] = 1
    _save(Path(_msk(site, "c08")), two)  # two pieces: warning only
    nan_ct = _ct(9).astype(np.float32)
    nan_ct[0, 0, 0] = np.nan
    _save(Path(_img(site, "c09")), nan_ct)
    _save(Path(_msk(site, "c09")), _box_mask())
    _save(Path(_img(site, "c10")), (_ct(10) + 1024).clip(0).astype(np.uint16))  # stored values, no intercept
    _save(Path(_msk(site, "c10")), _box_mask())
    for i, pid in enumerate(("c14", "c14b", "c15", "c16", "c20", "c21", "c22"), start=14):
        _write_case(site, pid, seed=i)
    _save(Path(_img(site, "c17")), np.stack([_ct(17), _ct(18)], axis=-1).astype(np.int16))  # 4D
    _save(Path(_msk(site, "c17")), _box_mask())
    _save(Path(_msk(site, "c18")), _box_mask())  # c18's image is c00's
    _save(Path(_img(site, "c19")), (_ct(19) * 10).astype(np.int32))  # not HU (x10)
    _save(Path(_msk(site, "c19")), _box_mask())
    metal = _ct(20)
    metal[3, 3, 3:6] = 3500.0
    _save(Path(_img(site, "c20")), metal.astype(np.int16))
    padded = _ct(22)
    padded[:2] = -3024.0  # scanner padding outside the field of view: 17% of voxels
    _save(Path(_img(site, "c22")), padded.astype(np.int16))

    rows = [
        _row("c00"),
        _row("c01", label="0", radiologist_score="2", sex="female"),
        _row("c02", sex="", age=""),
        _row("c03"),  # image never written
        _row("c04"),
        _row("c05"),
        _row("c06"),
        _row("c07"),
        _row("c08", sex="male"),
        _row("c09"),
        _row("c10"),
        _row("c11", label="2"),
        _row("c12", radiologist_score="5"),
        _row("c13", radiologist_score="11"),
        _row("c14"),
        _row("c14", image="images/c14b.nii.gz", mask="masks/c14b.nii.gz"),
        _row("c15", age="200"),
        _row("c16", sex="X"),
        _row("c17"),
        _row("c18", image="images/c00.nii.gz"),
        _row("c19"),
        _row("c20", sex="f"),
        _row("c21", label="0", radiologist_score="1"),
        _row("c22"),
    ]
    _write_csv(site / MANIFEST, FIELDS, rows)
    reader_fields = ("patient_id", "reader", "tier", "score_without_ai", "score_with_ai")
    readings = [
        ("c00", "r1", "junior", "3", "4"),
        ("c00", "r2", "senior", "7", "8"),
        ("c01", "r1", "junior", "2", "2"),
        ("zz99", "r1", "junior", "3", "3"),  # unknown patient
        ("c02", "r3", "expert", "3", "3"),  # bad tier
        ("c01", "r2", "senior", "5", "6"),  # excluded midpoint
    ]
    _write_csv(
        site / READER_STUDY, reader_fields, [dict(zip(reader_fields, r, strict=True)) for r in readings]
    )


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("sites") / "centre1"
    _make_bad_site(site)
    return site


@pytest.fixture(scope="module")
def report(bad_site: Path) -> SiteReport:
    return validate_site(bad_site)


def _clean_site(site: Path, n: int = 3) -> Path:
    for i in range(n):
        _write_case(site, f"ok{i}", seed=100 + i)
    two = _box_mask()
    two[0:2, 0:2, 0:2] = 1
    _save(Path(_msk(site, "ok0")), two)  # one warning: still a passing site
    _write_csv(site / MANIFEST, FIELDS, [_row(f"ok{i}") for i in range(n)])
    return site


def test_one_run_reports_every_seeded_error(report: SiteReport, bad_site: Path) -> None:
    s, man, rs = bad_site, str(bad_site / MANIFEST), str(bad_site / READER_STUDY)
    expected = {
        ("missing_file", "c03", _img(s, "c03")),
        ("corrupt_nifti", "c04", _img(s, "c04")),
        ("shape_mismatch", "c05", _msk(s, "c05")),
        ("affine_mismatch", "c06", _msk(s, "c06")),
        ("empty_mask", "c07", _msk(s, "c07")),
        ("nonfinite_voxels", "c09", _img(s, "c09")),
        ("not_hu", "c10", _img(s, "c10")),
        ("bad_label", "c11", man),
        ("score_midpoint", "c12", man),
        ("bad_score", "c13", man),
        ("duplicate_patient_id", "c14", man),
        ("bad_age", "c15", man),
        ("bad_sex", "c16", man),
        ("not_3d", "c17", _img(s, "c17")),
        ("hu_out_of_range", "c19", _img(s, "c19")),
        ("unknown_patient", "zz99", rs),
        ("bad_reader_row", "c02", rs),
        ("bad_reader_row", "c01", rs),
    }
    found = {(p.code, p.patient_id, p.file) for p in report.errors}
    assert found == expected
    assert len(report.errors) == len(expected)


def test_warnings_do_not_invalidate(report: SiteReport, bad_site: Path) -> None:
    s = bad_site
    assert {(p.code, p.patient_id, p.file) for p in report.warnings} == {
        ("fragmented_mask", "c08", _msk(s, "c08")),
        ("duplicate_image", "c18", _img(s, "c00")),
        ("hu_outliers", "c20", _img(s, "c20")),
        ("hu_padding", "c22", _img(s, "c22")),
    }
    (frag,) = [p for p in report.warnings if p.code == "fragmented_mask"]
    assert "2 disconnected pieces" in frag.message
    assert "largest connected component" in frag.message
    # Reader-study errors (c01, c02) do not remove patients whose imaging data is fine.
    assert report.valid_ids == ("c00", "c01", "c02", "c08", "c18", "c20", "c21", "c22")
    assert report.n_patients == 24
    assert not report.ok


def test_problem_text_names_file_and_patient(report: SiteReport) -> None:
    for p in report.problems:
        text = str(p)
        assert text.startswith(f"{p.severity.upper()}  {p.file}  ")
        assert p.message in text
        if p.patient_id is not None:
            assert f"patient {p.patient_id}: " in text
    shape = next(p for p in report.problems if p.code == "shape_mismatch")
    assert "(12, 12, 7)" in shape.message and "(12, 12, 8)" in shape.message


def test_site_level_problem_text() -> None:
    p = Problem(
        "error", None, "centre1/manifest.csv", "missing_column", "missing required column(s) ['mask']"
    )
    assert str(p) == "ERROR  centre1/manifest.csv  missing required column(s) ['mask']"


def test_problems_grouped_in_manifest_order(report: SiteReport) -> None:
    order = [p.patient_id for p in report.problems[:-3]]
    firsts = [pid for pid in dict.fromkeys(order) if pid is not None]
    assert firsts == sorted(firsts)
    # Reader-study problems come last, in line order.
    assert [p.patient_id for p in report.problems[-3:]] == ["zz99", "c02", "c01"]


def test_workers_give_the_same_report(report: SiteReport, bad_site: Path) -> None:
    assert validate_site(bad_site, workers=3) == report


def test_no_images_checks_only_csv(bad_site: Path) -> None:
    quick = validate_site(bad_site, check_images=False)
    codes = {p.code for p in quick.problems}
    assert {"bad_label", "score_midpoint", "bad_score", "duplicate_patient_id", "unknown_patient"} <= codes
    assert not codes & {"missing_file", "corrupt_nifti", "shape_mismatch", "not_hu", "empty_mask"}


def test_aggregate_holds_counts_only(report: SiteReport, bad_site: Path) -> None:
    agg = report.aggregate()
    assert agg["n_total"] == 24 and agg["n_valid"] == 8
    assert agg["errors_by_code"]["bad_reader_row"] == 2
    assert agg["warnings_by_code"] == {
        "duplicate_image": 1,
        "fragmented_mask": 1,
        "hu_outliers": 1,
        "hu_padding": 1,
    }
    text = json.dumps(agg)
    assert "c0" not in text and "c1" not in text and "zz99" not in text
    assert str(bad_site) not in text and "nii" not in text and "centre1" not in text


def test_validate_case_reports_fields_and_files(bad_site: Path) -> None:
    case = Case("x1", 2, Path(_img(bad_site, "c05")), Path(_msk(bad_site, "c05")), 5, age=-3.0, sex="?")
    codes = sorted(p.code for p in validate_case(case))
    assert codes == ["bad_age", "bad_label", "bad_sex", "score_midpoint", "shape_mismatch"]


def test_crash_in_one_case_does_not_stop_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _clean_site(tmp_path / "s")
    real = filecheck.load_nifti

    def flaky(path: Path) -> tuple[np.ndarray, np.ndarray]:
        if Path(path).name == "ok1.nii.gz" and "images" in str(path):
            raise RuntimeError("disk on fire")
        return real(path)

    monkeypatch.setattr(filecheck, "load_nifti", flaky)
    rep = validate_site(site)
    assert [(p.code, p.patient_id) for p in rep.errors] == [("check_failed", "ok1")]
    assert "disk on fire" in rep.errors[0].message
    assert rep.valid_ids == ("ok0", "ok2")


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (None, "missing_file"),
        (b"patient_id,label,image\nx,1,a.nii.gz\n", "missing_column"),
        (b"\xff\xfe\x00\x81bad", "unreadable_file"),
        (",".join(FIELDS).encode() + b"\n", "empty_manifest"),
    ],
)
def test_unusable_manifest(tmp_path: Path, content: bytes | None, code: str) -> None:
    if content is not None:
        (tmp_path / MANIFEST).write_bytes(content)
    rep = validate_site(tmp_path)
    assert [(p.code, p.patient_id, p.file) for p in rep.problems] == [(code, None, str(tmp_path / MANIFEST))]
    assert rep.n_patients == 0 and not rep.ok


def test_missing_site_folder(tmp_path: Path) -> None:
    rep = validate_site(tmp_path / "nowhere")
    assert [(p.code, p.message) for p in rep.problems] == [("missing_file", "site folder not found")]


def test_cli_prints_every_problem_and_fails(
    report: SiteReport, bad_site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", str(bad_site)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [str(p) for p in report.problems] + [report.summary()]
    assert lines[-1] == "centre1: 24 patients, 8 valid, 18 errors, 4 warnings"


def test_cli_clean_site_with_warning_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = _clean_site(tmp_path / "centre2")
    assert main(["validate", str(site)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("WARNING  ") and "fragmented_mask" not in out[0]
    assert out[1] == "centre2: 3 patients, 3 valid, 0 errors, 1 warning"
    assert main(["validate", "--json", str(site)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["valid_ids"] == ["ok0", "ok1", "ok2"] and data["ok"] is True
    assert [p["code"] for p in data["problems"]] == ["fragmented_mask"]


def test_cli_without_command_shows_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "validate" in capsys.readouterr().err


def test_parser_is_extensible_with_lazy_handlers(capsys: pytest.CaptureFixture[str]) -> None:
    def add_echo(sub: object) -> None:
        p = sub.add_parser("echo")  # type: ignore[attr-defined]
        p.add_argument("words", nargs="*")
        p.set_defaults(handler=lazy_handler("tests.test_validation", "_echo_cli"))

    args = build_parser([add_echo]).parse_args(["echo", "a", "b"])
    assert args.handler(args) == 7
    assert capsys.readouterr().out == "a b\n"


def _echo_cli(args: object) -> int:
    print(" ".join(args.words))  # type: ignore[attr-defined]
    return 7


def test_console_script_end_to_end(report: SiteReport, bad_site: Path) -> None:
    exe = Path(sys.executable).parent / "flower-client"
    assert exe.exists(), f"{exe} not installed: the project must be installed (pip install -e .)"
    done = subprocess.run([str(exe), "validate", str(bad_site)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines()[-1] == report.summary()
    assert str(next(p for p in report.problems if p.code == "corrupt_nifti")) in done.stdout


def test_real_pelvis_ct_passes(shared_ct: Path, tmp_path: Path) -> None:
    src = shared_ct / "pelvis_ct.nii.gz"
    site = tmp_path / "real"
    (site / "images").mkdir(parents=True)
    shutil.copy(src, site / "images" / "p1.nii.gz")  # a symbolic link out of the site folder is refused
    ct = nib.Nifti1Image.from_filename(str(src))
    mask = np.zeros(ct.shape, np.uint8)
    mask[50:70, 40:60, 20:40] = 1
    _save(site / "masks" / "p1.nii.gz", mask, ct.affine)
    _write_csv(site / MANIFEST, FIELDS, [_row("p1")])
    rep = validate_site(site)
    assert rep.ok, [str(p) for p in rep.problems]
    assert rep.valid_ids == ("p1",)
    # The metal-like object (up to 3382 HU) is flagged, not rejected.
    assert [p.code for p in rep.warnings] == ["hu_outliers"]
