"""Per-fold federated training state shared by the strategy and the plan runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common.protocol import Header, MessageSpec


@dataclass
class RoundLog:
    """What happened in one round, for the summary and the operators' log."""

    round: int
    trained: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    val_auc: float | None = None
    val_n: int = 0
    train_loss: float | None = None
    seconds: float = 0.0
    epsilon: dict[str, float] = field(default_factory=dict)


@dataclass
class FoldSession:
    """Everything the strategy must know about the fold it is training.

    Mutable on purpose: the strategy fills in the round logs and the pooled
    validation statistics of the rounds validated so far (``validated``);
    the plan runner reads them in its ``evaluate_fn`` to checkpoint and to
    select the best round.  Round r's model is validated by round r+1's
    train message (the last round's by one evaluate exchange), so its
    statistics arrive one round after its checkpoint; rounds before
    ``validate_from`` do not compete for selection and are not validated.
    """

    model: str
    fold: int
    train_nodes: dict[int, str]  # node id -> site name
    total_rounds: int
    round_offset: int
    header: Header
    transport_dtype: str = "float32"
    min_sites: int = 1
    norm_bound_factor: float = 10.0
    max_update_norm: float = 0.0  # absolute bound on an update's distance to the global model (0: off)
    site_patients: dict[str, int] = field(
        default_factory=dict
    )  # site -> patients it declared (bounds its replies)
    robust: str = "mean"
    trim_fraction: float = 0.2
    threshold: float = 0.5
    rounds: dict[int, RoundLog] = field(default_factory=dict)
    # global round -> its pooled validation histogram (None: no usable statistics); the plan pops them
    validated: dict[int, dict[str, Any] | None] = field(default_factory=dict)
    validate_first: bool = False  # round 1's train message validates its starting model (resume)
    validate_from: int = 1  # the first round whose model is validated (common.config.validated_round)
    refresh: Callable[[], dict[int, str]] | None = None  # the training nodes now (sites may rejoin)
    check: Callable[[MessageSpec, Any, str], None] | None = None  # the messenger's reply validators (spec, body, site)

    def log_for(self, server_round: int) -> RoundLog:
        r = server_round + self.round_offset
        if r not in self.rounds:
            self.rounds[r] = RoundLog(round=r)
        return self.rounds[r]

    def site_of(self, node_id: int) -> str:
        return self.train_nodes.get(node_id, f"node-{node_id}")
