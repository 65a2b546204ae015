"""Progress a person can follow: one line per round and phase, and TensorBoard scalars.

The ServerApp runs in a process of its own (started by the SuperLink), so
its progress lines go to ``<run>/progress.log``, which the launching command
follows and echoes to the console (:func:`server.launch.follow`); the full
log stays in ``<run>/flower.log``.  Per-round scalars (pooled validation AUC,
training loss, sites answered, seconds) are written as TensorBoard event
files under ``<run>/tensorboard`` (``tensorboard --logdir runs/``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from common.config import ExperimentConfig

from .runfiles import PROGRESS_NAME
from .session import FoldSession, RoundLog

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts the plan's rounds, estimates the time left, writes the lines and the event files."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, tensorboard: bool = True) -> None:
        kinds = [k for k in ("densenet3d", "densenet2d") if getattr(cfg.models, k).enabled]
        self.total = len(cfg.active_folds) * sum(cfg.for_model(k).train.rounds for k in kinds)
        self.done = 0  # rounds finished (in this process or, resumed, before it)
        self.timed = 0  # rounds finished in this process: the rate for the estimate
        self.started = time.monotonic()
        self.training_s = 0.0
        self.path = run_dir / PROGRESS_NAME
        run_dir.mkdir(parents=True, exist_ok=True)
        self._tb: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def line(self, text: str) -> None:
        """One progress line: the run's progress file (followed by the console) and the log."""
        stamped = f"[{duration(time.monotonic() - self.started)}] {text}"
        with self.path.open("a") as fh:
            fh.write(stamped + "\n")
        log.info("%s", text)

    def phase(self, text: str) -> None:
        self.line(text)

    def resumed(self, rounds: int) -> None:
        """Rounds an earlier server process finished (counted as done, not in the rate)."""
        self.done += rounds

    def round(self, session: FoldSession, rlog: RoundLog, *, counted: bool = True, validated: bool = True) -> None:
        """Once a round's model is validated: the console line and the TensorBoard scalars.

        ``counted=False``: a round an earlier process trained (already counted by :meth:`resumed`).
        ``validated=False``: a round before ``evaluation.select_from_round``, whose model is
        not validated; its line counts the sites that trained.
        """
        if counted:
            self.done += 1
            self.timed += 1
            self.training_s += rlog.seconds
        left = max(self.total - self.done, 0) * self.training_s / max(self.timed, 1)
        answered = len(rlog.evaluated if validated else rlog.trained)
        asked = len(session.train_nodes)
        auc = "n/a" if rlog.val_auc is None else f"{rlog.val_auc:.4f}"
        val = f"pooled validation AUC {auc}" if validated else "not validated (before evaluation.select_from_round)"
        self.line(
            f"{session.model} fold {session.fold} round {rlog.round}/{session.total_rounds}: "
            f"sites answered {answered}/{asked}, {val}, "
            f"round {rlog.seconds:.0f} s, training about {duration(left)} left ({self.done}/{self.total} rounds)"
        )
        if self._tb is not None:
            tag = f"{session.model}/fold{session.fold}"
            if rlog.val_auc is not None:
                self._tb.add_scalar(f"{tag}/val_auc", rlog.val_auc, rlog.round)
            if rlog.train_loss is not None:
                self._tb.add_scalar(f"{tag}/train_loss", rlog.train_loss, rlog.round)
            self._tb.add_scalar(f"{tag}/sites_answered", answered, rlog.round)
            self._tb.add_scalar(f"{tag}/round_seconds", rlog.seconds, rlog.round)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
