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
import datetime as dt
import gzip
import io
import json
import logging
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dcm2niix
import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from common.atomicfile import write_atomic
from common.filecheck import validate_image_mask
from common.sitedata import MANIFEST, OPTIONAL_COLUMNS, REQUIRED_COLUMNS
from common.validation import validate_row

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
SIDECAR_KEYS = (
    "Modality",
    "Manufacturer",
    "ManufacturersModelName",
    "BodyPart",
    "PatientPosition",
    "SoftwareVersions",
    "ImageType",
    "ConvolutionKernel",
    "ReconFilterType",
    "ReconFilterSize",
    "KVP",
    "ExposureTime",
    "XRayTubeCurrent",
    "XRayExposure",
    "CTDIvol",
    "SliceThickness",
    "SpacingBetweenSlices",
    "ImageOrientationPatientDICOM",
    "ConversionSoftware",
    "ConversionSoftwareVersion",
)
"""Sidecar keys kept: acquisition parameters that matter across centres (kernel, kVp, slice
thickness).  Everything else goes, including free text (series and protocol descriptions can
hold names), institution, station and device identifiers, dates and times."""
MAX_AGE = 90
PSEUDONYM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class IngestError(ValueError):
    """One case cannot be ingested; the message names the patient, the file and the reason."""


# ---------------------------------------------------------------- DICOM series


@dataclass
class Series:
    """One DICOM series found in a folder (headers only)."""

    uid: str
    number: str
    description: str
    modality: str
    image_type: str
    files: list[Path] = field(default_factory=list)
    header: pydicom.Dataset | None = None

    def label(self) -> str:
        return f"series {self.number or '?'} {self.description!r} ({self.modality}, {len(self.files)} files)"


