"""``flower-client predict``: the federation's answer for new patients, at any hospital (CPU or GPU).

For each patient (one CT and its tumour ROI mask, optionally the
radiologist's 9-point score):

1. the image/mask pair is checked with the site validation's file checks
   (``common.filecheck.validate_image_mask``: readable, HU, same grid, ROI
   present and inside the image), so a bad input is refused with a message
   naming the file and the patient;
2. the model inputs come from the one preprocessing path
   (``common.dataset.model_inputs``), stored as float16 like the training
   cache, and are scored by ``common.engine.predict`` (the 2D slice rule
   included) with every fold model of the bundle: a network's probability is
   the mean over its fold models, as for the study's external centres;
3. the ensemble with the best pooled validation AUC among those whose
   members are available (the radiologist only with a score) gives the
   answer, unless one is named; without any, the 3D model answers;
4. Grad-CAM of the 3D fold models (mean) is written as a NIfTI overlay on
   the input's own voxel grid and affine, and a PNG of key slices.

Nothing leaves the machine; outputs go to ``--out``.  The bundle is a
research model: the printed probability supports, never replaces, the
radiologist's reading.  The command around :class:`Predictor` (patient lists,
printing, the JSON and CSV outputs) is ``client.predict_cli``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from common.bundle import BundleError, EnsembleSpec, ModelBundle
from common.config import ExperimentConfig
from common.dataset import ModelInputs, model_inputs
from common.device import Offer, Runtime, resolve
from common.engine import predict as engine_predict
from common.filecheck import validate_image_mask
from common.foldcalibration import apply_platt
from common.models import ModelKind
from common.sitearrays import SiteArrays
from common.sitedata import SiteDataError, load_volume, score_to_probability

from .heatmap import CubeGradCAM, cube_to_grid, default_cam_layer, key_slices_png, save_overlay

log = logging.getLogger(__name__)



class PredictionError(ValueError):
    """One patient cannot be predicted; the message names the file(s), the patient and the problem."""


@dataclass(frozen=True)
class PatientInput:
    """One patient to predict: CT, ROI mask, optional radiologist score (1-9, not 5)."""

    patient_id: str
    image: Path
    mask: Path
    radiologist_score: int | None = None


@dataclass(frozen=True)
class Prediction:
    """The answer for one patient, and what produced it."""

    patient_id: str
    probability: float
    answered_by: str  # an ensemble name, or the single network that answered
    probabilities: dict[str, float]  # every network, the radiologist and every usable ensemble
    fold_probabilities: dict[str, tuple[float, ...]]
    radiologist_score: int | None
    heatmap: Path | None
    png: Path | None
    cam_layer: str | None
    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of all threads: what the patient costs, whatever else the machine runs
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(
            heatmap=_str(self.heatmap),
            png=_str(self.png),
            fold_probabilities={k: list(v) for k, v in self.fold_probabilities.items()},
        )
        return d


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


def safe_name(patient_id: str) -> str:
    """A patient id usable in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", patient_id) or "patient"


def _one_patient(patient_id: str, inputs: ModelInputs) -> SiteArrays:
    """The patient as a one-row ``SiteArrays`` (float16, as the training cache stores inputs); label unknown (-1)."""
    return SiteArrays(
        site="predict",
        patient_ids=(patient_id,),
        labels=np.asarray([-1], dtype=np.int64),
        radiologist_scores=np.asarray([0], dtype=np.int64),
        vol3d=inputs.vol3d[None].astype(np.float16),
        slices2d=inputs.slices2d[None].astype(np.float16),
        slice_indices=inputs.slice_indices[None],
        features=np.zeros((1, 0), dtype=np.float64),
        feature_names=(),
        ages=np.asarray([math.nan]),
        sexes=("",),
        sites=("predict",),
    )


