"""A site's optimiser state between rounds, kept in its own run folder.

Each round's training runs in a fresh ClientApp process (deployment) or a
Ray worker (simulation), so Adam's moments survive from round r to round
r+1 only on disk.  They are the site's alone: derived from its patients'
gradients, they never leave the folder (the wire carries model weights and
aggregate statistics only).  A fold's last round writes none (no round reads
it), and the file is deleted when the fold's chosen model predicts
(``SiteRunner.predict_fold``), so a finished run leaves none behind.  A
missing, unreadable or ill-fitting file means a fresh optimiser, logged,
never a failed round.  The file is a raw tensor tree (``common.tensortree``: no pickle,
a third of ``torch.save``/``torch.load``'s CPU for Adam's 90 MB).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from common.atomicfile import atomic_write
from common.tensortree import read_tree, write_tree

log = logging.getLogger(__name__)


class OptimizerStore:
    """The optimiser state of one model and fold at one site, tagged with the round that wrote it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, rnd: int) -> dict[str, Any] | None:
        """The state written by an earlier round than ``rnd``, or ``None`` (start afresh)."""
        if not self.path.is_file():
            return None
        try:
            with self.path.open("rb") as fh:
                saved = read_tree(fh, os.fstat(fh.fileno()).st_size)
            written, state = int(saved["round"]), saved["state"]
            if not isinstance(state, dict):
                raise TypeError(f"state is a {type(state).__name__}, not a dict")
        except Exception as exc:  # a torn or foreign file must not fail the round
            log.warning(
                "%s: unreadable optimiser state (%s): this round starts a fresh optimiser", self.path, exc
            )
            return None
        if written >= rnd:  # a repeated round (the server retried it): do not resume from its own end
            log.info("%s: written by round %d, not before round %d: fresh optimiser", self.path, written, rnd)
            return None
        return state

    def discard(self) -> None:
        """Delete the state once no round of its fold can read it (90 MB for a DenseNet121 3D's Adam)."""
        self.path.unlink(missing_ok=True)

    def save(self, rnd: int, state: dict[str, Any] | None) -> None:
        """Replace the file atomically (a crash mid-write leaves the previous round's state)."""
        if state is None:
            return
        with atomic_write(self.path) as fh:
            write_tree(fh, {"round": rnd, "state": state})
