"""The model bundle: a trained federation as one versioned file a hospital can predict with.

A bundle is a zip archive holding ``manifest.json`` and one ``.npz`` per
selected fold model (the model's floating state-dict entries by name; read
without pickle).  The manifest carries everything prediction needs besides
the weights, so the training run folder is not needed:

* ``format``, ``format_version``: what this module reads (``FORMAT_VERSION``);
* ``project_version``: the sacral-fl version that wrote it;
* ``preprocessing_version``: ``common.dataset.CACHE_VERSION`` at export, the
  version of the deterministic transforms the models were trained on;
* ``config``: the experiment config (plain data; training sites removed);
* ``models``: per network, the selected round of each fold and its pooled
  validation AUC, and the file holding it; its calibration ``platt`` (``[a, b]``,
  ``common.foldcalibration``; absent: identity) and, when the selection guard left
  the fold out of the external average, ``guard`` (the reason);
* ``input_channels``: per network, the channels its input has (the ROI mask
  channel of ``preprocess.mask_channel`` included); a bundle written before
  this field existed is image-only, which its config (no ``mask_channel``)
  says too;
* ``ensembles``: members, weights and pooled validation AUC as fitted;
* ``score_mapping``, ``threshold``, ``metrics`` (pooled internal/external
  metrics of every score), ``source`` (run name, plan, site counts);
* ``files``: the SHA-256 of every other file in the archive.

``manifest.sig`` is the coordinating site's Ed25519 signature of the exact
``manifest.json`` bytes (``common.signing``), so the checksums are signed
too.  Loading first bounds every member's declared size (``MAX_MEMBER_BYTES``,
``MAX_TOTAL_BYTES``, also inside each ``.npz``) before inflating anything,
then verifies the signature against the public key the hospital trusts, and
only then reads the manifest.  A bundle without a signature (every bundle
written before signing existed) is refused: export it again with
``flower-server bundle --signing-key``.  Loading then refuses another format, a format or preprocessing version this code
does not implement (a model fed inputs from other transforms gives wrong
answers silently), a missing, extra or altered file, and tensors that do not
fit the architecture named in the config.  Writing is ``server.bundle``'s job
(it reads the run's checkpoints); this module is the format both sides share.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from torch import nn

from common.atomicfile import atomic_write
from common.config import NETWORKS, ConfigError, ExperimentConfig, to_dict
from common.configparse import from_dict
from common.dataset import CACHE_VERSION
from common.ensemble import combine
from common.foldcalibration import IDENTITY, check_platt
from common.models import ModelKind, build_model, in_channels
from common.signing import fingerprint, sign, verify

BUNDLE_FORMAT = "sacral-fl-model-bundle"
FORMAT_VERSION = 1
"""Bump when the layout or meaning of a bundle changes; older readers then refuse newer bundles."""
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MEMBER_BYTES = 1 << 30
"""Largest inflated member (and array file inside an ``.npz``): a study-size fold model is ~45 MB."""
MAX_TOTAL_BYTES = 8 << 30
MAX_MANIFEST_BYTES = 16 << 20
MAX_MEMBERS = 256


class BundleError(ValueError):
    """A bundle cannot be written or used; the message names the file and the problem."""


def project_version() -> str:
    """The installed sacral-fl version (``0+unknown`` when run from a tree that is not installed)."""
    try:
        return metadata.version("sacral-fl")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class FoldModel:
    """One fold's selected model: which round the pooled validation AUC chose, and its file."""

    kind: ModelKind
    fold: int
    round: int
    val_auc: float | None
    file: str
    platt: tuple[float, float] = IDENTITY
    guard: str = ""