def find_series(folder: Path) -> tuple[list[Series], int]:
    """The DICOM series under ``folder`` (recursively) and the number of non-DICOM files skipped."""
    if not folder.is_dir():
        raise IngestError(f"{folder}: DICOM folder not found")
    found: dict[str, Series] = {}
    skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            skipped += 1
            continue
        if "PixelData" not in ds and ds.get("Modality") != "CT" and "ImagePositionPatient" not in ds:
            skipped += 1  # DICOMDIR, structured reports, presentation states
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        s = found.get(uid)
        if s is None:
            s = found[uid] = Series(
                uid=uid,
                number=str(ds.get("SeriesNumber", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""),
                modality=str(ds.get("Modality", "") or ""),
                image_type="\\".join(str(v) for v in (ds.get("ImageType") or [])),
                header=ds,
            )
        s.files.append(path)
    return list(found.values()), skipped


def pick_series(series: Sequence[Series], wanted: str, where: str) -> Series:
    """The series named by ``wanted`` (UID or number), else the only CT series that is not a localizer."""
    if wanted:
        match = [s for s in series if wanted in (s.uid, s.number)]
        if len(match) != 1:
            raise IngestError(
                f"{where}: series {wanted!r} {'not found' if not match else 'is ambiguous'} among {[s.label() for s in series]}"
            )
        return match[0]
    ct = [s for s in series if s.modality == "CT" and "LOCALIZER" not in s.image_type.upper()]
    if len(ct) == 1:
        return ct[0]
    if not ct:
        raise IngestError(
            f"{where}: no CT series found (found {[s.label() for s in series] or 'no DICOM file'})"
        )
    raise IngestError(
        f"{where}: {len(ct)} CT series found, say which in the 'series' column: {[s.label() for s in ct]}"
    )


def identifiers(header: pydicom.Dataset | None) -> list[str]:
    """Identifying values of a series header that must never appear in the site folder."""
    if header is None:
        return []
    values: list[str] = []
    for tag in ("PatientID", "AccessionNumber", "PatientBirthDate", "OtherPatientIDs"):
        v = header.get(tag)
        values += [str(x) for x in (v if isinstance(v, pydicom.multival.MultiValue) else [v]) if x]
    name = header.get("PatientName")
    if name:
        values.append(str(name))
        values += [p for p in re.split(r"[\^=\s]+", str(name)) if len(p) >= 3]
    return [v.strip() for v in values if len(v.strip()) >= 3]


def _dicom_age(header: pydicom.Dataset | None) -> str:
    """Age in whole years from PatientAge (``054Y``) or birth and study dates; 90 for 90 and over."""
    if header is None:
        return ""
    text = str(header.get("PatientAge", "") or "")
    m = re.fullmatch(r"(\d{3})([DWMY])", text)
    years: float | None = None
    if m:
        n, unit = int(m.group(1)), m.group(2)
        years = {"D": n / 365.25, "W": n / 52.18, "M": n / 12.0, "Y": float(n)}[unit]
    else:
        born, seen = str(header.get("PatientBirthDate", "") or ""), str(header.get("StudyDate", "") or "")
        try:
            b, s = dt.datetime.strptime(born, "%Y%m%d").date(), dt.datetime.strptime(seen, "%Y%m%d").date()
            years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
        except ValueError:
            return ""
    return str(min(int(years), MAX_AGE)) if years is not None and years >= 0 else ""


def _dicom_sex(header: pydicom.Dataset | None) -> str:
    sex = str(header.get("PatientSex", "") or "").upper() if header is not None else ""
    return sex if sex in ("M", "F") else ""


# ---------------------------------------------------------------- conversion


def convert_series(series: Series, out_dir: Path, where: str) -> tuple[Path, Path | None]:
    """Run dcm2niix on one series; the (uncompressed) NIfTI and its JSON sidecar in ``out_dir``.

    The series' files are linked into a folder of their own, so other series
    of the same export are not converted.  A gantry-tilt or variable-spacing
    series gives dcm2niix's corrected volume (``_Tilt``/``_Eq``).
    """
    src = out_dir / "src"
    src.mkdir(parents=True)
    for i, f in enumerate(series.files):
        (src / f"{i:06d}.dcm").symlink_to(f.resolve())
    nii_dir = out_dir / "nii"
    nii_dir.mkdir()
    cmd = [
        dcm2niix.bin,
        "-z",
        "n",
        "-b",
        "y",
        "-ba",
        "y",
        "-f",
        "series",
        "-w",
        "1",
        "-o",
        str(nii_dir),
        str(src),
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IngestError(f"{where}: dcm2niix could not run ({exc})") from exc
    volumes = sorted(nii_dir.glob("*.nii"))
    if done.returncode != 0 or not volumes:
        said = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()][-3:]
        raise IngestError(
            f"{where}: dcm2niix failed on {series.label()} (exit {done.returncode}): {' / '.join(said)}"
        )
    if len(volumes) > 1:
        corrected = [v for v in volumes if re.search(r"_(Eq|Tilt)_\d+\.nii$", v.name)]
        if len(corrected) != 1:
            raise IngestError(
                f"{where}: {series.label()} gave {len(volumes)} volumes ({[v.name for v in volumes]}): "
                "mixed geometry or echoes; export one reconstruction per series"
            )
        log.info("%s: using dcm2niix's corrected volume %s", where, corrected[0].name)
        volumes = corrected
    sidecar = volumes[0].with_suffix(".json")
    return volumes[0], sidecar if sidecar.is_file() else None


def clean_sidecar(sidecar: Path | None, where: str) -> dict[str, Any]:
    r"""The sidecar reduced to ``SIDECAR_KEYS``; empty (with a warning) when it cannot be parsed.

    dcm2niix writes a value ending in a backslash (a Siemens kernel such as
    ``Br38f\``) unescaped, and addresses with raw line breaks: both are
    repaired before parsing.
    """
    if sidecar is None:
        return {}
    text = re.sub(r'(?<!\\)\\"(,?)$', r'\\\\"\1', sidecar.read_text(errors="replace"), flags=re.M)
    try:
        data = json.loads(text, strict=False)
    except ValueError as exc:
        log.warning("%s: dcm2niix's sidecar is not valid JSON (%s): written empty", where, exc)
        return {}
    return {k: data[k] for k in SIDECAR_KEYS if k in data}


def write_image(nii: Path, dest: Path) -> nib.Nifti1Image:
    """Save dcm2niix's volume as ``dest`` (.nii.gz) with the free-text header fields cleared."""
    img = nib.load(str(nii))
    assert isinstance(img, nib.Nifti1Image)
    # dcm2niix stores raw values with the rescale slope/intercept in the header (nibabel keeps
    # them on the data proxy).  Write HU directly: int16 when they are whole numbers (a float view
    # saved as int16 would get a new scale factor, off by up to 0.02 HU).
    proxy = img.dataobj
    slope, inter = float(proxy.slope), float(proxy.inter)  # type: ignore[attr-defined]
    raw = np.asanyarray(proxy.get_unscaled())  # type: ignore[attr-defined]
    data: np.ndarray
    if slope == 1.0 and inter.is_integer() and np.issubdtype(raw.dtype, np.integer):
        hu = raw.astype(np.int32) + int(inter)
        fits = hu.size == 0 or (hu.min() >= np.iinfo(np.int16).min and hu.max() <= np.iinfo(np.int16).max)
        data = hu.astype(np.int16) if fits else hu
    else:
        data = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
    out = nib.Nifti1Image(data, img.affine, header=img.header)
    out.header.set_data_dtype(data.dtype)
    out.header.set_slope_inter(1.0, 0.0)
    for key in ("descrip", "aux_file", "db_name", "intent_name"):
        out.header[key] = b""
    # Header extensions are free-form blocks (dcm2niix can write the DICOM header or a BIDS JSON
    # into one): none is kept.
    out.header.extensions.clear()
    dest.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(dest))
    return out


