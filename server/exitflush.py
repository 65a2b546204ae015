"""The ServerApp's exit without Flower's fixed one-second wait after its last log upload.

As a Flower 1.42 ServerApp runtime exits (``flwr-serverapp`` in a deployment,
``flwr-simulation`` in a simulation) it calls ``flush_logs``: that waits until
the log uploader has taken every queued line, then sleeps 1 s more "to allow
the PushLogs call to complete", and only then pushes the task's output, which
is what marks the run finished.  The upload is one request to the SuperLink
on the coordinating site's own machine (milliseconds), so every run ended a
second after its summary was written (docs/benchmarks.md).  Here the same
wait for the queue, then ``SETTLE_S``, the uploader's own interval between
uploads (it takes the queued lines and pushes them within it).  A push slower
than that still completes: the runtime stops the uploader and joins it (up to
3 s) after pushing the output; its lines then reach the SuperLink after the
run is marked finished and may be missing from ``flwr run``'s log stream
(``flower.log``), never from the run folder's summary or progress log.
Version-gated by ``common.flowerpatch``.
"""

from __future__ import annotations

import sys
import time
from queue import Queue

from common.flowerpatch import replace_checked

RUNTIME_MODULES = ("flwr.superlink.runtime.run_serverapp", "flwr.simulation.app")
SETTLE_S = 0.2  # flwr.common.constant.LOG_UPLOAD_INTERVAL in the checked versions
POLL_S = 0.02


def prompt_flush(log_queue: Queue[str | None], timeout: float = 3.0) -> bool:
    """Flower's ``flush_logs`` with ``SETTLE_S`` instead of 1 s after the queue empties; False on timeout."""
    deadline = time.monotonic() + timeout
    while not log_queue.empty():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    time.sleep(max(0.0, min(SETTLE_S, deadline - time.monotonic())))
    return True


def prompt_exit_flush() -> list[str]:
    """Give the runtime modules loaded in this process ``prompt_flush``; the modules changed.

    Only modules already imported are touched (the one running this ServerApp),
    so a deployment never imports the simulation's runtime or the reverse.
    """
    from flwr.supercore.logger import flush_logs

    return [
        name
        for name in RUNTIME_MODULES
        if name in sys.modules
        and replace_checked(sys.modules[name], "flush_logs", flush_logs, prompt_flush, "its exit keeps Flower's 1 s wait")
    ]
