"""Differential privacy at a site: DP-SGD with Opacus and a per-site budget.

The privacy accountant's history (noise multiplier, sample rate, steps of
every round) is kept in the site's run folder, so the epsilon spent
accumulates across rounds and processes (a deployment starts a fresh
process per message).  A site whose budget (``dp.target_epsilon``) is
spent refuses to train further; the server then leaves it out with that
reason.  Models must use GroupNorm and non-in-place activations (the model
factory does both when ``norm`` is not ``batch``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from opacus import PrivacyEngine
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from .config import DPConfig

log = logging.getLogger(__name__)


class PrivacyBudgetExhausted(RuntimeError):
    """The site has spent its epsilon budget; it trains no more in this fold."""


@dataclass(frozen=True)
class PrivacyLedger:
    """Where a site keeps the accountant history of one (model, fold)."""

    path: Path

    def history(self) -> list[tuple[float, float, int]]:
        if not self.path.is_file():
            return []
        return [(float(a), float(b), int(c)) for a, b, c in json.loads(self.path.read_text())]

    def save(self, history: list[tuple[float, float, int]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(history))


def noise_multiplier(cfg: DPConfig, sample_rate: float, total_epochs: int) -> float:
    """The configured noise, or the noise that spends ``target_epsilon`` over the whole budget."""
    if cfg.target_epsilon > 0:
        return float(
            get_noise_multiplier(
                target_epsilon=cfg.target_epsilon,
                target_delta=cfg.delta,
                sample_rate=sample_rate,
                epochs=max(total_epochs, 1),
                accountant="rdp",
            )
        )
    return cfg.noise_multiplier


def epsilon_spent(history: list[tuple[float, float, int]], delta: float) -> float:
    if not history:
        return 0.0
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(history)
    return float(engine.get_epsilon(delta))


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    loader: DataLoader,  # type: ignore[type-arg]
    cfg: DPConfig,
    ledger: PrivacyLedger,
    total_epochs: int,
    epochs: int,
) -> tuple[nn.Module, Optimizer, DataLoader, PrivacyEngine]:  # type: ignore[type-arg]
    """Wrap model, optimiser and loader for DP-SGD, continuing the site's accountant history.

    Raises :class:`PrivacyBudgetExhausted` before any step when the ``epochs``
    about to run would take the epsilon spent past ``target_epsilon``.
    """
    history = ledger.history()
    spent = epsilon_spent(history, cfg.delta)
    sample_rate = 1.0 / max(len(loader), 1)
    sigma = noise_multiplier(cfg, sample_rate, total_epochs)
    if cfg.target_epsilon > 0:
        steps = epochs * max(len(loader), 1)
        projected = epsilon_spent([*history, (sigma, sample_rate, steps)], cfg.delta)
        if projected > cfg.target_epsilon * 1.001:
            raise PrivacyBudgetExhausted(
                f"privacy budget spent: epsilon {spent:.2f} so far, {projected:.2f} after this round > target {cfg.target_epsilon:g}"
            )
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = list(history)
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=cfg.max_grad_norm,
    )
    log.info("DP-SGD: noise multiplier %.3f, clipping %.3g, epsilon so far %.3f", sigma, cfg.max_grad_norm, spent)
    return model, optimizer, loader, engine


def finish(engine: PrivacyEngine, ledger: PrivacyLedger, delta: float, wrapped: nn.Module) -> float:
    """Persist the accountant history, unhook the model; return the total epsilon spent so far.

    Removing Opacus' hooks leaves the plain module (trained in place) reusable.
    """
    close = getattr(wrapped, "_close", None)
    if callable(close):
        close()
    ledger.save([(float(a), float(b), int(c)) for a, b, c in engine.accountant.history])
    return float(engine.get_epsilon(delta))
