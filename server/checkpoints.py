"""Checkpoints of every round's global model, and the selected fold models.

Layout: ``<dir>/<model>_fold<k>/round<r>.npz`` (packed model vector plus the
round's log as JSON), ``round<r>.validation.json`` once the round's model has
been validated, and ``selected.json`` once a fold is finished.  A round's
model is validated by the next round's train message (one exchange per
round), so its validation arrives after its checkpoint was written: it goes
beside it and the checkpoint itself is never rewritten.  Each file carries
the config digest, so a resumed run refuses checkpoints written under
another configuration instead of silently mixing them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from common.atomicfile import atomic_write, write_atomic


class CheckpointError(RuntimeError):
    """A checkpoint belongs to another configuration or is unreadable."""


class CheckpointStore:
    """Round checkpoints and best-round selection for every (model, fold)."""

    def __init__(self, root: Path, config_digest: str) -> None:
        self.root = root
        self.digest = config_digest

    def _dir(self, model: str, fold: int) -> Path:
        return self.root / f"{model}_fold{fold}"

    def save(self, model: str, fold: int, rnd: int, vector: np.ndarray, meta: dict[str, Any]) -> Path:
        path = self._dir(model, fold) / f"round{rnd}.npz"
        info = dict(meta, round=rnd, config_digest=self.digest)
        with atomic_write(path) as fh:  # a crash mid-write never leaves a truncated checkpoint
            np.savez(fh, weights=np.asarray(vector, np.float32), meta=np.frombuffer(json.dumps(info).encode(), np.uint8))
        return path

    def save_validation(self, model: str, fold: int, rnd: int, meta: dict[str, Any]) -> Path:
        """Round ``rnd``'s validation (its round log, now with pooled validation): overrides the checkpoint's."""
        d = self._dir(model, fold)
        path = d / f"round{rnd}.validation.json"
        return write_atomic(path, json.dumps(dict(meta, round=rnd, config_digest=self.digest, validated=True)))

    def rounds(self, model: str, fold: int) -> list[int]:
        d = self._dir(model, fold)
        if not d.is_dir():
            return []
        found = (re.fullmatch(r"round(\d+)\.npz", p.name) for p in d.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def last_round(self, model: str, fold: int) -> int:
        r = self.rounds(model, fold)
        return r[-1] if r else 0

    def meta(self, model: str, fold: int, rnd: int) -> dict[str, Any]:
        """The round's log as checkpointed, with its validation (``validated``) once that arrived."""
        path = self._dir(model, fold) / f"round{rnd}.npz"
        with np.load(path) as z:
            info: dict[str, Any] = json.loads(bytes(z["meta"]).decode())
        self._check_digest(path, info)
        side = path.with_name(f"round{rnd}.validation.json")
        if side.is_file():
            extra: dict[str, Any] = json.loads(side.read_text())
            self._check_digest(side, extra)
            info.update(extra)
        return info

    def validated(self, model: str, fold: int, rnd: int) -> bool:
        """Whether round ``rnd``'s model has been validated (checkpoints without the flag were, when written)."""
        return bool(self.meta(model, fold, rnd).get("validated", True))

    def _check_digest(self, path: Path, info: dict[str, Any]) -> None:
        if info.get("config_digest") != self.digest:
            raise CheckpointError(
                f"{path}: written under config {info.get('config_digest')}, "
                f"this run is {self.digest}; use a new run folder"
            )

    def load(self, model: str, fold: int, rnd: int) -> np.ndarray:
        self.meta(model, fold, rnd)
        with np.load(self._dir(model, fold) / f"round{rnd}.npz") as z:
            return np.asarray(z["weights"], np.float32)

    def select_best(self, model: str, fold: int, first_round: int = 1) -> dict[str, Any]:
        """The round with the best pooled validation AUC (earliest on ties); recorded in ``selected.json``.

        Only rounds ``>= first_round`` compete (``evaluation.select_from_round``), unless none has finished.
        """
        best: dict[str, Any] | None = None
        done = self.rounds(model, fold)
        for r in [r for r in done if r >= first_round] or done:
            info = self.meta(model, fold, r)
            auc = info.get("val_auc")
            score = -1.0 if auc is None else float(auc)
            if best is None or score > best["score"]:
                best = {"round": r, "val_auc": auc, "score": score}
        if best is None:
            raise CheckpointError(f"{self._dir(model, fold)}: no round finished")
        out = {"round": best["round"], "val_auc": best["val_auc"]}
        (self._dir(model, fold) / "selected.json").write_text(json.dumps(out))
        return out

    def finished(self, model: str, fold: int) -> dict[str, Any] | None:
        path = self._dir(model, fold) / "selected.json"
        if not path.is_file():
            return None
        out: dict[str, Any] = json.loads(path.read_text())
        return out
