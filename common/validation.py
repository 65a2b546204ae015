"""Validation of a site folder: every problem of every patient, in one run.

A hospital runs this before joining a federation (``flower-client validate``)
and the client runs it before training.  It never stops at the first problem:
each manifest row and each case's files are checked independently, so one
broken file cannot hide the state of the others, and a site can fix all of
its data in one pass.  Only ``SiteReport.aggregate`` may leave the site: it
holds counts, never patient ids or file paths.

Severities: an *error* makes a patient unusable (it is left out of
``valid_ids``) or the site's data inconsistent; a *warning* is something the
pipeline handles but a human should know about (a fragmented mask, metal).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.filecheck import HU_RANGE, check_files_safely
from common.problems import Problem, Severity
from common.sitedata import (
    MANIFEST,
    READER_COLUMNS,
    READER_STUDY,
    READER_TIERS,
    SCORE_MIDPOINT,
    SCORE_RANGE,
    Case,
    SiteDataError,
    confined_path,
    read_manifest_rows,
)

if TYPE_CHECKING:
    from common.checkmemo import FileCheckMemo

logger = logging.getLogger(__name__)

AGE_RANGE = (0.0, 120.0)
SEX_VALUES = {"m": "M", "male": "M", "f": "F", "female": "F"}

__all__ = [
    "HU_RANGE",
    "SEX_VALUES",
    "Problem",
    "Severity",
    "SiteReport",
    "validate_case",
    "validate_row",
    "validate_site",
]


@dataclass(frozen=True)
class SiteReport:
    """Everything found in one site folder."""

    site_dir: Path
    n_patients: int  # manifest rows
    problems: tuple[Problem, ...]
    valid_ids: tuple[str, ...]  # manifest patients with no error (warnings allowed)

    @property
    def ok(self) -> bool:
        """True when nothing in the site is an error."""
        return not self.errors

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    def summary(self) -> str:
        """One line, e.g. ``centre1: 28 patients, 26 valid, 2 errors, 1 warning``."""
        return (
            f"{self.site_dir.name}: {_plural(self.n_patients, 'patient')}, {len(self.valid_ids)} valid, "
            f"{_plural(len(self.errors), 'error')}, {_plural(len(self.warnings), 'warning')}"
        )

    def aggregate(self) -> dict[str, Any]:
        """Privacy-safe summary for the server: counts only, no patient ids or file paths."""
        return {
            "n_total": self.n_patients,
            "n_valid": len(self.valid_ids),
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "errors_by_code": dict(sorted(Counter(p.code for p in self.errors).items())),
            "warnings_by_code": dict(sorted(Counter(p.code for p in self.warnings).items())),
        }

    def to_dict(self) -> dict[str, Any]:
        """The full report (stays at the site), JSON-serialisable."""
        return {
            "site_dir": str(self.site_dir),
            "n_patients": self.n_patients,
            "n_valid": len(self.valid_ids),
            "ok": self.ok,
            "summary": self.summary(),
            "valid_ids": list(self.valid_ids),
            "problems": [asdict(p) for p in self.problems],
        }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------- field checks


def _check_label(pid: str, file: str, label: int) -> list[Problem]:
    if label in (0, 1):
        return []
    return [Problem("error", pid, file, "bad_label", f"label {label} is not 0 (benign) or 1 (malignant)")]


def _check_score(pid: str, file: str, score: int, what: str = "radiologist_score") -> list[Problem]:
    lo, hi = SCORE_RANGE
    if not lo <= score <= hi:
        return [Problem("error", pid, file, "bad_score", f"{what} {score} is outside {lo}-{hi}")]
    if score == SCORE_MIDPOINT:
        return [
            Problem(
                "error",
                pid,
                file,
                "score_midpoint",
                f"{what} {SCORE_MIDPOINT} (the 50% midpoint) is excluded by the reading protocol",
            )
        ]
    return []


def _check_age(pid: str, file: str, age: float | None) -> list[Problem]:
    lo, hi = AGE_RANGE
    if age is None or (math.isfinite(age) and lo <= age <= hi):
        return []
    return [Problem("error", pid, file, "bad_age", f"age {age:g} is outside {lo:g}-{hi:g} years")]


def _check_sex(pid: str, file: str, sex: str | None) -> list[Problem]:
    if not sex or sex.strip().lower() in SEX_VALUES:
        return []
    return [Problem("error", pid, file, "bad_sex", f"sex {sex!r} is not M/F (male/female) or empty")]


def _check_row(row: dict[str, str], manifest: str) -> list[Problem]:
    """All field problems of one raw manifest row (not only the first, unlike ``case_from_row``)."""
    pid = row.get("patient_id", "")
    out: list[Problem] = []
    if not pid:
        out.append(Problem("error", None, manifest, "missing_patient_id", "a row has an empty patient_id"))
    label_s = row.get("label", "")
    try:
        out += _check_label(pid, manifest, int(label_s))
    except ValueError:
        out.append(Problem("error", pid, manifest, "bad_label", f"label {label_s!r} is not 0 or 1"))
    score_s = row.get("radiologist_score", "")
    try:
        out += _check_score(pid, manifest, int(score_s))
    except ValueError:
        out.append(
            Problem(
                "error", pid, manifest, "bad_score", f"radiologist_score {score_s!r} is not an integer 1-9"
            )
        )
    age_s = row.get("age", "")
    if age_s:
        try:
            out += _check_age(pid, manifest, float(age_s))
        except ValueError:
            out.append(Problem("error", pid, manifest, "bad_age", f"age {age_s!r} is not a number"))
    out += _check_sex(pid, manifest, row.get("sex", ""))
    for col in ("image", "mask"):
        if not row.get(col, ""):
            out.append(Problem("error", pid, manifest, "missing_file", f"no {col} path given"))
        else:
            try:
                confined_path(Path(manifest).parent, row[col])
            except SiteDataError as exc:
                out.append(Problem("error", pid, manifest, "path_outside_site", f"{col}: {exc}"))
    return out


def _confined(site_dir: Path, row: dict[str, str]) -> bool:
    """Both paths of a row stay inside the site folder (a row that does not is never read)."""
    try:
        confined_path(site_dir, row["image"])
        confined_path(site_dir, row["mask"])
    except SiteDataError:
        return False
    return True


def validate_row(row: dict[str, str], manifest: str) -> list[Problem]:
    """Every field problem of one manifest row (``manifest`` names the file in the messages)."""
    return _check_row(row, manifest)


# ---------------------------------------------------------------- image checks



def validate_case(case: Case, *, hu_range: tuple[float, float] = HU_RANGE) -> list[Problem]:
    """Every problem of one parsed case: its fields and its image and mask files.

    Each file is read once (nibabel memory-maps uncompressed ``.nii``), in the
    RAS+ orientation that training sees.  Image values are judged by:

    * error ``nonfinite_voxels``: any NaN/inf voxel;
    * error ``not_hu``: no voxel below 0. Real CT in HU always holds air
      (-1000) or fat (-100); an all-non-negative volume is stored values
      without rescale intercept, a normalised image or a mask;
    * error ``hu_out_of_range``: more than 1% of voxels outside ``hu_range``
      (default [-1100, 4000]), ignoring one repeated padding value below it
      (scanners fill outside the field of view with -2048, -3024...);
    * warning ``hu_padding`` for such padding, and ``hu_outliers`` when a few
      voxels are outside ``hu_range`` or above 3000 HU (metal): the real
      pelvis CT used in tests (-1207..3382, a metal-like object) passes
      with this warning.
    """
    pid, file = case.patient_id, MANIFEST  # a Case does not know its site folder
    fields = (
        _check_label(pid, file, case.label)
        + _check_score(pid, file, case.radiologist_score)
        + _check_age(pid, file, case.age)
        + _check_sex(pid, file, case.sex)
    )
    return fields + check_files_safely(pid, case.image, case.mask, hu_range)


# ---------------------------------------------------------------- site checks


def _check_manifest(site_dir: Path) -> tuple[list[dict[str, str]] | None, list[Problem]]:
    path = site_dir / MANIFEST
    file = str(path)
    if not site_dir.is_dir():
        return None, [Problem("error", None, str(site_dir), "missing_file", "site folder not found")]
    if not path.is_file():
        return None, [
            Problem("error", None, file, "missing_file", f"manifest not found (a site needs {MANIFEST})")
        ]
    try:
        _, rows = read_manifest_rows(site_dir)
    except SiteDataError as exc:
        # read_manifest_rows chains read errors; its one unchained raise is for missing columns.
        code = "unreadable_file" if exc.__cause__ is not None else "missing_column"
        return None, [Problem("error", None, file, code, str(exc).removeprefix(f"{path}: "))]
    if not rows:
        return None, [Problem("error", None, file, "empty_manifest", "manifest lists no patient")]
    return rows, []


def _check_duplicates(rows: Sequence[dict[str, str]], site_dir: Path, manifest: str) -> list[Problem]:
    out: list[Problem] = []
    lines: dict[str, list[int]] = defaultdict(list)
    for line, row in enumerate(rows, start=2):
        if row.get("patient_id"):
            lines[row["patient_id"]].append(line)
    for pid, at in lines.items():
        if len(at) > 1:
            msg = f"patient_id appears {len(at)} times (lines {at}); ids must be unique"
            out.append(Problem("error", pid, manifest, "duplicate_patient_id", msg))
    users: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        if row.get("image"):
            users[os.path.normpath(site_dir / row["image"])].append(row.get("patient_id", ""))
    for image, pids in users.items():
        for pid in pids[1:]:
            msg = f"image is also used by patient(s) {[p for p in pids if p != pid]}"
            out.append(Problem("warning", pid, image, "duplicate_image", msg))
    return out


def _check_reader_study(path: Path, known: set[str]) -> list[Problem]:
    """Problems of the optional long-form reader study (all rows, not only the first)."""
    file = str(path)
    out: list[Problem] = []
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in READER_COLUMNS if c not in header]
            if missing:
                return [
                    Problem("error", None, file, "missing_column", f"missing required column(s) {missing}")
                ]
            rows = [
                (reader.line_num, {(k or "").strip(): (v or "").strip() for k, v in row.items()})
                for row in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return [Problem("error", None, file, "unreadable_file", f"cannot read reader study ({exc})")]
    seen: set[tuple[str, str]] = set()
    tiers: dict[str, str] = {}
    for line, row in rows:
        pid, who, tier = row["patient_id"], row["reader"], row["tier"]
        msgs: list[str] = []
        if not pid:
            msgs.append("empty patient_id")
        elif pid not in known:
            msg = f"line {line}: patient {pid!r} is not in the manifest"
            out.append(Problem("error", pid, file, "unknown_patient", msg))
        if not who:
            msgs.append("empty reader")
        elif (pid, who) in seen:
            msgs.append(f"reader {who!r} read this patient twice")
        seen.add((pid, who))
        if tier not in READER_TIERS:
            msgs.append(f"tier {tier!r} is not one of {list(READER_TIERS)}")
        elif who and tiers.setdefault(who, tier) != tier:
            msgs.append(f"reader {who!r} has tier {tier!r} here and {tiers[who]!r} on an earlier line")
        for col in ("score_without_ai", "score_with_ai"):
            try:
                msgs += [p.message for p in _check_score(pid, file, int(row[col]), col)]
            except ValueError:
                msgs.append(f"{col} {row[col]!r} is not an integer 1-9")
        out += [Problem("error", pid or None, file, "bad_reader_row", f"line {line}: {m}") for m in msgs]
    return out


def _in_manifest_order(problems: list[Problem], rows: Sequence[dict[str, str]]) -> tuple[Problem, ...]:
    """Site-level problems first, then each patient's together, in manifest order (stable)."""
    rank: dict[str, int] = {}
    for i, row in enumerate(rows):
        rank.setdefault(row.get("patient_id", ""), i)
    return tuple(
        sorted(problems, key=lambda p: -1 if p.patient_id is None else rank.get(p.patient_id, len(rank)))
    )