# ---------------------------------------------------------------- masks


def seg_to_mask(path: Path, affine: np.ndarray, shape: Sequence[int], segment: str, where: str) -> np.ndarray:
    """A DICOM-SEG's segment on the image grid (``affine``, ``shape``) as uint8.

    Each frame's pixels are placed by its plane position and orientation
    (DICOM LPS, turned into the NIfTI's RAS) and must land on voxel centres
    of the grid: a SEG drawn on another series or reconstruction is refused.
    """
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as exc:
        raise IngestError(f"{where}: {path}: not a readable DICOM file ({exc})") from exc
    if ds.get("SOPClassUID") != SEG_SOP_CLASS:
        raise IngestError(
            f"{where}: {path}: not a DICOM-SEG (SOP class {ds.get('SOPClassUID')}, modality {ds.get('Modality')})"
        )
    segments = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in ds.SegmentSequence}
    if segment:
        chosen = [
            n for n, lab in segments.items() if segment in (str(n), lab) or segment.lower() == lab.lower()
        ]
    else:
        chosen = list(segments) if len(segments) == 1 else []
    if len(chosen) != 1:
        raise IngestError(
            f"{where}: {path}: say which segment in the 'segment' column (segments: {segments})"
        )
    frames = np.asarray(ds.pixel_array)
    frames = frames[None] if frames.ndim == 2 else frames
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != frames.shape[0]:
        raise IngestError(
            f"{where}: {path}: {frames.shape[0]} frame(s) but {len(per_frame)} per-frame entries: a damaged SEG"
        )
    if str(ds.get("SegmentationType", "BINARY")) == "FRACTIONAL":
        frames = frames > float(ds.get("MaximumFractionalValue", 255)) / 2.0
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    mask = np.zeros(tuple(int(n) for n in shape[:3]), dtype=np.uint8)
    for f, item in enumerate(per_frame):
        ident = _group(item, shared, "SegmentIdentificationSequence")
        if ident is None or int(ident.ReferencedSegmentNumber) != chosen[0]:
            continue
        rows, cols = np.nonzero(frames[f])
        if rows.size == 0:
            continue
        iop = np.asarray(
            _group(item, shared, "PlaneOrientationSequence").ImageOrientationPatient, dtype=np.float64
        )
        spacing = np.asarray(_group(item, shared, "PixelMeasuresSequence").PixelSpacing, dtype=np.float64)
        ipp = np.asarray(_group(item, shared, "PlanePositionSequence").ImagePositionPatient, dtype=np.float64)
        lps = ipp + cols[:, None] * spacing[1] * iop[:3] + rows[:, None] * spacing[0] * iop[3:]
        vox = (lps * np.array([-1.0, -1.0, 1.0])) @ inv[:3, :3].T + inv[:3, 3]
        idx = np.rint(vox).astype(np.int64)
        off = float(np.abs(vox - idx).max())
        if off > 0.1:
            raise IngestError(
                f"{where}: {path}: SEG frame {f + 1} is not on the image grid (off by up to {off:.2f} voxel): drawn on another series?"
            )
        inside = np.all((idx >= 0) & (idx < np.asarray(mask.shape)), axis=1)
        if not inside.all():
            raise IngestError(
                f"{where}: {path}: SEG frame {f + 1} lies (partly) outside the image: drawn on another series?"
            )
        mask[idx[:, 0], idx[:, 1], idx[:, 2]] = 1
    if not mask.any():
        raise IngestError(f"{where}: {path}: segment {chosen[0]} {segments[chosen[0]]!r} is empty")
    return mask


def _group(item: pydicom.Dataset, shared: pydicom.Dataset | None, name: str) -> Any:
    """A functional group's first item, per frame or shared."""
    for src in (item, shared):
        if src is not None and name in src:
            return src[name][0]
    return None


def write_mask(src: Path, image: nib.Nifti1Image, dest: Path, segment: str, where: str) -> None:
    """Write the ROI (NIfTI, or DICOM-SEG placed on the image grid) as a uint8 NIfTI with a clean header."""
    if src.name.endswith((".nii", ".nii.gz")):
        try:
            m = nib.load(str(src))
            data, affine = (np.asanyarray(m.dataobj) > 0.5).astype(np.uint8), m.affine  # type: ignore[attr-defined]
        except Exception as exc:  # nibabel raises many types for broken files
            raise IngestError(
                f"{where}: {src}: cannot read NIfTI mask ({type(exc).__name__}: {exc})"
            ) from exc
    else:
        data, affine = seg_to_mask(src, image.affine, image.shape, segment, where), image.affine
    dest.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(dest))


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
        "age": row.get("age", "") or _dicom_age(series.header),
        "sex": row.get("sex", "") or _dicom_sex(series.header),
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
