"""Flower's object pulls, retried in tenths of a second instead of whole seconds.

A Flower message becomes visible before all of its objects (the model's
chunks) have been uploaded behind it.  Whoever pulls it early, a SuperNode
fetching the server's request from the SuperLink or the ServerApp fetching a
site's reply, gets "object unavailable" and Flower 1.42's ``pull_objects``
retries after 1 s, then 2, 4 ... (up to 10 s).  On loopback the upload ends
within a few tenths of a second, so in the bench's deployment one site in
three waited about 1 s more for half of the model exchanges, and the round
with it (docs/benchmarks.md).  Here the same retries start at
``PULL_BACKOFF_S`` and stop growing at ``PULL_BACKOFF_CAP_S``: a few more
small requests while an upload finishes, nothing else of the pull changes
(the same objects, checks, tries and time limit).
"""

from __future__ import annotations

import functools
import importlib
import logging

log = logging.getLogger(__name__)

PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 0.5
CHECKED_FLWR = ("1.42.",)  # versions whose callers of pull_objects were read
SUPERNODE_MODULE = "flwr.supernode.start_client_internal"  # a SuperNode's pulls from the SuperLink
SERVERAPP_MODULE = "flwr.superlink.grid.http_grid"  # a deployed ServerApp's pulls of the sites' replies


def prompt_object_pulls(module_name: str) -> bool:
    """Make ``module_name``'s ``pull_objects`` retry sooner; False (left as is, logged) on an unchecked Flower."""
    import flwr
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    module = importlib.import_module(module_name)
    current = getattr(module, "pull_objects", None)
    if isinstance(current, functools.partial) and current.func is pull_objects:
        return True  # done before in this process
    if not flwr.__version__.startswith(CHECKED_FLWR) or current is not pull_objects:
        log.warning("flwr %s: %s's object pulls were not checked; left with Flower's 1 s backoff", flwr.__version__, module_name)
        return False
    prompt = functools.partial(pull_objects, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)
    module.pull_objects = prompt  # type: ignore[attr-defined]
    return True