@dataclass(frozen=True)
class EnsembleSpec:
    """A fitted weighted-mean ensemble (see ``common.ensemble``)."""

    name: str
    members: tuple[str, ...]
    weights: tuple[float, ...]
    val_auc: float | None

    def apply(self, probs: Mapping[str, float]) -> float:
        """The ensemble probability from its members' probabilities."""
        row = np.asarray([[probs[m] for m in self.members]], dtype=np.float64)
        return float(combine(row, np.asarray(self.weights))[0])

    def describe(self) -> str:
        """E.g. ``0.40 x densenet3d + 0.60 x radiologist``."""
        return " + ".join(f"{w:.2f} x {m}" for m, w in zip(self.members, self.weights, strict=True))


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A loaded, verified bundle."""

    path: Path
    manifest: Mapping[str, Any]
    config: ExperimentConfig
    folds: Mapping[str, tuple[FoldModel, ...]]
    ensembles: tuple[EnsembleSpec, ...]
    tensors: Mapping[str, Mapping[str, np.ndarray]]  # file -> state-dict entries

    @property
    def kinds(self) -> tuple[ModelKind, ...]:
        return tuple(k for k in NETWORKS if self.folds.get(k))

    @property
    def score_mapping(self) -> tuple[float, ...]:
        return self.config.evaluation.score_mapping

    @property
    def threshold(self) -> float:
        """The fixed threshold of the run's config (0.5 when it chose thresholds on validation)."""
        return self.config.evaluation.fixed_threshold

    def threshold_for(self, score: str) -> float:
        """The operating threshold the run chose for ``score`` on validation, else :attr:`threshold`."""
        chosen = self.manifest.get("thresholds") or {}
        return float(chosen.get(score, self.threshold))

    def build(self, kind: ModelKind) -> list[nn.Module]:
        """The fold models of ``kind``, weights loaded, in eval mode (CPU).

        Raises ``BundleError`` when a tensor does not fit the architecture of the config.
        """
        # Pretrained ImageNet weights would be overwritten anyway: never look for them at a hospital.
        cfg = dataclasses.replace(getattr(self.config.models, kind), pretrained=False)
        models = []
        for fm in self.folds.get(kind, ()):
            model = build_model(kind, cfg, mask_channel=self.config.preprocess.mask_channel)
            load_tensors(model, self.tensors[fm.file], f"{self.path}: {fm.file}")
            models.append(model.eval())
        return models


def load_tensors(model: nn.Module, tensors: Mapping[str, np.ndarray], where: str) -> None:
    """Load named float tensors into ``model``; they must be exactly its floating state-dict entries."""
    state = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in state.items() if torch.is_floating_point(v)}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise BundleError(
            f"{where}: the weights do not fit the model in the bundle's config "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        )
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise BundleError(
                f"{where}: tensor {k} has shape {tuple(tensors[k].shape)}, the model needs {shape}"
            )
        state[k] = torch.from_numpy(np.asarray(tensors[k], dtype=np.float32))
    model.load_state_dict(state)


def _npz_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()})  # type: ignore[arg-type]
    return buf.getvalue()


def write_bundle(
    out: Path,
    *,
    config: ExperimentConfig,
    models: Sequence[tuple[FoldModel, Mapping[str, np.ndarray]]],
    ensembles: Sequence[EnsembleSpec],
    metrics: Mapping[str, Any],
    source: Mapping[str, Any],
    signing_key: Ed25519PrivateKey,
    thresholds: Mapping[str, float] | None = None,
) -> Path:
    """Write a bundle signed with ``signing_key`` atomically (temp file, then rename); returns ``out``."""
    out = Path(out)
    payload = {fm.file: _npz_bytes(t) for fm, t in models}
    folds: dict[str, list[dict[str, Any]]] = {}
    for fm, _ in models:
        entry: dict[str, Any] = {"fold": fm.fold, "round": fm.round, "val_auc": fm.val_auc, "file": fm.file}
        if fm.platt != IDENTITY:
            entry["platt"] = list(fm.platt)
        if fm.guard:
            entry["guard"] = fm.guard
        folds.setdefault(fm.kind, []).append(entry)
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": FORMAT_VERSION,
        "project_version": project_version(),
        "preprocessing_version": CACHE_VERSION,
        "config": to_dict(config),
        "models": folds,
        "input_channels": {
            kind: in_channels(cast(ModelKind, kind), config.preprocess.mask_channel) for kind in folds
        },
        "ensembles": {
            e.name: {"members": list(e.members), "weights": list(e.weights), "val_auc": e.val_auc}
            for e in ensembles
        },
        "score_mapping": list(config.evaluation.score_mapping),
        "threshold": config.evaluation.fixed_threshold,
        "thresholds": {k: float(v) for k, v in (thresholds or {}).items()},
        "metrics": dict(metrics),
        "source": dict(source),
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in payload.items()},
    }
    manifest_bytes = json.dumps(manifest, indent=2).encode()
    # 0644: a bundle is shared with other hospitals
    with atomic_write(out, mode_bits=0o644) as fh, zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(MANIFEST_NAME, manifest_bytes)
        zf.writestr(SIGNATURE_NAME, sign(manifest_bytes, signing_key))
        for name, data in payload.items():
            zf.writestr(name, data)
    return out


