"""One dataset API for a site and for the pooled baseline (FLamby style).

``preprocess_site`` reads a site folder once: every case is validated (with
``common.validation``, so a refused case gets the same message as
``flower-client validate``), preprocessed by the deterministic transforms of
``common.transforms`` and summarised by a few handcrafted radiomics features
(``common.features``), all from the same RAS+ volume and largest-component mask.  The result,
``SiteArrays``, is cached as one compressed ``.npz`` keyed by the
preprocessing config, the manifest and the sizes/mtimes of the files it
names, so later runs (and other processes) skip the work (the arrays and their
file format: ``common.sitearrays``).  ``SiteArrays.concat`` pools sites for the
centralised baseline; ``PatientDataset`` serves the
arrays to the training engine, with augmentation in training mode only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import re
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from common import models
from common.config import AugmentConfig, PreprocessConfig, to_dict
from common.features import FEATURE_NAMES, radiomic_features
from common.sitearrays import SiteArrays, load_arrays, save_arrays
from common.sitedata import (
    MANIFEST,
    Case,
    SiteDataError,
    Volume,
    case_from_row,
    load_case,
    read_manifest_rows,
)
from common.transforms import (
    deterministic_2d,
    deterministic_3d,
    random_2d,
    random_3d,
    volume_dict,
)
from common.validation import SEX_VALUES, validate_case, validate_site

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
"""Bump when preprocessing code changes its output: old cache files are then ignored."""

Kind = Literal["3d", "2d"]
Mode = Literal["train", "eval"]


# ---------------------------------------------------------------- one case


@dataclass(frozen=True)
class _CaseOutput:
    vol3d: np.ndarray
    slices2d: np.ndarray
    slice_indices: np.ndarray
    features: np.ndarray


@dataclass(frozen=True, eq=False)
class ModelInputs:
    """The deterministic model inputs of one volume, as training and prediction both see them.

    ``box_mm`` is the world (RAS mm) box the 3D cube samples, low and high
    corners, so a map on the cube (Grad-CAM) can be put back on the scan.
    """

    vol3d: np.ndarray  # float32 (C, S, S, S) in [0, 1]; C = 1, or 2 with the mask channel
    slices2d: np.ndarray  # float32 (n, C, s, s) in [0, 1]; C = 3, or 4 with the mask channel
    slice_indices: np.ndarray  # int64 (n,), along each slice's normal axis (RAS z when axial), axial first
    box_mm: np.ndarray  # float64 (2, 3)


def model_inputs(volume: Volume, cfg: PreprocessConfig) -> ModelInputs:
    """Run the deterministic 3D and 2D transforms of ``cfg`` on a RAS+ volume (the one preprocessing path)."""
    data = volume_dict(volume)
    out3 = deterministic_3d(cfg.d3, cfg.mask_channel)(dict(data))
    out2 = deterministic_2d(cfg.d2, (cfg.d3.hu_min, cfg.d3.hu_max), cfg.mask_channel)(dict(data))
    return ModelInputs(
        vol3d=np.asarray(out3["image"], dtype=np.float32),
        slices2d=np.asarray(out2["image"], dtype=np.float32),
        slice_indices=np.asarray(out2["slice_indices"], dtype=np.int64),
        box_mm=np.asarray(out3["box_mm"], dtype=np.float64),
    )


def _process_case(case: Case, cfg: PreprocessConfig) -> _CaseOutput | list[str]:
    """Validate and preprocess one case; a list of messages when it is refused (never raises)."""
    try:
        problems = validate_case(case)
        errors = [str(p) for p in problems if p.severity == "error"]
        if errors:
            return errors
        volume = load_case(case)
        inputs = model_inputs(volume, cfg)
        features = radiomic_features(volume)
        arrays = (inputs.vol3d, inputs.slices2d, features)
        if not all(np.all(np.isfinite(a)) for a in arrays):
            return [f"ERROR  {case.image}  patient {case.patient_id}: preprocessing gave non-finite values"]
        return _CaseOutput(
            vol3d=inputs.vol3d.astype(np.float16),
            slices2d=inputs.slices2d.astype(np.float16),
            slice_indices=inputs.slice_indices,
            features=features,
        )
    except Exception as exc:  # one broken case must not stop the site
        cause = exc.__cause__ or exc  # MONAI wraps transform errors in RuntimeError
        return [
            f"ERROR  {case.image}  patient {case.patient_id}: preprocessing failed: {type(cause).__name__}: {cause}"
        ]


def _process_case_star(args: tuple[Case, PreprocessConfig]) -> _CaseOutput | list[str]:
    return _process_case(*args)


# ---------------------------------------------------------------- cache


def cache_key(site_dir: Path, cfg: PreprocessConfig) -> str:
    """Hash of what the cached arrays depend on: preprocessing config, manifest, file sizes and mtimes.

    Augmentation is not part of it (it is applied later, at training time).
    """
    site_dir = Path(site_dir)
    _, rows = read_manifest_rows(site_dir)
    files: list[Any] = []
    for row in rows:
        for col in ("image", "mask"):
            rel = row.get(col, "")
            try:
                st = (site_dir / rel).stat() if rel else None
            except OSError:
                st = None
            files.append([rel, st.st_size if st else None, st.st_mtime_ns if st else None])
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "d3": to_dict(cfg.d3),
            "d2": to_dict(cfg.d2),
            "mask_channel": cfg.mask_channel,
            "manifest": hashlib.sha256((site_dir / MANIFEST).read_bytes()).hexdigest(),
            "files": files,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(cache_dir: Path, site: str, key: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", site) or "site"
    return Path(cache_dir) / f"{safe}-{key}.npz"


# ---------------------------------------------------------------- the site


def preprocess_site(
    site_dir: Path, cfg: PreprocessConfig, cache_dir: Path, *, site: str = "", workers: int = 1
) -> SiteArrays:
    """Validate, preprocess and cache one site folder; invalid cases are refused, never fatal.

    Refused cases are logged at WARNING with the validation module's
    messages and listed in ``SiteArrays.refused``.  Raises ``SiteDataError``
    only if the manifest is unusable or no case is valid.  ``workers > 1``
    preprocesses cases in that many processes.
    """
    site_dir = Path(site_dir)
    site = site or site_dir.name
    key = cache_key(site_dir, cfg)  # raises SiteDataError for an unusable manifest
    path = cache_path(cache_dir, site, key)
    if path.is_file():
        try:
            t0 = time.perf_counter()
            arrays = dataclasses.replace(load_arrays(path), site=site)
            logger.info(
                "%s: %d patients from cache %s (%.2f s)", site, len(arrays), path, time.perf_counter() - t0
            )
            return arrays
        except Exception as exc:
            logger.warning("%s: unreadable cache %s (%s); preprocessing again", site, path, exc)

    t0 = time.perf_counter()
    refused: list[str] = []
    cases = _valid_rows(site_dir, refused)
    jobs = [(c, cfg) for c in cases]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            results = list(pool.map(_process_case_star, jobs))
    else:
        results = [_process_case(*j) for j in jobs]
    kept: list[tuple[Case, _CaseOutput]] = []
    extent = FEATURE_NAMES.index("max_extent_mm")
    for case, res in zip(cases, results, strict=True):
        if isinstance(res, _CaseOutput):
            kept.append((case, res))
            if cfg.d3.crop == "fov" and res.features[extent] > cfg.d3.fov_mm:
                logger.warning(
                    "%s: patient %s: ROI extent %.0f mm exceeds the 3D field of view (%.0f mm): the cube cuts the lesion",
                    site,
                    case.patient_id,
                    res.features[extent],
                    cfg.d3.fov_mm,
                )
        else:
            refused.extend(res)
    for msg in refused:
        logger.warning("%s: refused: %s", site, msg)
    if not kept:
        shown = "; ".join(refused[:3]) + (" ..." if len(refused) > 3 else "")
        raise SiteDataError(f"{site_dir}: no valid case among {len(refused)} refused ({shown})")
    arrays = _assemble(site, kept, tuple(refused), key)
    save_arrays(arrays, path)
    dt = time.perf_counter() - t0
    logger.info(
        "%s: preprocessed %d patients (%d refused) in %.1f s (%.2f s/patient), cached at %s",
        site,
        len(kept),
        len(refused),
        dt,
        dt / max(len(jobs), 1),
        path,
    )
    return arrays


def _valid_rows(site_dir: Path, refused: list[str]) -> list[Case]:
    """Manifest rows whose fields pass the site-level checks (duplicate ids, bad values).

    File contents are checked per case later; here only the CSV is read.
    """
    report = validate_site(site_dir, check_images=False)
    _, rows = read_manifest_rows(site_dir)
    bad: dict[str | None, list[str]] = {}
    for p in report.errors:
        bad.setdefault(p.patient_id, []).append(str(p))
    refused.extend(bad.pop(None, []))  # manifest-level (e.g. a row with no patient id)
    cases: list[Case] = []
    for row in rows:
        pid = row.get("patient_id", "")
        if not pid:
            continue
        if pid in bad:  # every row of a duplicated id is refused; its messages are listed once
            refused.extend(bad[pid])
            bad[pid] = []
            continue
        try:
            cases.append(case_from_row(site_dir, row))
        except SiteDataError as exc:
            refused.append(str(exc))
    return cases


def _assemble(
    site: str, kept: list[tuple[Case, _CaseOutput]], refused: tuple[str, ...], key: str
) -> SiteArrays:
    cases = [c for c, _ in kept]
    outs = [o for _, o in kept]
    return SiteArrays(
        site=site,
        patient_ids=tuple(c.patient_id for c in cases),
        labels=np.asarray([c.label for c in cases], dtype=np.int64),
        radiologist_scores=np.asarray([c.radiologist_score for c in cases], dtype=np.int64),
        vol3d=np.stack([o.vol3d for o in outs]),
        slices2d=np.stack([o.slices2d for o in outs]),
        slice_indices=np.stack([o.slice_indices for o in outs]),
        features=np.stack([o.features for o in outs]),
        feature_names=FEATURE_NAMES,
        ages=np.asarray([math.nan if c.age is None else c.age for c in cases], dtype=np.float64),
        sexes=tuple(SEX_VALUES.get((c.sex or "").strip().lower(), "") for c in cases),
        sites=(site,) * len(cases),
        refused=refused,
        digest=key,
    )


# ---------------------------------------------------------------- torch dataset


class PatientDataset(Dataset[dict[str, Any]]):
    """Model inputs of the patients ``indices`` (rows of ``arrays``).

    * ``kind="3d"``: one item per patient, ``image`` (1, S, S, S).
    * ``kind="2d"``, ``mode="train"``: one item per (patient, slice), each
      slice (3, s, s) a training image with its patient's label (``slice``
      gives its rank, 0 = largest).
    * ``kind="2d"``, ``mode="eval"``: one item per patient, ``image``
      (n, 3, s, s), so the engine can average the slice probabilities.

    Items also carry ``label`` (int64) and ``index`` (the row in ``arrays``).
    ``mask_channel``: the last channel is the ROI mask (augmented with the image).
    Augmentation runs in ``train`` mode only; its randomness is drawn per
    item from (seed, epoch, index, draw), so results do not depend on the
    number of DataLoader workers.  Call ``set_epoch`` at each epoch (as with
    ``DistributedSampler``); without it, repeated draws of one item still
    differ within a process.
    """

    def __init__(
        self,
        arrays: SiteArrays,
        indices: Sequence[int] | np.ndarray,
        kind: Kind,
        mode: Mode,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        mask_channel: bool = False,
    ) -> None:
        if kind not in ("3d", "2d") or mode not in ("train", "eval"):
            raise ValueError(f"kind must be '3d' or '2d' and mode 'train' or 'eval', got {kind!r}, {mode!r}")
        channels = int(arrays.vol3d.shape[1] if kind == "3d" else arrays.slices2d.shape[2])
        expected = models.in_channels("densenet3d" if kind == "3d" else "densenet2d", mask_channel)
        if len(arrays) and channels != expected:
            raise ValueError(
                f"site {arrays.site!r}: {kind} inputs have {channels} channel(s), the config expects {expected} "
                f"(preprocess.mask_channel={mask_channel}): preprocessed under another config"
            )
        self.arrays = arrays
        self.rows = np.asarray(indices, dtype=np.int64)
        if self.rows.size and (self.rows.min() < 0 or self.rows.max() >= len(arrays)):
            raise IndexError(f"site {arrays.site!r}: indices outside 0..{len(arrays) - 1}")
        self.kind, self.mode, self.seed = kind, mode, seed
        self.n_slices = int(arrays.slices2d.shape[1])
        self.per_slice = kind == "2d" and mode == "train"
        self._augment = None
        if mode == "train" and augment is not None and augment.enabled:
            size = int(arrays.vol3d.shape[-1] if kind == "3d" else arrays.slices2d.shape[-1])
            make = random_3d if kind == "3d" else random_2d
            self._augment = make(augment, size, mask_channel)
        self.epoch = 0
        self._draws: dict[int, int] = {}

    def set_epoch(self, epoch: int) -> None:
        """Start a new stream of augmentations (deterministic given seed and epoch)."""
        self.epoch = int(epoch)
        self._draws.clear()

    def __len__(self) -> int:
        return len(self.rows) * (self.n_slices if self.per_slice else 1)

    @property
    def labels(self) -> np.ndarray:
        """Label of each item (repeated per slice for 2D training)."""
        labels = self.arrays.labels[self.rows]
        return np.repeat(labels, self.n_slices) if self.per_slice else labels

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        row = int(self.rows[i // self.n_slices if self.per_slice else i])
        item: dict[str, Any] = {
            "label": torch.tensor(self.arrays.labels[row], dtype=torch.int64),
            "index": row,
        }
        if self.kind == "3d":
            image = self.arrays.vol3d[row]
        elif self.per_slice:
            item["slice"] = i % self.n_slices
            image = self.arrays.slices2d[row, i % self.n_slices]
        else:
            image = self.arrays.slices2d[row]
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32))
        if self._augment is not None:
            draw = self._draws.get(i, 0)
            self._draws[i] = draw + 1
            seed = int(np.random.SeedSequence([self.seed, self.epoch, i, draw]).generate_state(1)[0])
            self._augment.set_random_state(seed=seed)
            tensor = self._augment({"image": tensor})["image"]
        item["image"] = tensor
        return item
