"""``flower-client ingest``: a PACS export into the site format, de-identified.

Input: a cases CSV, one row per patient, written by the site's IT/ML person::

    patient_id,dicom,mask,label,radiologist_score,age,sex,series,segment
    S001,export/case_17,rois/case_17.nii.gz,1,8,,,,
    S002,export/case_18,rois/case_18_seg.dcm,0,3,61,F,4,Tumour

``patient_id`` is the site's pseudonym (never the hospital's patient id);
``dicom`` a folder holding the CT series (searched recursively); ``mask`` the
tumour ROI, a NIfTI on the converted image's grid or a DICOM-SEG of that
series (empty: the image is converted alone, so the ROI can be drawn on it,
and the patient is not added to the manifest yet); ``series`` picks the
series (SeriesInstanceUID or SeriesNumber) when the folder holds several CT
series; ``segment`` the SEG segment (number or label) when it has several.
``age`` and ``sex`` are taken from the DICOM header when empty (age in whole
years, 90 for anyone older, as in the HIPAA Safe Harbor rule).  Paths are
relative to the CSV's folder.

For each row the series is converted by the dcm2niix binary shipped in the
``dcm2niix`` package (``dcm2niix.bin``), with its BIDS anonymisation on, and
the outputs are written under pseudonymous names only:
``images/<patient_id>.nii.gz`` (header description cleared: dcm2niix puts the
acquisition time there), ``images/<patient_id>.json`` (the sidecar reduced
to an allow-list of acquisition parameters), ``masks/<patient_id>.nii.gz``.
Every written file is then searched for the series' name, id, birth date and
accession number, and a case holding any is removed and reported.  The pair
is checked with the site validation's checks, and ``manifest.csv`` gets the
row (a patient already listed is replaced).  A case that fails is reported
with its reason; the others carry on.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import logging
import re
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from common.atomicfile import write_atomic
from common.filecheck import validate_image_mask
from common.sitedata import MANIFEST, OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from common.validation import validate_row

from .dicom import (
    IngestError,
    clean_sidecar,
    convert_series,
    dicom_age,
    dicom_sex,
    find_series,
    identifiers,
    pick_series,
    write_image,
    write_mask,
)

log = logging.getLogger(__name__)

CASE_COLUMNS = (
    "patient_id",
    "dicom",
    "mask",
    "label",
    "radiologist_score",
    "age",
    "sex",
    "series",
    "segment",
)
PSEUDONYM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# ---------------------------------------------------------------- one case, the manifest


@dataclass(frozen=True)
class Outcome:
    """What became of one cases-CSV row."""

    patient_id: str
    status: str  # "added", "image only", "failed"
    detail: str = ""


LONG_SECRET = 8
"""Identifiers this long are also searched in voxel bytes: a chance match there has odds ~1e-12 per file
(shorter ones, e.g. a 3-letter name part, occur by chance in any CT's voxels)."""
_CHUNK = 16 << 20


def _gzip_header_fields(raw: bytes) -> bytes:
    """The free-text fields of a gzip member header (FEXTRA, FNAME, FCOMMENT), which the gzip module skips."""
    if len(raw) < 10 or raw[:2] != b"\x1f\x8b":
        return b""
    flags, pos, out = raw[3], 10, []
    if flags & 4 and pos + 2 <= len(raw):
        n = int.from_bytes(raw[pos : pos + 2], "little")
        out.append(raw[pos + 2 : pos + 2 + n])
        pos += 2 + n
    for bit in (8, 16):
        if flags & bit:
            end = raw.find(b"\0", pos)
            end = len(raw) if end < 0 else end
            out.append(raw[pos:end])
            pos = end + 1
    return b"\0".join(out)


def _found(blob: bytes, secrets: Sequence[str]) -> set[str]:
    text = blob.decode("latin-1").lower()
    return {s for s in secrets if s.lower() in text}


def _nifti_leaks(p: Path, secrets: Sequence[str]) -> set[str]:
    """Identifiers anywhere in a NIfTI file: gzip header, NIfTI header, every extension, voxels, trailing bytes.

    The whole decompressed file is read (in chunks): everything but the voxel
    block is searched for every identifier, the voxel block for the long ones.
    """
    img = nib.load(str(p))
    hdr = img.header
    offset = int(hdr["vox_offset"])  # type: ignore[index]
    n_vox = int(np.prod(img.shape)) * np.dtype(hdr.get_data_dtype()).itemsize  # type: ignore[attr-defined]
    found: set[str] = set()
    with p.open("rb") as raw_fh:
        found |= _found(_gzip_header_fields(raw_fh.read(65536)), secrets)
    long = [s for s in secrets if len(s) >= LONG_SECRET]
    overlap = max((len(s) for s in secrets), default=1)
    opener = gzip.open if p.name.endswith(".gz") else open
    with opener(p, "rb") as fh:
        head = max(offset, 352)
        found |= _found(fh.read(head), secrets)  # the header and every extension
        left, tail = max(0, n_vox - (head - offset)), b""
        while left > 0:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            found |= _found(tail + chunk, long)
            tail = chunk[-overlap:]
        rest = fh.read()  # anything after the voxels
        found |= _found(rest, secrets)
    return found


def _leaks(paths: Iterable[Path], secrets: Sequence[str]) -> list[str]:
    """Which identifying values occur in the names or bytes of ``paths`` (whole NIfTI files, sidecars)."""
    hits: list[str] = []
    for p in paths:
        if not p.is_file():
            continue
        found = _found(p.name.encode(), secrets)
        if p.name.endswith((".nii", ".nii.gz")):
            found |= _nifti_leaks(p, secrets)
        else:
            found |= _found(p.read_bytes(), secrets)
        hits += [f"{s!r} in {p.name}" for s in secrets if s in found]
    return hits


def ingest_case(row: dict[str, str], base: Path, site_dir: Path) -> tuple[Outcome, dict[str, str] | None]:
    """Convert one row; the outcome and the manifest row (None unless the case is complete and valid)."""
    pid = row.get("patient_id", "")
    where = f"patient {pid}"
    if not PSEUDONYM.fullmatch(pid):
        raise IngestError(f"{where}: patient_id must be a pseudonym of letters, digits, '_', '.', '-'")
    series_all, skipped = find_series(base / row.get("dicom", ""))
    series = pick_series(series_all, row.get("series", ""), f"{where}: {base / row.get('dicom', '')}")
    secrets = identifiers(series.header)
    if any(pid.lower() == s.lower() or (len(s) >= 4 and s.lower() in pid.lower()) for s in secrets):
        raise IngestError(
            f"{where}: patient_id contains the DICOM patient id or name: use the site's pseudonym"
        )
    manifest_row = {
        "patient_id": pid,
        "label": row.get("label", ""),
        "image": f"images/{pid}.nii.gz",
        "mask": f"masks/{pid}.nii.gz",
        "radiologist_score": row.get("radiologist_score", ""),
        "age": row.get("age", "") or dicom_age(series.header),
        "sex": row.get("sex", "") or dicom_sex(series.header),
    }
    image_path, sidecar_path = site_dir / manifest_row["image"], site_dir / "images" / f"{pid}.json"
    mask_path = site_dir / manifest_row["mask"]
    written = [image_path, sidecar_path]
    try:
        with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
            nii, sidecar = convert_series(series, Path(tmp), where)
            image = write_image(nii, image_path)
            sidecar_path.write_text(json.dumps(clean_sidecar(sidecar, where), indent=2))
        leaks = _leaks(written, secrets)
        if leaks:
            raise IngestError(f"{where}: identifying values found in the outputs ({leaks}); nothing kept")
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    if row.get("mask"):
        try:
            write_mask(base / row["mask"], image, mask_path, row.get("segment", ""), where)
            leaks = _leaks([mask_path], secrets)
            if leaks:
                raise IngestError(f"{where}: identifying values found in the mask ({leaks}); mask not kept")
        except BaseException:
            mask_path.unlink(missing_ok=True)
            raise
    note = f"{series.label()}, {'x'.join(map(str, image.shape))} voxels" + (
        f", {skipped} non-image files skipped" if skipped else ""
    )
    if not row.get("mask"):
        return Outcome(
            pid, "image only", f"{note}; draw the ROI on {image_path} and ingest again with a mask"
        ), None
    problems = validate_image_mask(pid, image_path, mask_path) + validate_row(
        manifest_row, str(site_dir / MANIFEST)
    )
    errors = [str(p) for p in problems if p.severity == "error"]
    if errors:
        mask_path.unlink(missing_ok=True)
        raise IngestError("; ".join(errors))
    warnings = [p.message for p in problems if p.severity == "warning"]
    return Outcome(pid, "added", note + (f"; warnings: {warnings}" if warnings else "")), manifest_row


def update_manifest(site_dir: Path, rows: Sequence[dict[str, str]]) -> Path:
    """Add ``rows`` to the site's manifest (same patient id: replaced), keeping other rows and columns."""
    path = site_dir / MANIFEST
    header = list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)
    existing: list[dict[str, str]] = []
    if path.is_file():
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header += [h for h in reader.fieldnames or [] if h not in header]
            existing = list(reader)
    new_ids = {r["patient_id"] for r in rows}
    merged = [r for r in existing if r.get("patient_id") not in new_ids] + list(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(merged)
    return write_atomic(path, buf.getvalue())


def read_cases(path: Path) -> list[dict[str, str]]:
    """Rows of the cases CSV; raises ``IngestError`` when it is unreadable or lacks columns."""
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in r.items()} for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise IngestError(f"{path}: cannot read the cases file ({exc})") from exc
    missing = [c for c in ("patient_id", "dicom") if c not in header]
    unknown = [c for c in header if c not in CASE_COLUMNS]
    if missing or unknown:
        raise IngestError(
            f"{path}: missing column(s) {missing}, unknown column(s) {unknown} (columns: {list(CASE_COLUMNS)})"
        )
    return rows


