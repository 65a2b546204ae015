"""DICOM ingestion with the real dcm2niix binary on the real JPEG2000 CT series in ../shared.

Geometry and values of the converted volume are checked against the DICOM headers and
pixels read independently with pydicom; de-identification on a copy of the series carrying
a made-up name, id, birth date and accession number.
"""

from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from client.cli import main
from client.dicom import IngestError, seg_to_mask
from common.sitedata import load_nifti
from common.validation import validate_site

PHI = {
    "PatientName": "Doe^Johnathan",
    "PatientID": "HOSP-553311",
    "PatientBirthDate": "19600412",
    "AccessionNumber": "ACC99887766",
}


def _dicom_grid(folder: Path) -> tuple[np.ndarray, tuple[int, int, int], list[pydicom.Dataset]]:
    """RAS affine (voxel (column, row, slice) -> mm), shape and slices sorted along the normal, from pydicom."""
    slices = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    iop = np.asarray(slices[0].ImageOrientationPatient, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda d: float(np.dot(normal, np.asarray(d.ImagePositionPatient, dtype=np.float64))))
    first, last = (np.asarray(d.ImagePositionPatient, dtype=np.float64) for d in (slices[0], slices[-1]))
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * dc
    lps[:3, 1] = iop[3:] * dr
    lps[:3, 2] = (last - first) / (len(slices) - 1)
    lps[:3, 3] = first
    return (
        np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps,
        (int(slices[0].Columns), int(slices[0].Rows), len(slices)),
        slices,
    )