class Predictor:
    """A loaded bundle's fold models, ready to predict patient after patient."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        ensemble: str | None = None,
        heatmap: bool = True,
        cam_layer: str | None = None,
        device: str = "auto",
    ) -> None:
        self.bundle = bundle
        cfg = bundle.config
        # Where this machine predicts (``--device``), not where the sites trained; AMP as the bundle
        # allows (autocast on a GPU unless it trained with amp: off); raises ConfigError naming --device.
        amp = "off" if cfg.train.amp == "off" else "auto"
        self.runtime: Runtime = resolve(device, amp, "workers", offer=Offer.probe(), key="--device")
        # One patient at a time: no DataLoader workers, whatever the training config said.
        self.cfg: ExperimentConfig = dataclasses.replace(
            cfg,
            train=dataclasses.replace(
                cfg.train, num_workers=0, device=self.runtime.device, amp=self.runtime.amp
            ),
            dp=dataclasses.replace(cfg.dp, enabled=False),  # prediction spends no privacy budget
        )
        dev = self.runtime.torch_device
        self.models = {kind: [m.to(dev) for m in bundle.build(kind)] for kind in bundle.kinds}
        names = {e.name for e in bundle.ensembles}
        if ensemble is not None and ensemble not in names:
            raise BundleError(
                f"{bundle.path}: no ensemble {ensemble!r} in this bundle (it has {sorted(names)})"
            )
        self.requested = ensemble
        self.cam: CubeGradCAM | None = None
        if heatmap and "densenet3d" in self.models:
            models3d = self.models["densenet3d"]
            layer = cam_layer or default_cam_layer(models3d[0], cfg.preprocess.d3.size)
            self.cam = CubeGradCAM(models3d, layer)

    def choose_ensemble(self, has_score: bool) -> EnsembleSpec | None:
        """The named ensemble, else the best validation AUC among the usable ones (first listed on ties)."""
        available = set(self.models) | ({"radiologist"} if has_score else set())
        usable = [e for e in self.bundle.ensembles if set(e.members) <= available]
        if self.requested is not None:
            spec = next(e for e in self.bundle.ensembles if e.name == self.requested)
            if spec not in usable:
                missing = sorted(set(spec.members) - available)
                raise PredictionError(
                    f"ensemble {spec.name} needs {missing}: give --radiologist-score or choose another"
                )
            return spec
        if not usable:
            return None
        return max(usable, key=lambda e: -1.0 if e.val_auc is None else float(e.val_auc))

    def predict(self, patient: PatientInput, out_dir: Path) -> Prediction:
        """Predict one patient, writing its heatmap files under ``out_dir``; raises ``PredictionError``."""
        t0, c0 = time.perf_counter(), time.process_time()
        pid = patient.patient_id
        problems = validate_image_mask(pid, patient.image, patient.mask)
        errors = [str(p) for p in problems if p.severity == "error"]
        if errors:
            raise PredictionError("\n".join(errors))
        warnings = tuple(str(p) for p in problems if p.severity == "warning")
        scores: dict[str, float] = {}
        if patient.radiologist_score is not None:
            try:
                scores["radiologist"] = score_to_probability(
                    patient.radiologist_score, self.bundle.score_mapping
                )
            except SiteDataError as exc:
                raise PredictionError(f"patient {pid}: {exc}") from exc
        try:
            volume = load_volume(pid, patient.image, patient.mask)
            inputs = model_inputs(volume, self.cfg.preprocess)
        except (SiteDataError, ValueError, RuntimeError) as exc:
            cause = exc.__cause__ or exc  # MONAI wraps transform errors in RuntimeError
            raise PredictionError(f"{patient.image}: patient {pid}: preprocessing failed: {cause}") from exc
        if not (np.isfinite(inputs.vol3d).all() and np.isfinite(inputs.slices2d).all()):
            raise PredictionError(f"{patient.image}: patient {pid}: preprocessing gave non-finite values")
        arrays = _one_patient(pid, inputs)
        folds: dict[str, tuple[float, ...]] = {}
        for kind, models in self.models.items():
            k: ModelKind = kind
            specs = self.bundle.folds[kind]  # calibrated per fold; guarded folds left out, as in the run
            folds[kind] = tuple(
                float(apply_platt(engine_predict(m, arrays, [0], k, self.cfg), fm.platt)[0])
                for m, fm in zip(models, specs, strict=True)
            )
            kept = [p for p, fm in zip(folds[kind], specs, strict=True) if not fm.guard] or list(folds[kind])
            scores[kind] = float(np.mean(kept))
        for spec in self.bundle.ensembles:
            if set(spec.members) <= set(scores):
                scores[spec.name] = spec.apply(scores)
        chosen = self.choose_ensemble(patient.radiologist_score is not None)
        answered_by = (
            chosen.name if chosen else ("densenet3d" if "densenet3d" in self.models else "densenet2d")
        )
        heat_path = png_path = None
        if self.cam is not None:
            heat_path, png_path = self._heatmap(
                patient,
                volume.image,
                volume.mask,
                volume.affine,
                inputs,
                arrays,
                scores[answered_by],
                answered_by,
                out_dir,
            )
        return Prediction(
            patient_id=pid,
            probability=scores[answered_by],
            answered_by=answered_by,
            probabilities=scores,
            fold_probabilities=folds,
            radiologist_score=patient.radiologist_score,
            heatmap=heat_path,
            png=png_path,
            cam_layer=self.cam.layer if self.cam else None,
            seconds=time.perf_counter() - t0,
            cpu_seconds=time.process_time() - c0,
            warnings=warnings,
        )

    def _heatmap(
        self,
        patient: PatientInput,
        image_ras: np.ndarray,
        mask_ras: np.ndarray,
        affine_ras: np.ndarray,
        inputs: ModelInputs,
        arrays: SiteArrays,
        probability: float,
        answered_by: str,
        out_dir: Path,
    ) -> tuple[Path, Path]:
        assert self.cam is not None
        cube_cam = self.cam(arrays.vol3d[0].astype(np.float32))  # exactly the input the model scored
        original = nib.load(str(patient.image))
        assert isinstance(original, nib.Nifti1Image | nib.Nifti2Image)
        heat = cube_to_grid(cube_cam, inputs.box_mm, original.affine, original.shape)
        name = safe_name(patient.patient_id)
        nii = save_overlay(heat, original, out_dir / f"{name}_gradcam.nii.gz")
        d3 = self.cfg.preprocess.d3
        title = f"patient {patient.patient_id}: P(malignant) {probability:.3f} ({answered_by}); Grad-CAM of the 3D model ({self.cam.layer})"
        png = key_slices_png(
            image_ras,
            mask_ras,
            cube_to_grid(cube_cam, inputs.box_mm, affine_ras, image_ras.shape),
            np.sqrt((affine_ras[:3, :3] ** 2).sum(axis=0)).tolist(),
            int(inputs.slice_indices[0]),  # the largest axial slice, first under either d2.planes
            (d3.hu_min, d3.hu_max),
            title,
            out_dir / f"{name}_gradcam.png",
        )
        return nii, png
