"""Model bundle and prediction: a tiny federated run -> bundle -> predict the real pelvis CT.

The run is the real plan against the real ClientApp in process (tests/inprocess.py), two folds
of the tiny preset, one round; the bundle is written by `flower-server bundle` and read by
`flower-client predict`, with Grad-CAM, on CPU.
"""

from __future__ import annotations

import csv
import io
import json
import re
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from client.cli import main as client_main
from client.heatmap import cube_to_grid
from client.predict import PatientInput, PredictionError, Predictor
from common.bundle import FORMAT_VERSION, MANIFEST_NAME, SIGNATURE_NAME, BundleError, read_bundle
from common.config import SiteConfig, to_dict, with_sites
from common.configfile import load_config
from common.signing import create_signing_key, load_private_key, load_public_key, sign
from server.bundle import export_bundle
from server.cli import main as server_main
from server.runner import PlanRunner

from .inprocess import InProcessGrid
from .onecase import SACRUM, engine_fold_probabilities, one_patient_site, sacrum_roi

SITES = ("centre1", "centre2", "centre3")
# The sacrum box of tests/test_transforms.py (pelvis_ct.nii.gz: 122x101x112, 3 mm, RAS).
CPU_SECONDS_PER_PATIENT = (
    30.0  # the README's bound for the tiny models (CPU time: independent of the machine's load)
)


