"""DICOM for ``flower-client ingest``: find and convert a CT series, turn a DICOM-SEG into a mask.

The series is converted by the dcm2niix binary shipped in the ``dcm2niix``
package, with its BIDS anonymisation on; the NIfTI header's description is
cleared (dcm2niix puts the acquisition time there) and the sidecar reduced to
``SIDECAR_KEYS``.  Every function raises ``IngestError`` naming the case
(``where``) and the reason; ``client.ingest`` turns that into the case's
outcome and carries on with the others.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dcm2niix
import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

log = logging.getLogger(__name__)

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


def dicom_age(header: pydicom.Dataset | None) -> str:
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


def dicom_sex(header: pydicom.Dataset | None) -> str:
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
