"""The experiment plan run by the server: folds x models x rounds, then evaluation.

:class:`PlanRunner` wires the roles together and runs the plan's phases in
order: the site registry finds the hospitals (``registry``), the messenger
carries every request and checks every reply (``messenger``), the fold
trainer runs Flower's rounds and predictions (``training``), the evaluator
fits the ensembles and pools the final statistics, the reader study and
DeLong (``evaluation``), and the summary writer writes ``summary.json``
(``summary``).  Leave-one-centre-out runs the plan once per held-out site.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.serverapp import Grid

from common.config import ExperimentConfig, to_dict
from common.protocol import ROLE_EXTERNAL, ROLE_TRAIN, Header
from common.readerstudy import MRMC_PREFIX

from .checkpoints import CheckpointStore
from .crosssite import CrossSiteEvaluation
from .evaluation import Evaluator
from .foldguard import external_folds
from .identity import SiteGate
from .messenger import Messenger
from .meteredgrid import MeteredGrid
from .progress import Progress
from .radiomicsfit import RadiomicsTrainer
from .registry import SiteNode, SiteRegistry
from .strategy import FederationError
from .summary import SummaryWriter
from .training import FoldTrainer

if TYPE_CHECKING:  # a name for annotations only: importing common.models would load torch and MONAI
    from common.models import ModelKind

log = logging.getLogger(__name__)


class PlanRunner:
    """Runs one experiment against the nodes connected to ``grid``."""

    def __init__(
        self,
        grid: Grid,
        cfg: ExperimentConfig,
        run_dir: Path,
        run_id: str,
        progress: Progress | None = None,
        gate: SiteGate | None = None,
    ) -> None:
        self.grid = MeteredGrid(grid)
        self.gate = gate or SiteGate(None)  # who may speak for which site (server/identity.py)
        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id = run_id
        self.progress = progress if progress is not None else Progress(cfg, run_dir)
        self.ckpt = CheckpointStore(run_dir / "checkpoints", cfg.digest())
        self.registry = SiteRegistry(cfg, self.gate)
        header = Header(experiment=to_dict(cfg), run_id=run_id)
        self.messenger = Messenger(self.grid, self.registry, header, cfg.federation.round_timeout_s)
        self.trainer = FoldTrainer(cfg, self.messenger, self.registry, self.ckpt, self.progress)
        self.radiomics = RadiomicsTrainer(self.messenger, self.registry, self.ckpt)
        self.evaluator = Evaluator(cfg, self.messenger, self.registry)
        self.writer = SummaryWriter(cfg, run_dir)
        self.selected: dict[str, dict[int, dict[str, Any]]] = {}

    @property
    def participation(self) -> dict[str, list[dict[str, Any]]]:
        return self.trainer.participation

    @property
    def devices(self) -> dict[str, dict[str, str]]:
        """Site -> where it trains, as it reported (common.device)."""
        return {s.site: s.device for s in self.registry.sites.values()}

    @property
    def unavailable(self) -> dict[str, str]:
        return self.registry.unavailable

    @property
    def rejected(self) -> dict[str, list[str]]:
        """Site -> its replies the checks dropped, with why (``server.replyguard``)."""
        return self.messenger.rejected

    def rejoin(self) -> dict[int, str]:
        """The training nodes, after identifying (and admitting) nodes that connected since discovery."""
        return self.registry.rejoin(self.messenger)

    def discover(self, expected: int, wait_s: float) -> dict[int, SiteNode]:
        return self.registry.discover(self.messenger, expected, wait_s)

    def train_fold(self, kind: ModelKind, fold: int) -> dict[str, Any]:
        return self.trainer.train_fold(kind, fold)

    def run(self, expected_sites: int, wait_s: float = 120.0) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            self.progress.phase(
                f"plan {self.cfg.plan}: waiting for {expected_sites} site(s), asking who they are"
            )
            self.discover(expected_sites, wait_s)
            sites = sorted(self.registry.sites.values(), key=lambda s: s.site)
            self.progress.phase(
                f"{len(sites)} site(s): {', '.join(f'{s.site} ({s.role})' for s in sites) or 'none'}"
            )
            if self.cfg.plan == "loco":
                return self.run_loco(t0)
            return self.run_plan(t0)
        finally:
            self.progress.close()

    def run_loco(self, t0: float) -> dict[str, Any]:
        """Leave-one-centre-out: one full pass per site, that site external, the others training."""
        passes: dict[str, Any] = {}
        held = sorted({s.site for s in self.registry.sites.values()})
        self.progress.repeat(len(held))
        for held_out in held:
            cfg = dataclasses.replace(self.cfg, plan="federated", external_sites=(held_out,))
            sub = PlanRunner(
                self.grid.inner,
                cfg,
                self.run_dir / f"loco-{held_out}",
                f"{self.run_id}-loco-{held_out}",
                self.progress,
                self.gate,
            )
            sub.registry.sites = {
                n: dataclasses.replace(s, role=ROLE_EXTERNAL if s.site == held_out else ROLE_TRAIN)
                for n, s in self.registry.sites.items()
            }
            log.info("leave-one-centre-out: %s held out", held_out)
            passes[held_out] = sub.run_plan(time.perf_counter())
        summary = {
            "plan": "loco",
            "config": self.cfg.name,
            "passes": passes,
            "wall_seconds": round(time.perf_counter() - t0, 1),
        }
        self.writer.write(summary)
        self.progress.phase(f"summary written: {self.writer.path}")
        return summary

    def run_plan(self, t0: float) -> dict[str, Any]:
        """Train every model and fold, predict, fit the ensembles, write ``summary.json``."""
        train = self.registry.nodes(ROLE_TRAIN)
        if len(train) < max(1, self.cfg.federation.min_sites):
            raise FederationError(
                f"{len(train)} training site(s) available ({', '.join(train.values()) or 'none'}), "
                f"federation.min_sites is {self.cfg.federation.min_sites}; unavailable: {self.registry.unavailable or 'none'}"
            )
        kinds = self.cfg.networks
        for kind in kinds:
            for fold in self.cfg.active_folds:
                best = self.trainer.train_fold(kind, fold)
                self.selected.setdefault(kind, {})[fold] = best
                auc = best["val_auc"]
                self.progress.phase(
                    f"{kind} fold {fold}: selected round {best['round']} (pooled validation AUC "
                    f"{'n/a' if auc is None else format(auc, '.4f')}); predicting at the training sites"
                )
                self.trainer.predict_fold(kind, fold, best, roles=(ROLE_TRAIN,))
            for fold in external_folds(self.selected[kind]):  # the selection guard's flagged folds stay out
                self.trainer.predict_fold(kind, fold, self.selected[kind][fold], roles=(ROLE_EXTERNAL,))
        if self.cfg.models.radiomics:
            self.progress.phase(
                f"radiomics: federated logistic regression, folds {list(self.cfg.active_folds)}"
            )
            for fold in self.cfg.active_folds:
                self.radiomics.fit_fold(fold)
        ev = self.evaluator
        self.progress.phase("evaluation: ensemble weights on pooled validation statistics")
        fitted = ev.fit_ensembles()
        self.progress.phase("evaluation: final pooled statistics")
        final = ev.final_statistics(fitted)
        self.writer.save_statistics(final)
        self.progress.phase("evaluation: reader study and DeLong")
        readers = ev.reader_statistics()
        exact = self.cfg.evaluation.min_cell_count <= 1 and self.cfg.evaluation.stats_noise <= 0
        if not exact:
            log.warning(
                "statistics are protected (min cell count / noise): DeLong's exact protocol is skipped"
            )
        delong = ev.delong_tests(final, readers, fitted) if exact else {}
        clinical = self.writer.clinical(final, ev.site_hists)
        thresholds = {s: float(v["threshold"]) for s, v in clinical["thresholds"].items()}
        if self.cfg.evaluation.cross_site and kinds:
            self.progress.phase(
                f"evaluation: cross-site ({kinds[0]}: local-only and global models at every site)"
            )
            cross = CrossSiteEvaluation(self.cfg, self.messenger, self.registry, self.ckpt, self.trainer)
            clinical["cross_site"] = cross.run(kinds[0], self.selected.get(kinds[0], {}))
        summary = self.writer.summary(
            final,
            fitted,
            time.perf_counter() - t0,
            registry=self.registry,
            selected=self.selected,
            participation=self.trainer.participation,
            grid=self.grid,
            thresholds=thresholds,
        )
        summary.update(clinical)
        summary["reader_study"] = ev.reader_summary(readers, delong)
        mrmc = ev.mrmc_summary(delong, exact)
        if mrmc is not None:
            summary["reader_study"]["mrmc"] = mrmc
        summary["delong"] = {k: v for k, v in delong.items() if not k.startswith(("readers/", MRMC_PREFIX))}
        summary["resumed"] = self.trainer.resumed
        summary["rejected_replies"] = self.messenger.rejected
        self.writer.write(summary)
        self.progress.phase(f"summary written: {self.writer.path}")
        return summary
