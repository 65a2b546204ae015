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
from collections.abc import Mapping
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


def time_left(left: Mapping[str, int], seconds: Mapping[str, float], timed: Mapping[str, int]) -> float:
    """Seconds still to train: each network's rounds left at its own mean round time.

    A 3D and a 2D round differ in cost (and a network may have more rounds), so one rate
    for all misleads; a network with no timed round yet borrows the mean over all timed rounds.
    """
    n = sum(timed.values())
    overall = sum(seconds.values()) / n if n else 0.0
    return sum(r * (seconds[k] / timed[k] if timed.get(k) else overall) for k, r in left.items())


class Progress:
    """Counts the plan's rounds, estimates the time left, writes the lines and the event files."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, *, tensorboard: bool = True) -> None:
        kinds: list[str] = list(cfg.networks)
        # per network: rounds in the plan, finished (in this process or, resumed, before it),
        # finished in this process and their seconds (the network's rate for the estimate)
        self.total = {k: len(cfg.active_folds) * cfg.for_model(k).train.rounds for k in kinds}
        self.done = dict.fromkeys(kinds, 0)
        self.timed = dict.fromkeys(kinds, 0)
        self.training_s = dict.fromkeys(kinds, 0.0)
        self.started = time.monotonic()
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

    def repeat(self, passes: int) -> None:
        """The plan runs ``passes`` times (leave-one-centre-out: once per held-out site)."""
        self.total = {k: n * max(passes, 1) for k, n in self.total.items()}

    def resumed(self, kind: str, rounds: int) -> None:
        """Rounds of ``kind`` an earlier server process finished (counted as done, not in the rate)."""
        self.done[kind] += rounds

    def round(self, session: FoldSession, rlog: RoundLog, *, counted: bool = True, validated: bool = True) -> None:
        """Once a round's model is validated: the console line and the TensorBoard scalars.

        ``counted=False``: a round an earlier process trained (already counted by :meth:`resumed`).
        ``validated=False``: a round before ``evaluation.select_from_round``, whose model is
        not validated; its line counts the sites that trained.
        """
        kind = session.model
        if counted:
            self.done[kind] += 1
            self.timed[kind] += 1
            self.training_s[kind] += rlog.seconds
        left = time_left({k: max(n - self.done[k], 0) for k, n in self.total.items()}, self.training_s, self.timed)
        done, total = sum(self.done.values()), sum(self.total.values())
        answered = len(rlog.evaluated if validated else rlog.trained)
        asked = len(session.train_nodes)
        auc = "n/a" if rlog.val_auc is None else f"{rlog.val_auc:.4f}"
        val = f"pooled validation AUC {auc}" if validated else "not validated (before evaluation.select_from_round)"
        self.line(
            f"{session.model} fold {session.fold} round {rlog.round}/{session.total_rounds}: "
            f"sites answered {answered}/{asked}, {val}, "
            f"round {rlog.seconds:.0f} s, training about {duration(left)} left ({done}/{total} rounds)"
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
