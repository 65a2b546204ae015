"""One site's (or a pool's) preprocessed patients as arrays, and their cache file format.

``common.dataset.preprocess_site`` builds a ``SiteArrays`` once per site and
preprocessing config and caches it with ``save_arrays``: a compressed ``.npz``
private to the site (0600), read back without pickle.  Every consumer (the
engine, the radiomics model, selection, the pooled baseline, prediction)
takes the same type, whichever site or pool it came from.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomicfile import atomic_write


@dataclass(frozen=True, eq=False)  # arrays have no single truth value: compare fields explicitly
class SiteArrays:
    """Everything the models need from one site (or a pool of sites), one row per patient.

    ``sites`` names each row's site (differs from ``site`` only after
    ``concat``).  ``slice_indices`` are the 2D slices' indices along their
    normal axes (RAS z for axial slices; see ``preprocess.d2.planes``),
    axial first and largest tumour area first.  ``refused`` holds one message per refused
    case; ``digest`` identifies the preprocessing (cache key) for audit.
    """

    site: str
    patient_ids: tuple[str, ...]
    labels: np.ndarray  # int64 (N,)
    radiologist_scores: np.ndarray  # int64 (N,)
    vol3d: np.ndarray  # float16 (N, C, S, S, S) in [0, 1] (C = 2: the last is the ROI mask)
    slices2d: np.ndarray  # float16 (N, n, C, s, s) in [0, 1] (C = 4: the last is the ROI mask)
    slice_indices: np.ndarray  # int64 (N, n)
    features: np.ndarray  # float64 (N, F)
    feature_names: tuple[str, ...]
    ages: np.ndarray  # float64 (N,), NaN when unknown
    sexes: tuple[str, ...]  # "M", "F" or "" (unknown)
    sites: tuple[str, ...]
    refused: tuple[str, ...] = ()
    digest: str = ""

    def __post_init__(self) -> None:
        n = len(self.patient_ids)
        per_row = {
            "labels": len(self.labels),
            "radiologist_scores": len(self.radiologist_scores),
            "vol3d": len(self.vol3d),
            "slices2d": len(self.slices2d),
            "slice_indices": len(self.slice_indices),
            "features": len(self.features),
            "ages": len(self.ages),
            "sexes": len(self.sexes),
            "sites": len(self.sites),
        }
        bad = {k: v for k, v in per_row.items() if v != n}
        if bad:
            raise ValueError(f"SiteArrays {self.site!r}: {n} patient ids but row counts {bad}")
        if len(set(self.patient_ids)) != n:
            raise ValueError(f"SiteArrays {self.site!r}: patient ids are not unique")
        if self.features.shape[1:] != (len(self.feature_names),):
            raise ValueError(
                f"SiteArrays {self.site!r}: features {self.features.shape} vs names {self.feature_names}"
            )

    def __len__(self) -> int:
        return len(self.patient_ids)

    def indices_of(self, patient_ids: Iterable[str]) -> np.ndarray:
        """Row indices of ``patient_ids`` (e.g. a ``Fold``'s train ids); raises naming unknown ids."""
        where = {pid: i for i, pid in enumerate(self.patient_ids)}
        ids = list(patient_ids)
        unknown = [p for p in ids if p not in where]
        if unknown:
            raise KeyError(f"site {self.site!r}: unknown patient id(s) {unknown[:5]}")
        return np.asarray([where[p] for p in ids], dtype=np.int64)

    def subset(self, indices: Sequence[int] | np.ndarray) -> SiteArrays:
        """The rows ``indices`` (in that order); ``refused`` is kept."""
        idx = np.asarray(indices, dtype=np.int64)
        return dataclasses.replace(
            self,
            patient_ids=tuple(self.patient_ids[i] for i in idx),
            labels=self.labels[idx],
            radiologist_scores=self.radiologist_scores[idx],
            vol3d=self.vol3d[idx],
            slices2d=self.slices2d[idx],
            slice_indices=self.slice_indices[idx],
            features=self.features[idx],
            ages=self.ages[idx],
            sexes=tuple(self.sexes[i] for i in idx),
            sites=tuple(self.sites[i] for i in idx),
        )

    @staticmethod
    def concat(parts: Sequence[SiteArrays], *, site: str = "pooled") -> SiteArrays:
        """Pool sites (the centralised baseline); rows keep their order and their ``sites``.

        Patient ids are kept as they are: two hospitals may both have a
        ``p001``, so qualify ids first (e.g. ``"<site>/<id>"``) when pooling;
        colliding ids raise.  All parts must come from the same preprocessing
        config (same array shapes).
        """
        if not parts:
            raise ValueError("concat needs at least one SiteArrays")
        first = parts[0]
        for p in parts[1:]:
            if p.vol3d.shape[1:] != first.vol3d.shape[1:] or p.slices2d.shape[1:] != first.slices2d.shape[1:]:
                raise ValueError(
                    f"cannot pool site {p.site!r} ({p.vol3d.shape[1:]}, {p.slices2d.shape[1:]}) with "
                    f"{first.site!r} ({first.vol3d.shape[1:]}, {first.slices2d.shape[1:]}): different preprocessing"
                )
            if p.feature_names != first.feature_names:
                raise ValueError(f"cannot pool site {p.site!r}: different radiomics features")
        ids = tuple(pid for p in parts for pid in p.patient_ids)
        dup = sorted(pid for pid, n in Counter(ids).items() if n > 1)
        if dup:
            raise ValueError(
                f"cannot pool sites {[p.site for p in parts]}: patient id(s) {dup[:5]} occur in more than one "
                "site; prefix ids with their site first"
            )
        digests = sorted({p.digest for p in parts})
        return SiteArrays(
            site=site,
            patient_ids=ids,
            labels=np.concatenate([p.labels for p in parts]),
            radiologist_scores=np.concatenate([p.radiologist_scores for p in parts]),
            vol3d=np.concatenate([p.vol3d for p in parts]),
            slices2d=np.concatenate([p.slices2d for p in parts]),
            slice_indices=np.concatenate([p.slice_indices for p in parts]),
            features=np.concatenate([p.features for p in parts]),
            feature_names=first.feature_names,
            ages=np.concatenate([p.ages for p in parts]),
            sexes=tuple(s for p in parts for s in p.sexes),
            sites=tuple(s for p in parts for s in p.sites),
            refused=tuple(r for p in parts for r in p.refused),
            digest="+".join(digests),
        )


# ---------------------------------------------------------------- the cache file


_STR_FIELDS = ("patient_ids", "feature_names", "sexes", "sites", "refused")
_ARRAY_FIELDS = ("labels", "radiologist_scores", "vol3d", "slices2d", "slice_indices", "features", "ages")


def save_arrays(arrays: SiteArrays, path: Path) -> None:
    """Write ``arrays`` as one compressed npz, atomically and private to the site (0600)."""
    payload: dict[str, np.ndarray] = {k: getattr(arrays, k) for k in _ARRAY_FIELDS}
    payload.update({k: np.asarray(getattr(arrays, k), dtype=str) for k in _STR_FIELDS})
    payload["site"] = np.asarray(arrays.site)
    payload["digest"] = np.asarray(arrays.digest)
    with atomic_write(Path(path), mode_bits=0o600, fsync=True) as fh:
        np.savez_compressed(fh, **payload)  # type: ignore[arg-type]


def load_arrays(path: Path) -> SiteArrays:
    """Read what ``save_arrays`` wrote (no pickle)."""
    with np.load(path, allow_pickle=False) as z:
        strs = {k: tuple(str(s) for s in z[k].tolist()) for k in _STR_FIELDS}
        arrs = {k: z[k] for k in _ARRAY_FIELDS}
        return SiteArrays(site=str(z["site"]), digest=str(z["digest"]), **strs, **arrs)  # type: ignore[arg-type]