def _write_cases(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(
            fh, fieldnames=["patient_id", "dicom", "mask", "label", "radiologist_score", "age", "sex"]
        )
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def series(shared_ct: Path) -> Path:
    return shared_ct / "abdomen_ct_dicom"


@pytest.fixture(scope="module")
def phi_series(series: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real series re-saved with identifying values in its headers and in its folder and file names."""
    out = tmp_path_factory.mktemp("pacs") / "DOE_JOHNATHAN_HOSP-553311"
    out.mkdir()
    uid = pydicom.uid.generate_uid()
    for i, src in enumerate(sorted(series.iterdir())):
        ds = pydicom.dcmread(src)
        for key, value in PHI.items():
            setattr(ds, key, value)
        ds.PatientSex, ds.StudyDate, ds.SeriesInstanceUID, ds.SeriesNumber = "M", "20221208", uid, 4
        ds.save_as(out / f"Doe_Johnathan_{i:03d}.dcm")
    (out / "README.txt").write_text("not a DICOM file: skipped")
    return out


def test_real_series_converts_with_the_geometry_and_values_of_its_dicom_headers(
    series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = _write_cases(
        tmp_path / "cases.csv",
        [
            {"patient_id": "S001", "dicom": str(series), "label": "1", "radiologist_score": "8"},
            {
                "patient_id": "S002",
                "dicom": str(tmp_path / "no-such-export"),
                "label": "0",
                "radiologist_score": "2",
            },
        ],
    )
    site = tmp_path / "site"
    assert main(["ingest", str(site), "--cases", str(cases)]) == 1  # S002 failed, S001 went on
    out = capsys.readouterr()
    assert "IMAGE ONLY S001" in out.out and "draw the ROI" in out.out
    assert "FAILED     S002" in out.err and "no-such-export: DICOM folder not found" in out.err
    assert not (site / "manifest.csv").exists()  # no case had a mask yet

    ras, shape, slices = _dicom_grid(series)
    img = nib.load(str(site / "images" / "S001.nii.gz"))
    assert img.shape == (512, 512, 20) and shape == (512, 512, 20)
    dr, dc = (float(v) for v in slices[0].PixelSpacing)
    first, second = (np.asarray(d.ImagePositionPatient, float) for d in slices[:2])
    step = float(np.linalg.norm(second - first))
    # 3 mm slices every 2 mm: the spacing is the distance between slices, not their thickness
    assert np.allclose(img.header.get_zooms(), (dc, dr, step)) and step == pytest.approx(2.0)
    # Every DICOM pixel (column c, row r, slice s) sits at a NIfTI voxel centre with the same HU.
    data = np.asarray(img.dataobj)
    rng = np.random.default_rng(0)
    for s in (0, 7, 19):
        ds = slices[s]
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        c, r = rng.integers(0, 512, 200), rng.integers(0, 512, 200)
        world = np.stack([c, r, np.full(200, s), np.ones(200)]).T @ ras.T
        vox = world @ np.linalg.inv(img.affine).T
        idx = np.rint(vox[:, :3]).astype(int)
        np.testing.assert_allclose(vox[:, :3], idx, atol=1e-3)
        np.testing.assert_array_equal(data[idx[:, 0], idx[:, 1], idx[:, 2]], hu[r, c])
    # the first pixel's position (LPS -> RAS) is a corner voxel of the NIfTI
    origin = first * np.array([-1, -1, 1])
    corners = np.array([[i, j, k, 1] for i in (0, 511) for j in (0, 511) for k in (0, 19)], float)
    assert np.any(np.all(np.isclose((corners @ img.affine.T)[:, :3], origin, atol=1e-3), axis=1))
    assert img.header["descrip"].item() == b""  # dcm2niix writes the acquisition time here


def test_ingest_deidentifies_pairs_the_mask_and_writes_the_manifest(
    phi_series: Path, series: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ras, shape, _ = _dicom_grid(series)
    # A box ROI drawn on the DICOM grid and stored in DICOM order (not dcm2niix's): same physical grid.
    roi = np.zeros(shape, np.uint8)
    roi[240:270, 200:230, 6:12] = 1
    nib.save(nib.Nifti1Image(roi, ras), str(tmp_path / "roi.nii.gz"))
    nib.save(nib.Nifti1Image(roi[:, :, :10], ras), str(tmp_path / "roi_wrong.nii.gz"))
    cases = _write_cases(
        tmp_path / "cases.csv",
        [
            {
                "patient_id": "S010",
                "dicom": phi_series.name,
                "mask": "roi.nii.gz",
                "label": "1",
                "radiologist_score": "7",
            },
            {
                "patient_id": "HOSP-553311",
                "dicom": phi_series.name,
                "mask": "roi.nii.gz",
                "label": "1",
                "radiologist_score": "7",
            },
            {
                "patient_id": "S011",
                "dicom": phi_series.name,
                "mask": "roi_wrong.nii.gz",
                "label": "0",
                "radiologist_score": "2",
            },
        ],
    )
    shutil.copytree(phi_series, tmp_path / phi_series.name)
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.csv").write_text(
        "patient_id,label,image,mask,radiologist_score,age,sex\nOLD1,0,images/x.nii.gz,masks/x.nii.gz,2,50,F\n"
    )
    assert main(["ingest", str(site), "--cases", str(cases)]) == 1
    err = capsys.readouterr().err
    assert "patient_id contains the DICOM patient id or name" in err
    assert (
        "patient S011" in err
        and "roi_wrong" not in err.split("S011", 1)[0]
        and "shape" in err.split("S011", 1)[1]
    )

    rows = list(csv.DictReader((site / "manifest.csv").open()))
    assert [r["patient_id"] for r in rows] == ["OLD1", "S010"]  # existing rows kept, the new one added
    s010 = rows[1]
    fields = (s010["label"], s010["radiologist_score"], s010["age"], s010["sex"])
    assert fields == ("1", "7", "62", "M")  # age (born 1960-04-12, scanned 2022-12-08) and sex from DICOM
    report = validate_site(site)
    assert "S010" in report.valid_ids, [str(p) for p in report.problems if p.patient_id == "S010"]
    image, _ = load_nifti(site / "images" / "S010.nii.gz")
    mask, _ = load_nifti(site / "masks" / "S010.nii.gz")
    assert mask.sum() == roi.sum() and image[mask > 0].mean() > -200  # the ROI landed inside the body
    assert not (site / "masks" / "S011.nii.gz").exists()

    # Nothing identifying anywhere: names of files and folders, sidecars, NIfTI headers, manifest.
    secrets = [v.lower() for v in (*PHI.values(), "johnathan", "doe_j", "1960")]
    for path in site.rglob("*"):
        assert not any(s in path.name.lower() for s in secrets), path
        if path.is_file():
            blob = path.read_bytes()
            if path.name.endswith(".gz"):
                blob = gzip.decompress(blob)[:352]  # the NIfTI-1 header
            text = blob.decode("latin-1").lower()
            assert not any(s in text for s in secrets), (path, [s for s in secrets if s in text])


def test_dicom_seg_frame_is_placed_on_the_image_grid(tmp_path: Path) -> None:
    """pydicom's real liver SEG frame (512x512, 0.81 mm) on a grid built from its plane geometry.

    ``liver_1frame.dcm`` is the first frame of a 3-frame SEG whose per-frame list was left at 3
    entries: as shipped it is refused; with the list trimmed to its frame it is read.
    """
    shipped = Path(get_testdata_file("liver_1frame.dcm"))
    ds = pydicom.dcmread(shipped)
    with pytest.raises(IngestError, match=r"1 frame.* but 3 per-frame entries: a damaged SEG"):
        seg_to_mask(shipped, np.eye(4), (512, 512, 3), "", "patient T1")
    ds.PerFrameFunctionalGroupsSequence = ds.PerFrameFunctionalGroupsSequence[:1]
    path = tmp_path / "liver_1frame.dcm"
    ds.save_as(path)
    item = ds.PerFrameFunctionalGroupsSequence[0]
    ipp = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
    dr, dc = (float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing)
    # RAS grid of 3 slices 1 mm apart with the frame on the middle one (voxel = column, row, slice)
    affine = np.array([[-dc, 0, 0, -ipp[0]], [0, -dr, 0, -ipp[1]], [0, 0, 1.0, ipp[2] - 1.0], [0, 0, 0, 1]])
    mask = seg_to_mask(path, affine, (512, 512, 3), "", "patient T1")
    frame = ds.pixel_array
    assert mask[:, :, 1].sum() == frame.sum() == 36233 and not mask[:, :, [0, 2]].any()
    np.testing.assert_array_equal(mask[:, :, 1], frame.T)
    assert seg_to_mask(path, affine, (512, 512, 3), "Liver", "patient T1").sum() == 36233
    half = affine.copy()
    half[0, 3] += dc / 2  # a grid half a voxel away: the SEG was drawn on another series
    with pytest.raises(
        IngestError, match=r"patient T1: .*liver_1frame\.dcm: SEG frame 1 is not on the image grid"
    ):
        seg_to_mask(path, half, (512, 512, 3), "", "patient T1")
    with pytest.raises(IngestError, match="outside the image"):
        seg_to_mask(path, affine, (512, 512, 1), "", "patient T1")
    with pytest.raises(IngestError, match=r"segments: \{1: 'Liver'\}"):
        seg_to_mask(path, affine, (512, 512, 3), "Tumour", "patient T1")


def _nifti_with_extension(path: Path, text: bytes) -> Path:
    """A small CT-like NIfTI whose header carries a comment extension (as dcm2niix can write)."""
    img = nib.Nifti1Image(np.full((8, 8, 4), 40, np.int16), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", text))
    nib.save(img, str(path))
    return path


def test_ingest_clears_header_extensions_and_scans_whole_files(tmp_path: Path) -> None:
    """A patient's name in a NIfTI extension (past the 348-byte header) is found, and never written."""
    from client.dicom import write_image
    from client.ingest import _leaks

    secrets = ["Doe^Johnathan", "Johnathan", "HOSP-553311"]
    src = _nifti_with_extension(tmp_path / "dcm2niix.nii", b"PatientName=Doe^Johnathan ID=HOSP-553311")
    assert nib.load(str(src)).header.extensions  # the extension is there, after byte 348
    assert b"Johnathan" not in src.read_bytes()[:348]
    assert sorted(_leaks([src], secrets)) == sorted(f"{s!r} in dcm2niix.nii" for s in secrets)

    out = tmp_path / "P001.nii.gz"
    write_image(src, out)
    written = nib.load(str(out))
    assert not written.header.extensions  # type: ignore[attr-defined]
    assert _leaks([out], secrets) == []
    assert b"Johnathan" not in gzip.decompress(out.read_bytes())

    # a long identifier hidden in the voxel bytes, or a name in the gzip header, is found as well
    vox = tmp_path / "P002.nii.gz"
    data = np.zeros(64, np.uint8)
    data[10:21] = np.frombuffer(b"HOSP-553311", np.uint8)
    nib.save(
        nib.Nifti1Image(data.reshape((4, 4, 4), order="F"), np.eye(4)), str(vox)
    )  # NIfTI is Fortran order
    assert _leaks([vox], secrets) == ["'HOSP-553311' in P002.nii.gz"]
    named = tmp_path / "P003.nii.gz"
    with gzip.GzipFile(filename="Doe^Johnathan.nii", mode="wb", fileobj=named.open("wb")) as gz:
        gz.write(gzip.decompress(out.read_bytes()))
    assert "'Johnathan' in P003.nii.gz" in _leaks([named], secrets)