def ingest(cases: Path, site_dir: Path) -> list[Outcome]:
    """Ingest every row of ``cases`` into ``site_dir``; failures are reported, never fatal."""
    rows = read_cases(cases)
    site_dir.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    added: list[dict[str, str]] = []
    for row in rows:
        t0 = time.perf_counter()
        try:
            outcome, manifest_row = ingest_case(row, cases.parent, site_dir)
        except IngestError as exc:
            outcome, manifest_row = Outcome(row.get("patient_id", ""), "failed", str(exc)), None
        except Exception as exc:  # one broken export must not stop the others
            log.debug("ingest of %s failed", row.get("patient_id"), exc_info=True)
            outcome, manifest_row = (
                Outcome(row.get("patient_id", ""), "failed", f"{type(exc).__name__}: {exc}"),
                None,
            )
        log.info("%s: %s in %.1f s", outcome.patient_id, outcome.status, time.perf_counter() - t0)
        outcomes.append(outcome)
        if manifest_row is not None:
            added.append(manifest_row)
    if added:
        update_manifest(site_dir, added)
    return outcomes


def ingest_cli(args: argparse.Namespace) -> int:
    """Handler of ``flower-client ingest``: 0 when every row was ingested, 1 otherwise, 2 on bad input."""
    try:
        outcomes = ingest(Path(args.cases), Path(args.site_dir))
    except IngestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for o in outcomes:
        stream = sys.stderr if o.status == "failed" else sys.stdout
        print(f"{o.status.upper():10s} {o.patient_id}: {o.detail}", file=stream)
    n = {s: sum(o.status == s for o in outcomes) for s in ("added", "image only", "failed")}
    print(
        f"{args.site_dir}: {n['added']} added to {MANIFEST}, {n['image only']} image only (no mask yet), {n['failed']} failed"
    )
    return 1 if n["failed"] else 0