def _check_sizes(zf: zipfile.ZipFile, path: Path, max_member_bytes: int) -> None:
    """Refuse an archive whose declared sizes are too large, before anything is inflated.

    ``ZipFile.read`` stops at a member's declared size, so bounding the
    declared sizes bounds the memory a crafted archive (a zip bomb) can take.
    """
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(infos) > MAX_MEMBERS:
        raise BundleError(f"{path}: {len(infos)} members, more than a bundle holds ({MAX_MEMBERS})")
    if len(set(names)) != len(names):
        raise BundleError(f"{path}: a member name appears twice (altered bundle?)")
    for info in infos:
        if info.file_size > max_member_bytes:
            raise BundleError(
                f"{path}: member {info.filename} would inflate to {info.file_size} bytes "
                f"({info.compress_size} stored), above the {max_member_bytes}-byte cap; refused unread"
            )
    total = sum(i.file_size for i in infos)
    if total > MAX_TOTAL_BYTES:
        raise BundleError(f"{path}: members would inflate to {total} bytes in all, above {MAX_TOTAL_BYTES}")


def _load_npz(data: bytes, where: str, max_member_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of one ``.npz`` member (itself a zip: its inner sizes are bounded as well), without pickle."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            declared = sum(i.file_size for i in inner.infolist())
            if declared > max_member_bytes:
                raise BundleError(
                    f"{where}: arrays would inflate to {declared} bytes, above the {max_member_bytes}-byte cap"
                )
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise BundleError(f"{where}: not a readable array file ({exc})") from exc


def read_bundle(
    path: Path, trusted_key: Ed25519PublicKey, *, max_member_bytes: int = MAX_MEMBER_BYTES
) -> ModelBundle:
    """Open and verify a bundle (sizes, signature, format, versions, checksums); raises ``BundleError``.

    ``trusted_key``: the coordinating site's public key, as the hospital
    received it (``common.signing.load_public_key``).  The tensors are checked
    against the architecture when the models are built (``ModelBundle.build``,
    done by ``client.predict.Predictor`` before any patient).
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError as exc:
        raise BundleError(f"{path}: bundle file not found") from exc
    except (OSError, zipfile.BadZipFile) as exc:
        raise BundleError(f"{path}: not a model bundle (not a readable zip archive: {exc})") from exc
    with zf:
        names = set(zf.namelist())
        if MANIFEST_NAME not in names:
            raise BundleError(f"{path}: not a model bundle ({MANIFEST_NAME} missing)")
        _check_sizes(zf, path, max_member_bytes)
        if zf.getinfo(MANIFEST_NAME).file_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{path}: {MANIFEST_NAME} is larger than {MAX_MANIFEST_BYTES} bytes")
        if SIGNATURE_NAME not in names:
            raise BundleError(
                f"{path}: unsigned bundle refused ({SIGNATURE_NAME} missing): ask the coordinating site "
                "for a bundle exported with `flower-server bundle --signing-key`"
            )
        try:
            manifest_bytes = zf.read(MANIFEST_NAME)
            signature = zf.read(SIGNATURE_NAME)
        except (zipfile.BadZipFile, OSError) as exc:
            raise BundleError(f"{path}: {MANIFEST_NAME} is unreadable ({exc})") from exc
        if not verify(manifest_bytes, signature, trusted_key):
            raise BundleError(
                f"{path}: signature check failed: the bundle was altered or not signed by the trusted key "
                f"{fingerprint(trusted_key)}; refused"
            )
        try:
            manifest = json.loads(manifest_bytes)
        except ValueError as exc:
            raise BundleError(f"{path}: {MANIFEST_NAME} is unreadable ({exc})") from exc
        if not isinstance(manifest, dict):
            raise BundleError(f"{path}: {MANIFEST_NAME} is not a JSON object")
        check_compatible(manifest, path)
        files = cast(dict[str, str], manifest.get("files", {}))
        unexpected = sorted(names - set(files) - {MANIFEST_NAME, SIGNATURE_NAME})
        if unexpected:
            raise BundleError(f"{path}: files not listed in the manifest: {unexpected} (altered bundle?)")
        tensors: dict[str, dict[str, np.ndarray]] = {}
        for name, digest in files.items():
            if name not in names:
                raise BundleError(f"{path}: {name} is listed in the manifest but missing from the archive")
            data = zf.read(name)
            if hashlib.sha256(data).hexdigest() != digest:
                raise BundleError(
                    f"{path}: checksum mismatch for {name} (sha256 differs from the manifest): "
                    "the bundle is corrupt or was altered; export it again"
                )
            tensors[name] = _load_npz(data, f"{path}: {name}", max_member_bytes)
    try:
        config = from_dict(manifest["config"])
    except (ConfigError, KeyError) as exc:
        raise BundleError(f"{path}: the bundle's config is invalid for this version ({exc})") from exc
    folds: dict[str, tuple[FoldModel, ...]] = {}
    for kind, entries in cast(dict[str, list[dict[str, Any]]], manifest.get("models", {})).items():
        if kind not in NETWORKS:
            raise BundleError(f"{path}: unknown model kind {kind!r} in the manifest")
        try:
            folds[kind] = tuple(
                FoldModel(
                    cast(ModelKind, kind),
                    int(e["fold"]),
                    int(e["round"]),
                    e.get("val_auc"),
                    str(e["file"]),
                    check_platt(e.get("platt")),
                    str(e.get("guard", "")),
                )
                for e in entries
            )
        except ValueError as exc:
            raise BundleError(f"{path}: {kind}: invalid fold entry in the manifest ({exc})") from exc
        for fm in folds[kind]:
            if fm.file not in tensors:
                raise BundleError(
                    f"{path}: {kind} fold {fm.fold} names {fm.file}, which has no checksum entry"
                )
    ensembles = tuple(
        EnsembleSpec(name, tuple(e["members"]), tuple(float(w) for w in e["weights"]), e.get("val_auc"))
        for name, e in cast(dict[str, dict[str, Any]], manifest.get("ensembles", {})).items()
    )
    _check_thresholds(manifest.get("thresholds", {}), path)
    check_input_channels(manifest.get("input_channels"), config, path)
    bundle = ModelBundle(path, manifest, config, folds, ensembles, tensors)
    if not bundle.kinds:
        raise BundleError(f"{path}: the bundle holds no model")
    return bundle


def _check_thresholds(chosen: Any, path: Path) -> None:
    """Operating thresholds must be probabilities in (0, 1), one per named score."""
    if not isinstance(chosen, dict):
        raise BundleError(f"{path}: 'thresholds' in the manifest must map score names to numbers")
    for name, t in chosen.items():
        ok = isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and 0.0 < t < 1.0
        if not (isinstance(name, str) and ok):
            raise BundleError(f"{path}: operating threshold {t!r} of {name!r} is not a probability in (0, 1)")


def check_compatible(manifest: Mapping[str, Any], path: Path) -> None:
    """Refuse a bundle this code cannot use correctly, saying which version made it."""
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: not a sacral-fl model bundle (format {manifest.get('format')!r})")
    made_by = manifest.get("project_version", "?")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        hint = (
            "upgrade sacral-fl to read it"
            if isinstance(version, int) and version > FORMAT_VERSION
            else "export it again from its run folder with this version (flower-server bundle)"
        )
        raise BundleError(
            f"{path}: incompatible bundle version: format {version} (written by sacral-fl {made_by}), "
            f"this sacral-fl {project_version()} reads format {FORMAT_VERSION}; {hint}"
        )
    pre = manifest.get("preprocessing_version")
    if pre != CACHE_VERSION:
        raise BundleError(
            f"{path}: incompatible bundle version: its models were trained on preprocessing version {pre} "
            f"(sacral-fl {made_by}), this sacral-fl {project_version()} implements version {CACHE_VERSION}; "
            "predictions would be fed other inputs than in training"
        )


def check_input_channels(recorded: Any, config: ExperimentConfig, path: Path) -> None:
    """The manifest's ``input_channels`` must be what the config's preprocessing produces.

    Absent (a bundle from before the field): image-only, as its config says.  A
    mismatch means the manifest was edited or written by other code: refuse it
    rather than feed the models inputs of another shape.
    """
    if recorded is None:
        return
    if not isinstance(recorded, dict) or not all(isinstance(v, int) for v in recorded.values()):
        raise BundleError(
            f"{path}: manifest input_channels must map model kinds to channel counts, got {recorded!r}"
        )
    for kind, n in recorded.items():
        if kind not in NETWORKS:
            raise BundleError(f"{path}: unknown model kind {kind!r} in input_channels")
        expected = in_channels(kind, config.preprocess.mask_channel)
        if n != expected:
            raise BundleError(
                f"{path}: manifest says {kind} takes {n} input channel(s), its config's preprocessing gives "
                f"{expected} (preprocess.mask_channel={config.preprocess.mask_channel})"
            )
