"""A fold model's predictions, kept at the site from its closing validation until the fold predicts.

The fold's last round is validated by an exchange of its own (``server.strategy``)
and is often the round selected; predicting with it then would send the same
model down a third time.  So that exchange (``EvaluateRequest.stage``) also
scores the fold's test patients and keeps the raw probabilities of both splits
here, tagged with the SHA-256 of the model as received
(``common.records.model_digest``) and its round.  A prediction request naming
that digest (``PredictRequest.staged``) is answered from this file; anything
else (another model, another round, a torn or foreign file, other split sizes)
finds nothing, and the site asks for the weights instead of guessing.

Per-patient values: the file stays in the site's run folder like its
prediction files, is plain arrays (``numpy.load`` without pickle), and is
deleted once the fold predicts, whichever way.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.atomicfile import atomic_write

log = logging.getLogger(__name__)

_DIGEST = "digest"
_ROUND = "round"


class StagedPredictions:
    """One model and fold's kept probabilities at one site, per split."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, digest: str, rnd: int, probs: Mapping[str, np.ndarray]) -> None:
        """Replace the file atomically with these splits' probabilities of the model ``digest``."""
        if _DIGEST in probs or _ROUND in probs:
            raise ValueError(f"a split may not be named {_DIGEST!r} or {_ROUND!r}")
        buf = io.BytesIO()
        arrays: dict[str, Any] = {k: np.asarray(v) for k, v in probs.items()}  # raw: the fold's calibration comes with the prediction
        arrays.update({_DIGEST: np.asarray(digest), _ROUND: np.asarray(rnd, np.int64)})
        np.savez(buf, allow_pickle=False, **arrays)
        with atomic_write(self.path, mode_bits=0o600) as fh:
            fh.write(buf.getvalue())

    def take(self, digest: str, rnd: int, sizes: Mapping[str, int]) -> dict[str, np.ndarray] | None:
        """The kept probabilities of model ``digest`` (round ``rnd``), one per split of ``sizes``; ``None`` if
        there are none that fit.  The file is deleted either way: the fold predicts once."""
        try:
            return self._read(digest, rnd, sizes)
        finally:
            self.discard()

    def _read(self, digest: str, rnd: int, sizes: Mapping[str, int]) -> dict[str, np.ndarray] | None:
        if not self.path.is_file():
            log.info("%s: no kept predictions: the site asks for the model", self.path)
            return None
        try:
            with np.load(self.path, allow_pickle=False) as z:
                kept = {k: z[k] for k in z.files}
            same = str(kept[_DIGEST]) == digest and int(kept[_ROUND]) == rnd
            if not same:
                log.info("%s: kept for another model or round: the site asks for the model", self.path)
                return None
            out = {}
            for split, n in sizes.items():
                p = kept[split]
                if p.dtype.kind != "f" or p.shape != (n,) or not np.all((p >= 0) & (p <= 1)):
                    raise ValueError(f"split {split!r}: {p.shape} values, expected {n} probabilities in [0, 1]")
                out[split] = p
            return out
        except Exception as exc:  # a torn or foreign file must not fail the prediction: the model is sent instead
            log.warning("%s: unreadable kept predictions (%s): the site asks for the model", self.path, exc)
            return None

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