def validate_site(
    site_dir: Path,
    *,
    check_images: bool = True,
    workers: int = 1,
    hu_range: tuple[float, float] = HU_RANGE,
    memo: FileCheckMemo | None = None,
) -> SiteReport:
    """Check a whole site folder and report every problem found.

    ``check_images=False`` checks only the CSV files (seconds instead of
    minutes for a large site).  ``workers > 1`` reads cases in threads
    (zlib decompression and numpy release the GIL); memory grows with it,
    since each worker holds one float32 image and mask.  Reader-study
    problems make the site not ``ok`` but do not remove a patient from
    ``valid_ids``: imaging data and reader study are separate analyses.
    With a ``memo`` (``common.checkmemo``), a case whose files are unchanged
    since it was last checked is not read again; the memo is saved at the end.
    """
    site_dir = Path(site_dir)
    manifest = str(site_dir / MANIFEST)
    rows, problems = _check_manifest(site_dir)
    if rows is None:
        return SiteReport(site_dir, 0, tuple(problems), ())
    logger.info("validating %d manifest rows of %s", len(rows), site_dir)
    for row in rows:
        problems += _check_row(row, manifest)
    problems += _check_duplicates(rows, site_dir, manifest)
    if check_images:
        todo = [r for r in rows if r.get("image") and r.get("mask") and _confined(site_dir, r)]
        keys = [memo.key(r["patient_id"], site_dir / r["image"], site_dir / r["mask"], hu_range) if memo else None for r in todo]
        remembered: list[list[Problem] | None] = [memo.get(k) if memo else None for k in keys]
        unread = [i for i, kept in enumerate(remembered) if kept is None]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            checked = pool.map(
                check_files_safely,
                [todo[i]["patient_id"] for i in unread],
                [site_dir / todo[i]["image"] for i in unread],
                [site_dir / todo[i]["mask"] for i in unread],
                repeat(hu_range),
            )
            for i, result in zip(unread, checked, strict=True):
                remembered[i] = result
                if memo:
                    memo.put(keys[i], result)
        for case_problems in remembered:
            problems += case_problems or []
        if memo:
            memo.save(keep={k for k in keys if k})
            logger.info("%d of %d cases' files unchanged since checked (memo %s)", memo.reused, len(todo), memo.path)
    bad_ids = {p.patient_id for p in problems if p.severity == "error"}
    ordered = dict.fromkeys(r["patient_id"] for r in rows if r.get("patient_id"))
    valid = tuple(pid for pid in ordered if pid not in bad_ids)
    reader_path = site_dir / READER_STUDY
    readers = _check_reader_study(reader_path, set(ordered)) if reader_path.exists() else []
    report = SiteReport(site_dir, len(rows), _in_manifest_order(problems, rows) + tuple(readers), valid)
    logger.info("%s", report.summary())
    return report