@pytest.fixture(scope="module")
def run_dir(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run: both networks, two folds, one round, ensembles fitted."""
    from flwr.supercore.task_identity import TaskIdentity

    cfg = with_sites(load_config("tiny", {"train": {"rounds": 1}}), tuple(SiteConfig(name=s) for s in SITES))
    out = tmp_path_factory.mktemp("bundle-run")
    run = out / "run"
    run.mkdir()
    # as `flower-simulation run` does: the server reads its config from the run folder
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    with pytest.MonkeyPatch.context() as mp:  # what flwr-serverapp sets before a ServerApp runs
        for attr in ("_run_id", "_node_id", "_task_id"):
            mp.setattr(TaskIdentity, attr, 1)
        grid = InProcessGrid({s: tiny_cohort / s for s in SITES}, out / "sites")
        PlanRunner(grid, cfg, run, "bundle-run").run(expected_sites=3, wait_s=1)
    return run


@pytest.fixture(scope="module")
def bundle_path(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "model.zip"
    key = out.parent / "signing.key"  # created by the first export, with signing.key.pub
    assert server_main(["bundle", str(run_dir), "--out", str(out), "--signing-key", str(key)]) == 0
    assert (key.stat().st_mode & 0o777) == 0o600
    return out


@pytest.fixture(scope="module")
def trusted(bundle_path: Path) -> Ed25519PublicKey:
    """The coordinating site's public key as a hospital holds it."""
    return load_public_key(bundle_path.parent / "signing.key.pub")


def _pub(bundle_path: Path) -> str:
    return str(bundle_path.parent / "signing.key.pub")


@pytest.fixture(scope="module")
def pelvis(shared_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The real pelvis CT and a box ROI over its sacrum."""
    image = shared_ct / "pelvis_ct.nii.gz"
    path = sacrum_roi(image, tmp_path_factory.mktemp("pelvis") / "sacrum_roi.nii.gz")
    return image, path


def _rewrite(
    src: Path,
    dst: Path,
    manifest_edit: dict[str, object] | None = None,
    corrupt: str = "",
    resign: bool = True,
    drop: str = "",
) -> Path:
    """Copy a bundle, changing manifest fields or flipping bytes of one member file.

    ``resign``: sign the edited manifest with the coordinating site's key (a
    genuine bundle of another version); otherwise the old signature stays.
    """
    key = load_private_key(src.parent / "signing.key")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        manifest = zin.read(MANIFEST_NAME)
        if manifest_edit:
            manifest = json.dumps({**json.loads(manifest), **manifest_edit}).encode()
        for name in zin.namelist():
            if name == drop:
                continue
            data = zin.read(name)
            if name == MANIFEST_NAME:
                data = manifest
            if name == SIGNATURE_NAME and resign:
                data = sign(manifest, key)
            if name == corrupt:
                arrays = dict(np.load(io.BytesIO(data)))
                key = sorted(arrays)[0]
                arrays[key] = arrays[key] + 1.0
                buf = io.BytesIO()
                np.savez(buf, **arrays)
                data = buf.getvalue()
            zout.writestr(name, data)
    return dst


# ---------------------------------------------------------------- bundle


def test_bundle_holds_the_selected_fold_models_and_fitted_ensembles(
    run_dir: Path, bundle_path: Path, trusted: Ed25519PublicKey
) -> None:
    bundle = read_bundle(bundle_path, trusted)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert bundle.kinds == ("densenet3d", "densenet2d")
    for kind in bundle.kinds:
        folds = bundle.folds[kind]
        assert [f.fold for f in folds] == [0, 1]
        assert [f.round for f in folds] == [summary["selection"][kind][str(k)]["round"] for k in (0, 1)]
    fitted = {name: m["weights"] for name, m in summary["models"].items() if "weights" in m}
    assert {e.name: dict(zip(e.members, e.weights, strict=True)) for e in bundle.ensembles} == fitted
    assert bundle.score_mapping == load_config("tiny").evaluation.score_mapping
    assert bundle.config.sites == ()  # the training sites' folders do not travel
    assert bundle.manifest["metrics"]["densenet3d"]["internal"]["pooled"]["n"] == 60
    assert bundle.manifest["source"]["sites"]["centre1"]["patients"] == 20


def test_bundle_of_another_version_or_altered_is_refused(
    bundle_path: Path, trusted: Ed25519PublicKey, tmp_path: Path
) -> None:
    newer = _rewrite(
        bundle_path,
        tmp_path / "newer.zip",
        {"format_version": FORMAT_VERSION + 1, "project_version": "9.0.0"},
    )
    with pytest.raises(
        BundleError, match=r"incompatible bundle version: format 2 \(written by sacral-fl 9.0.0\).*upgrade"
    ):
        read_bundle(newer, trusted)
    older = _rewrite(bundle_path, tmp_path / "older.zip", {"preprocessing_version": 0})
    with pytest.raises(
        BundleError, match="incompatible bundle version: its models were trained on preprocessing version 0"
    ):
        read_bundle(older, trusted)
    altered = _rewrite(bundle_path, tmp_path / "altered.zip", corrupt="models/densenet3d_fold1.npz")
    with pytest.raises(BundleError, match=r"checksum mismatch for models/densenet3d_fold1\.npz"):
        read_bundle(altered, trusted)
    with pytest.raises(BundleError, match="not a model bundle"):
        read_bundle(Path(__file__), trusted)
    config = json.loads(zipfile.ZipFile(bundle_path).read(MANIFEST_NAME))["config"]
    config["models"]["densenet3d"]["arch"] = "densenet121"  # weights of the small DenseNet, config of another
    relabelled = _rewrite(bundle_path, tmp_path / "relabelled.zip", {"config": config})
    with pytest.raises(BundleError, match=r"models/densenet3d_fold0\.npz: the weights do not fit the model"):
        Predictor(read_bundle(relabelled, trusted), heatmap=False)


def test_an_unsigned_tampered_or_foreign_bundle_is_refused(
    bundle_path: Path, trusted: Ed25519PublicKey, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unsigned = _rewrite(bundle_path, tmp_path / "unsigned.zip", drop=SIGNATURE_NAME)
    with pytest.raises(BundleError, match="unsigned bundle refused"):
        read_bundle(unsigned, trusted)
    # the checksums live in the signed manifest: editing them (or anything else) breaks the signature
    files = json.loads(zipfile.ZipFile(bundle_path).read(MANIFEST_NAME))["files"]
    forged = _rewrite(
        bundle_path,
        tmp_path / "forged.zip",
        {"files": {**files, "models/densenet3d_fold1.npz": "0" * 64}},
        resign=False,
    )
    with pytest.raises(BundleError, match="signature check failed"):
        read_bundle(forged, trusted)
    _, other_pub = create_signing_key(tmp_path / "other.key")
    with pytest.raises(BundleError, match="not signed by the trusted key"):
        read_bundle(bundle_path, load_public_key(other_pub))
    rc = client_main(
        [
            "predict",
            "--bundle",
            str(unsigned),
            "--trusted-key",
            _pub(bundle_path),
            "--image",
            "x",
            "--mask",
            "y",
        ]
    )
    assert rc == 2 and "unsigned bundle refused" in capsys.readouterr().err
    with pytest.raises(Exception, match="exists"):
        create_signing_key(tmp_path / "other.key")  # never overwritten


def test_a_member_that_would_inflate_past_the_cap_is_refused_unread(
    bundle_path: Path, trusted: Ed25519PublicKey, tmp_path: Path
) -> None:
    """A zip-bomb-like member: 8 MB of zeros stored in a few kB; refused from its declared size."""
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bundle_path) as zin, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for name in zin.namelist():
            zout.writestr(name, zin.read(name))
        zout.writestr("models/zeros.npz", bytes(8 << 20))
    assert bomb.stat().st_size < bundle_path.stat().st_size + 100_000
    with pytest.raises(
        BundleError, match=r"models/zeros\.npz would inflate to 8388608 bytes .*refused unread"
    ):
        read_bundle(bomb, trusted, max_member_bytes=4 << 20)
    # the same cap applies to the arrays inside a (signed) .npz member
    biggest = max(zipfile.ZipFile(bundle_path).infolist(), key=lambda i: i.file_size)
    with pytest.raises(BundleError, match="cap"):
        read_bundle(bundle_path, trusted, max_member_bytes=biggest.file_size - 1)


def test_predict_refuses_an_incompatible_bundle_with_a_clear_message(
    bundle_path: Path, pelvis: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    newer = _rewrite(bundle_path, tmp_path / "newer.zip", {"format_version": FORMAT_VERSION + 1})
    rc = client_main(
        [
            "predict",
            "--bundle",
            str(newer),
            "--trusted-key",
            _pub(bundle_path),
            "--image",
            str(pelvis[0]),
            "--mask",
            str(pelvis[1]),
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 2
    assert f"{newer}: incompatible bundle version" in capsys.readouterr().err


def test_export_refuses_an_unfinished_run(run_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    with pytest.raises(BundleError, match=r"summary\.json: not found: the run has not finished"):
        export_bundle(partial, tmp_path / "b.zip", tmp_path / "signing.key")


# ---------------------------------------------------------------- prediction


def test_predict_one_patient_on_the_real_pelvis_ct(
    bundle_path: Path, pelvis: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, mask = pelvis
    out = tmp_path / "out"
    args = [
        "predict",
        "--bundle",
        str(bundle_path),
        "--trusted-key",
        _pub(bundle_path),
        "--image",
        str(image),
        "--mask",
        str(mask),
    ]
    rc = client_main(
        [*args, "--radiologist-score", "7", "--patient-id", "P1", "--out", str(out), "--threads", "2"]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    probs = {
        m.group(1).strip(): float(m.group(2))
        for m in re.finditer(r"^  (\S[\w ]+?)\s+([01]\.\d{3})   \(", printed, re.M)
    }
    assert {
        "3D DenseNet",
        "2D DenseNet",
        "radiologist score 7",
        "ensemble_2d3d",
        "ensemble_3d_radiologist",
        "ensemble_2d3d_radiologist",
    } <= set(probs)
    assert all(0.0 <= p <= 1.0 for p in probs.values())
    assert probs["radiologist score 7"] == 0.75
    used = re.search(r"^  (ensemble_\w+) .*<- used$", printed, re.M)
    assert used, printed
    final = re.search(r"probability of malignancy: ([01]\.\d{3}) from (\w+)", printed)
    assert final and final.group(2) == used.group(1) and float(final.group(1)) == probs[used.group(1)]
    seconds = re.search(r"time: ([\d.]+) s on CPU \(([\d.]+) s of CPU time, 2 threads\)", printed)
    assert seconds and float(seconds.group(2)) < CPU_SECONDS_PER_PATIENT, printed

    ct = nib.load(str(image))
    heat = nib.load(str(out / "P1_gradcam.nii.gz"))
    assert heat.shape == ct.shape and np.allclose(heat.affine, ct.affine)
    h = np.asarray(heat.dataobj)
    assert h.min() >= 0.0 and h.max() <= 1.0 and h[SACRUM].max() > 0.0
    assert h[:20].max() == 0.0  # far outside the 3D model's 128 mm cube: no attention
    assert (out / "P1_gradcam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((out / "P1_prediction.json").read_text())
    assert record["probability"] == pytest.approx(float(final.group(1)), abs=5e-4)
    assert len(record["fold_probabilities"]["densenet3d"]) == 2


def test_predictions_equal_the_training_pipelines(
    bundle_path: Path, trusted: Ed25519PublicKey, pelvis: tuple[Path, Path], tmp_path: Path
) -> None:
    """Same preprocessing and engine as the federation: the site path gives the same probabilities."""
    image, mask = pelvis
    bundle = read_bundle(bundle_path, trusted)
    pred = Predictor(bundle, heatmap=False).predict(PatientInput("P1", image, mask), tmp_path)
    arrays = one_patient_site(bundle, image, mask, tmp_path)
    for kind, expected in engine_fold_probabilities(bundle, arrays).items():
        assert pred.fold_probabilities[kind] == pytest.approx(expected, abs=1e-6)
    assert pred.answered_by == "ensemble_2d3d"  # no radiologist score: only the 2D+3D ensemble is usable


def test_batch_over_a_site_folder_continues_past_a_bad_case(
    bundle_path: Path, pelvis: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, mask = pelvis
    site = tmp_path / "site"
    site.mkdir()
    small = np.zeros((20, 20, 20), np.uint8)
    small[5:10, 5:10, 5:10] = 1
    nib.save(nib.Nifti1Image(small, nib.load(str(image)).affine), str(site / "small.nii.gz"))
    (site / "manifest.csv").write_text(
        "patient_id,label,image,mask,radiologist_score\n"
        f"good,1,{image},{mask},3\n"
        f"bad,0,{image},small.nii.gz,8\n"
        f"midpoint,0,{image},{mask},5\n"
    )
    out = tmp_path / "out"
    assert (
        client_main(
            [
                "predict",
                "--bundle",
                str(bundle_path),
                "--trusted-key",
                _pub(bundle_path),
                "--site",
                str(site),
                "--out",
                str(out),
                "--no-heatmap",
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert "2 patient(s)" not in captured.out and "1 of 3 patients predicted" in captured.out
    rows = {r["patient_id"]: r for r in csv.DictReader((out / "predictions.csv").open())}
    assert 0.0 <= float(rows["good"]["probability"]) <= 1.0 and rows["good"]["answered_by"].startswith(
        "ensemble"
    )
    assert (
        "patient bad" in rows["bad"]["error"]
        and "small.nii.gz" in rows["bad"]["error"]
        and "shape" in rows["bad"]["error"]
    )
    assert "patient midpoint" in rows["midpoint"]["error"] and "midpoint" in rows["midpoint"]["error"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("shifted", r"mask_outside_image|lies outside the image"),
        ("tilted", r"mask affine differs from the image's"),
        ("empty", r"mask has no voxel > 0\.5"),
    ],
)
def test_bad_inputs_are_refused_naming_file_and_patient(
    bundle_path: Path,
    trusted: Ed25519PublicKey,
    pelvis: tuple[Path, Path],
    tmp_path: Path,
    case: str,
    expected: str,
) -> None:
    image, _ = pelvis
    ct = nib.load(str(image))
    data = np.zeros(ct.shape, np.uint8)
    affine = ct.affine.copy()
    if case != "empty":
        data[SACRUM] = 1
    if case == "shifted":
        affine[:3, 3] += 1000.0  # the same grid one metre away: drawn on another scan
    if case == "tilted":
        affine[:3, :3] = affine[:3, :3] @ np.array([[1, 0, 0], [0, 0.995, -0.0998], [0, 0.0998, 0.995]])
    mask = tmp_path / f"{case}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(mask))
    predictor = Predictor(read_bundle(bundle_path, trusted), heatmap=False)
    with pytest.raises(PredictionError, match=expected) as err:
        predictor.predict(PatientInput("P7", image, mask), tmp_path)
    assert f"{mask}" in str(err.value) and "patient P7" in str(err.value)


def test_grad_cam_lands_on_the_world_positions_of_the_cube() -> None:
    """A map that is a known function of world position comes back as that function on an LPS, anisotropic grid."""
    size = 16
    lo, hi = np.array([-40.0, 10.0, -30.0]), np.array([24.0, 74.0, 34.0])  # 4 mm cube voxels
    step = (hi - lo) / size
    centres = [lo[a] + (np.arange(size) + 0.5) * step[a] for a in range(3)]
    x, _, z = np.meshgrid(*centres, indexing="ij")
    cam = ((x - lo[0]) / 64.0 + 2.0 * (z - lo[2]) / 64.0) / 3.0  # linear in world x and z, in [0, 1]
    # LPS storage order, anisotropic voxels
    affine = np.array([[-1.5, 0, 0, 60.0], [0, -1.5, 0, 120.0], [0, 0, 2.5, -60.0], [0, 0, 0, 1]])
    shape = (90, 100, 60)
    heat = cube_to_grid(cam.astype(np.float32), np.stack([lo, hi]), affine, shape)
    idx = np.argwhere(heat > 0)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    inside = np.all((world > lo + step) & (world < hi - step), axis=1)  # away from the border's fade to 0
    expected = ((world[inside, 0] - lo[0]) / 64.0 + 2.0 * (world[inside, 2] - lo[2]) / 64.0) / 3.0
    np.testing.assert_allclose(heat[tuple(idx[inside].T)], expected, atol=1e-5)
    far = np.all((world < lo - step) | (world > hi + step), axis=1)
    assert not far.any()  # nothing is painted outside the cube
    assert inside.sum() > 1000


def test_predict_device_choice(
    run_dir: Path,
    bundle_path: Path,
    trusted: Ed25519PublicKey,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Sites report where they train (summary.json); ``--device``: a GPU that is not there is refused."""
    import torch

    devices = json.loads((run_dir / "summary.json").read_text())["devices"]
    here = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert sorted(devices) == list(SITES) and all(d["device"] == here for d in devices.values())
    bundle = read_bundle(bundle_path, trusted)
    cpu = Predictor(bundle, heatmap=False, device="cpu")
    assert (cpu.runtime.device, cpu.runtime.amp, cpu.cfg.train.device) == ("cpu", "off", "cpu")
    assert all(next(m.parameters()).device.type == "cpu" for ms in cpu.models.values() for m in ms)
    if torch.cuda.is_available():
        return
    assert Predictor(bundle, heatmap=False, device="auto").runtime.device == "cpu"
    args = ["predict", "--bundle", str(bundle_path), "--image", "x.nii.gz", "--mask", "m.nii.gz"]
    args += ["--trusted-key", _pub(bundle_path)]
    assert client_main([*args, "--out", str(tmp_path), "--device", "cuda"]) == 2
    assert re.search(r"error: --device: cuda requested but no CUDA device", capsys.readouterr().err)


# ---------------------------------------------------------------- operating thresholds


def test_bundle_carries_the_run_thresholds_and_refuses_hostile_ones(
    run_dir: Path, bundle_path: Path, trusted: Ed25519PublicKey, tmp_path: Path
) -> None:
    bundle = read_bundle(bundle_path, trusted)
    summary = json.loads((run_dir / "summary.json").read_text())
    chosen = {k: v["threshold"] for k, v in summary["thresholds"].items()}
    assert chosen and bundle.manifest["thresholds"] == chosen
    for score, t in chosen.items():
        assert bundle.threshold_for(score) == t
    assert bundle.threshold_for("no-such-score") == bundle.threshold == 0.5
    for bad in (
        {"densenet3d": 1.5},
        {"densenet3d": "0.3"},
        {"densenet3d": True},
        ["densenet3d", 0.3],
        {"x": float("nan")},
    ):
        with pytest.raises(BundleError, match="threshold"):
            read_bundle(_rewrite(bundle_path, tmp_path / "bad.zip", {"thresholds": bad}), trusted)


@pytest.mark.parametrize(
    ("change", "summary", "message"),
    [
        ({}, {"plan": "loco"}, "a leave-one-centre-out run holds one model set per held-out site"),
        ({"federation": {"strategy": "fedbn"}}, {"plan": "federated"}, "trained with FedBN"),
        ({}, {"plan": "federated", "config_digest": "0" * 16}, "the folder mixes two runs"),
        ({}, {"plan": "federated"}, "densenet3d fold 0 has no selected round"),
        (
            {"models": {"densenet3d": {"enabled": False}, "densenet2d": {"enabled": False}}},
            {"plan": "federated"},
            "no network was trained in this run",
        ),
    ],
)
def test_export_refuses_a_run_folder_without_one_complete_model_set(
    tmp_path: Path, change: dict[str, object], summary: dict[str, object], message: str
) -> None:
    """Each refusal names the run folder and the reason, and writes no bundle."""
    cfg = load_config("tiny", change)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run / "summary.json").write_text(json.dumps({"config_digest": cfg.digest(), **summary}))
    out = tmp_path / "model.bundle"
    with pytest.raises(BundleError, match=re.escape(message)) as err:
        export_bundle(run, out, tmp_path / "signing.pem")
    assert str(run) in str(err.value) and not out.exists()
