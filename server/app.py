"""The Flower ServerApp: reads the run config, runs the experiment plan.

Run config keys (``[tool.flwr.app.config]``, overridable with
``flwr run --run-config``): ``config-path`` (YAML file or preset name),
``run-dir`` (where checkpoints and results go), ``expected-sites`` and
``discovery-timeout`` (how long to wait for the hospitals to connect) and
``enrolment-file`` (the site -> key registry that ``flower-server run``
writes; without it any key may speak for a site not yet connected).
Sites and their roles come from the config's ``sites`` list; sites not
listed there join as training sites unless the plan says otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.configfile import load_config
from common.heap import imports_frozen, preload
from common.objectpull import SERVERAPP_MODULE, prompt_object_pulls

from .exitflush import prompt_exit_flush
from .identity import SiteGate
from .runner import PlanRunner

log = logging.getLogger(__name__)
app = ServerApp()

RUN_IMPORTS = ("torch.utils.tensorboard", "common.models")
"""What every plan imports before its first round (the progress event files; the model factory, MONAI):
imported at the start, with the collector paused and then frozen (``common.heap``)."""


def _progress_logging() -> None:
    """Send this project's INFO lines (round progress, resume, left-out sites) to the run's log.

    ``logging.basicConfig`` is not enough here: a dependency (Opacus) installs
    a root handler at import time, which makes it a no-op and leaves the root
    at WARNING.  Our loggers get their own handler and do not propagate, so
    Flower's lines (its own handler) are not duplicated either.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("server", "common"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured plan; any failure propagates so the run is marked failed."""
    with imports_frozen():
        preload(RUN_IMPORTS)
    rc = context.run_config
    cfg = load_config(str(rc.get("config-path") or "quick"))
    run_dir = Path(str(rc.get("run-dir") or "runs/server"))
    run_dir.mkdir(parents=True, exist_ok=True)
    _progress_logging()
    prompt_object_pulls(SERVERAPP_MODULE)  # a reply still uploading is fetched tenths of a second later, not 1 s
    prompt_exit_flush()  # the run is marked finished 0.2 s after its last log line, not 1 s
    enrolment = str(rc.get("enrolment-file") or "")  # absent: open enrolment (simulation, tests)
    gate = SiteGate(Path(enrolment) if enrolment else None)
    runner = PlanRunner(grid, cfg, run_dir, run_id=str(rc.get("run-id") or run_dir.name), gate=gate)
    expected = int(cast(int, rc.get("expected-sites", 0))) or len(cfg.sites) or 1
    runner.run(expected_sites=expected, wait_s=float(cast(float, rc.get("discovery-timeout", 120.0))))
