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
(the same objects, checks, tries and time limit).  Version-gated by
``common.flowerpatch``.
"""

from __future__ import annotations

import functools
import importlib

from .flowerpatch import replace_checked

PULL_BACKOFF_S, PULL_BACKOFF_CAP_S = 0.05, 0.5
SUPERNODE_MODULE = "flwr.supernode.start_client_internal"  # a SuperNode's pulls from the SuperLink
SERVERAPP_MODULE = "flwr.superlink.grid.http_grid"  # a deployed ServerApp's pulls of the sites' replies


def prompt_object_pulls(module_name: str) -> bool:
    """Make ``module_name``'s ``pull_objects`` retry sooner; False (left as is, logged) on an unchecked Flower."""
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    prompt = functools.partial(pull_objects, initial_backoff=PULL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S)
    return replace_checked(
        importlib.import_module(module_name),
        "pull_objects",
        pull_objects,
        prompt,
        "object pulls keep Flower's 1 s backoff",
        done=lambda f: isinstance(f, functools.partial) and f.func is pull_objects,
    )
