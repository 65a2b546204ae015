"""The hospital's own minimum protections, which no server request can lower.

DP on or off, the small-cell threshold, the statistics noise and the score
grid's resolution all travel in the server's run config; left to the server,
the party they protect against would choose them.  A site states its floor
in its own folder (``SITE_DIR/privacy.yaml``) and/or its node config
(``privacy-*`` keys, e.g. ``flower-client run --node-config``); the stricter
value of each wins.  A request below the floor is refused: the reply is
``unavailable`` with the reason (which rule, the value asked and the floor),
and the site logs it.  The default floor asks nothing, so a site without one
behaves as before.

``privacy.yaml``::

    require_dp: true          # DP-SGD must be on
    max_epsilon: 8.0          # ... with a target epsilon at most this (0: any)
    min_cell_count: 5         # evaluation.min_cell_count at least this
    min_stats_noise: 0.0      # evaluation.stats_noise at least this
    max_bins: 1000            # evaluation.grid_bins (and any histogram grid) at most this (0: any)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.config import ExperimentConfig

log = logging.getLogger(__name__)

FLOOR_FILE = "privacy.yaml"


class PrivacyFloorViolation(RuntimeError):
    """The server asked for less protection than this site requires; the message says which rule."""


@dataclass(frozen=True)
class PrivacyFloor:
    """Minimum protections a site accepts (the defaults accept everything)."""

    require_dp: bool = False
    max_epsilon: float = 0.0
    min_cell_count: int = 0
    min_stats_noise: float = 0.0
    max_bins: int = 0

    def __post_init__(self) -> None:
        for f in ("max_epsilon", "min_cell_count", "min_stats_noise", "max_bins"):
            if getattr(self, f) < 0:
                raise ValueError(f"privacy floor {f} must be >= 0, got {getattr(self, f)!r}")

    @property
    def protects_statistics(self) -> bool:
        """Released histograms must be protected (then DeLong's exact step 2 is never answered)."""
        return self.min_cell_count > 1 or self.min_stats_noise > 0

    def stricter(self, other: PrivacyFloor) -> PrivacyFloor:
        """Each rule at the stricter of the two floors."""

        def low(a: float, b: float) -> float:  # a smaller cap, 0 meaning none
            return min(x for x in (a, b) if x > 0) if a > 0 or b > 0 else 0

        return PrivacyFloor(
            require_dp=self.require_dp or other.require_dp,
            max_epsilon=low(self.max_epsilon, other.max_epsilon),
            min_cell_count=max(self.min_cell_count, other.min_cell_count),
            min_stats_noise=max(self.min_stats_noise, other.min_stats_noise),
            max_bins=int(low(self.max_bins, other.max_bins)),
        )

    def violations(self, cfg: ExperimentConfig) -> list[str]:
        """Every rule the run config breaks (empty: the run may go on)."""
        out = []
        if self.require_dp and not cfg.dp.enabled:
            out.append("this site requires differential privacy (dp.enabled), the run has it off")
        if self.require_dp and self.max_epsilon > 0 and not 0 < cfg.dp.target_epsilon <= self.max_epsilon:
            out.append(
                f"dp.target_epsilon {cfg.dp.target_epsilon:g} must be in (0, {self.max_epsilon:g}] at this site"
            )
        ev = cfg.evaluation
        if self.min_cell_count > 1 and ev.min_cell_count < self.min_cell_count:
            out.append(
                f"evaluation.min_cell_count {ev.min_cell_count} is below this site's {self.min_cell_count}"
            )
        if self.min_stats_noise > 0 and ev.stats_noise < self.min_stats_noise:
            out.append(
                f"evaluation.stats_noise {ev.stats_noise:g} is below this site's {self.min_stats_noise:g}"
            )
        if self.max_bins > 0 and ev.grid_bins > self.max_bins:
            out.append(f"evaluation.grid_bins {ev.grid_bins} is above this site's {self.max_bins}")
        return out

    def check(self, cfg: ExperimentConfig, *, bins: int | None = None, step: str = "") -> None:
        """Raise :class:`PrivacyFloorViolation` when the request is below the floor.

        ``bins``: a histogram grid the message itself asks for (the ensemble search).
        """
        problems = self.violations(cfg)
        if bins is not None and self.max_bins > 0 and bins > self.max_bins:
            problems.append(f"a {bins}-bin histogram is above this site's {self.max_bins} bins")
        if step == "delong" and self.protects_statistics:
            problems.append("DeLong placement sums are not released when statistics must be protected")
        if problems:
            reason = "privacy floor: " + "; ".join(problems)
            log.warning("request refused (%s): %s", step or "run", reason)
            raise PrivacyFloorViolation(reason)


def _from_mapping(data: Mapping[str, Any], where: str) -> PrivacyFloor:
    fields = {f.name: f.type for f in dataclasses.fields(PrivacyFloor)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown privacy floor key {unknown[0]!r} (allowed: {sorted(fields)})")
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key == "require_dp":
            if isinstance(value, str):
                value = value.strip().lower() in ("1", "true", "yes", "on")
            kwargs[key] = bool(value)
        else:
            try:
                kwargs[key] = int(value) if key in ("min_cell_count", "max_bins") else float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: privacy floor {key} {value!r} is not a number") from None
    return PrivacyFloor(**kwargs)


def load_floor(data_dir: Path, node_config: Mapping[str, Any] | None = None) -> PrivacyFloor:
    """The site's floor: ``data_dir/privacy.yaml`` and ``privacy-<key>`` node-config entries, the stricter wins."""
    floor = PrivacyFloor()
    path = Path(data_dir) / FLOOR_FILE
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of privacy floor keys")
        floor = floor.stricter(_from_mapping(data, str(path)))
    node = {
        str(k)[len("privacy-") :].replace("-", "_"): v
        for k, v in (node_config or {}).items()
        if str(k).startswith("privacy-")
    }
    if node:
        floor = floor.stricter(_from_mapping(node, "node config"))
    return floor
