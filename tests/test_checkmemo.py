"""The file-check memo: a restart reads only changed cases, and the report is the same as a full check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import common.filecheck as filecheck
from common.checkmemo import VALIDATION_MEMO, FileCheckMemo
from common.problems import Problem
from common.sitedata import MANIFEST
from common.validation import validate_site

from .test_validation import _ct, _img, _make_bad_site, _save


@pytest.fixture()
def site(tmp_path: Path) -> Path:
    s = tmp_path / "centre1"
    _make_bad_site(s)
    return s


def _refuse_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every file check record the patient and fail loudly (a read that the memo should have spared)."""
    read: list[str] = []

    def check(pid: str, *args: object) -> list[Problem]:
        read.append(pid)
        raise AssertionError(f"{pid} was read again")

    monkeypatch.setattr(filecheck, "_check_files", check)
    return read


def test_a_restart_with_unchanged_files_reads_only_what_may_have_been_transient(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = validate_site(site)
    memo_path = tmp_path / "out" / "cache" / "memo.json"
    first = validate_site(site, memo=FileCheckMemo(memo_path))
    assert first == full and memo_path.is_file()
    read = _refuse_reads(monkeypatch)
    memo = FileCheckMemo(memo_path)
    again = validate_site(site, memo=memo)
    # c03's image is missing: that result is never kept (a share may not be mounted yet), so c03 is read again
    assert read == ["c03"]
    assert memo.reused == 23
    kept = [p for p in again.problems if p.patient_id != "c03"]
    assert kept == [p for p in full.problems if p.patient_id != "c03"]
    assert again.valid_ids == full.valid_ids
    assert "check_failed" in {p.code for p in again.problems if p.patient_id == "c03"}  # the refused read


def test_a_changed_file_is_read_again(site: Path, tmp_path: Path) -> None:
    memo_path = tmp_path / "memo.json"
    validate_site(site, memo=FileCheckMemo(memo_path))
    nan_ct = _ct(0).astype(np.float32)
    nan_ct[1, 1, 1] = np.nan
    _save(Path(_img(site, "c00")), nan_ct)  # c00 was clean; now it holds a NaN
    memo = FileCheckMemo(memo_path)
    report = validate_site(site, memo=memo)
    assert "nonfinite_voxels" in {p.code for p in report.problems if p.patient_id == "c00"}
    assert report == validate_site(site)
    assert memo.reused == 21  # all 24 but c00, c18 (its image is c00's) and c03 (missing image)


def test_a_file_given_back_its_old_time_is_still_read_again(site: Path, tmp_path: Path) -> None:
    memo_path = tmp_path / "memo.json"
    validate_site(site, memo=FileCheckMemo(memo_path))
    image = Path(_img(site, "c01"))
    st = image.stat()
    replacement = tmp_path / "c01.nii.gz"
    nan_ct = _ct(1).astype(np.float32)
    nan_ct[2, 2, 2] = np.nan
    _save(replacement, nan_ct)
    shutil.move(replacement, image)  # a new inode
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    report = validate_site(site, memo=FileCheckMemo(memo_path))
    assert "nonfinite_voxels" in {p.code for p in report.problems if p.patient_id == "c01"}


def test_a_missing_file_that_appears_is_checked(site: Path, tmp_path: Path) -> None:
    memo_path = tmp_path / "memo.json"
    before = validate_site(site, memo=FileCheckMemo(memo_path))
    assert "c03" not in before.valid_ids
    _save(Path(_img(site, "c03")), _ct(3).astype(np.int16))
    assert "c03" in validate_site(site, memo=FileCheckMemo(memo_path)).valid_ids


@pytest.mark.parametrize(
    "content",
    [
        "not json {",
        json.dumps([1, 2]),
        json.dumps({"version": 999, "entries": {}}),
        "HOSTILE",  # every entry replaced by one that hides all problems under a wrong schema
    ],
)
def test_a_damaged_or_foreign_memo_is_not_trusted(site: Path, tmp_path: Path, content: str) -> None:
    memo_path = tmp_path / "memo.json"
    validate_site(site, memo=FileCheckMemo(memo_path))
    if content == "HOSTILE":
        data = json.loads(memo_path.read_text())
        data["entries"] = {k: [{"severity": "warning", "nonsense": 1}] for k in data["entries"]}
        content = json.dumps(data)
    memo_path.write_text(content)
    assert validate_site(site, memo=FileCheckMemo(memo_path)) == validate_site(site)


def test_memo_entries_of_cases_no_longer_in_the_manifest_are_dropped(site: Path, tmp_path: Path) -> None:
    memo_path = tmp_path / "memo.json"
    validate_site(site, memo=FileCheckMemo(memo_path))
    n_before = len(json.loads(memo_path.read_text())["entries"])
    lines = (site / MANIFEST).read_text().splitlines()
    (site / MANIFEST).write_text("\n".join(line for line in lines if not line.startswith("c00,")) + "\n")
    validate_site(site, memo=FileCheckMemo(memo_path))
    assert len(json.loads(memo_path.read_text())["entries"]) == n_before - 1


def test_the_key_changes_with_the_inode_even_at_the_same_size_and_time(tmp_path: Path) -> None:
    image, mask = tmp_path / "img.nii", tmp_path / "msk.nii"
    image.write_bytes(b"A" * 64)
    mask.write_bytes(b"M" * 64)
    before = FileCheckMemo.key("p1", image, mask, (-1100.0, 4000.0))
    st = image.stat()
    other = tmp_path / "other.nii"
    other.write_bytes(b"B" * 64)  # same size, other content
    os.replace(other, image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    assert FileCheckMemo.key("p1", image, mask, (-1100.0, 4000.0)) != before
    assert FileCheckMemo.key("p2", image, mask, (-1100.0, 4000.0)) != FileCheckMemo.key("p1", image, mask, (-1100.0, 4000.0))


def test_flower_client_run_remembers_the_checks_in_its_output_folder(
    site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import client.node as node
    from client.cli import main as client_main

    monkeypatch.setattr(node, "supervise", lambda *args, **kwargs: 0)  # no SuperNode: only the start is under test
    argv = ["run", str(site), "--site", "centre1", "--server", "127.0.0.1:9", "--insecure",
            "--approve-app", "a" * 64, "--out", str(tmp_path / "out")]  # fmt: skip
    refused = client_main([*argv[:-2], "--root-cert", str(tmp_path / "ca.crt")])  # a flag error: nothing is read
    assert refused == 2 and not (tmp_path / "out").exists()
    assert client_main(argv) == 0
    first = capsys.readouterr().out
    assert (tmp_path / "out" / "cache" / VALIDATION_MEMO).is_file()
    read = _refuse_reads(monkeypatch)
    assert client_main(argv) == 0
    assert read == ["c03"]  # only the case whose image was missing is read again
    summary = next(line for line in first.splitlines() if line.startswith("centre1:"))
    assert summary in capsys.readouterr().out  # the same site summary as the full check printed


def test_the_same_files_reached_by_another_path_are_reported_under_that_path(site: Path, tmp_path: Path) -> None:
    memo_path = tmp_path / "memo.json"
    validate_site(site, memo=FileCheckMemo(memo_path))
    link = tmp_path / "mounted-elsewhere"
    link.symlink_to(site)
    report = validate_site(link, memo=FileCheckMemo(memo_path))
    assert report == validate_site(link)  # every message names the folder as given now, not the old one
    assert all(str(site) not in p.file for p in report.problems)


def test_a_memo_that_cannot_be_written_does_not_stop_the_check(site: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    report = validate_site(site, memo=FileCheckMemo(blocker / "cache" / "memo.json"))
    assert report == validate_site(site)
