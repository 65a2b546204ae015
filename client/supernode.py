"""Flower's SuperNode, polling the SuperLink every ``--poll-interval`` seconds instead of every 3.

Flower 1.42's SuperNode loop (``flwr.supernode.start_client_internal``) waits
by sleeping: 3 s after every empty pull from the SuperLink, 0.5 s while it
waits for the ClientApp's reply and for the reply's contents.  Every message
of a run therefore starts on average 1.5 s (up to 3 s) after the server sent
it, and a round waits for the slowest of its sites: 2-3 s per exchange on
loopback, about a fifth of a short round (docs/benchmarks.md).  Flower has
no option for it, so this entry point runs Flower's own ``flower-supernode``
unchanged except that module's clock: each pull's sleep is cut to at most
``--poll-interval`` (each pull is one small request to the SuperLink), each
local wait to ``LOCAL_WAIT_S``.
Nothing else of the SuperNode changes (same arguments, TLS, authentication,
isolation).  On a Flower version this was not checked against, it warns and
runs the stock SuperNode.

While the server is down (between runs, or restarting) the SuperNode retries
its connection with exponential backoff up to Flower's 20 s, so a hospital
that stays connected joined a new run up to 20 s late; here the backoff stops
growing at ``RECONNECT_MAX_S`` (one small connection attempt every 2 s).
A message's objects still uploading to the SuperLink are asked for again
after tenths of a second, not Flower's 1 s (``common.objectpull``).

``python -m client.supernode [--poll-interval S] FLOWER-SUPERNODE-ARGS...``
(``flower-client run`` starts it).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from common.flowerpatch import flower_checked, replace_checked
from common.heap import imports_frozen
from common.objectpull import PULL_BACKOFF_S, SUPERNODE_MODULE, prompt_object_pulls

log = logging.getLogger("flower-client.supernode")

DEFAULT_POLL_S = 0.2
LOCAL_WAIT_S = 0.05
RECONNECT_MAX_S = 2.0
RETRY_MODULES = ("flwr.supercore.retry.http_retry", "flwr.supercore.retry.grpc_retry")  # read MAX_RETRY_DELAY per call


class PollingClock:
    """The ``time`` module, except that ``sleep`` waits at most ``poll_s`` seconds (``local_s`` for a local wait).

    The checked loop sleeps 3 s after an empty pull from the SuperLink (a request over
    the network: ``poll_s``) and 0.5 s at a time while it waits on its own in-memory state
    for the ClientApp's reply and that reply's contents (a dictionary lookup: ``local_s``,
    so the reply leaves within hundredths of a second of being ready, not a quarter second
    on average).  A wait shorter than 1 s is a local one.
    """

    def __init__(self, poll_s: float, local_s: float = LOCAL_WAIT_S) -> None:
        if not poll_s > 0 or not local_s > 0:
            raise ValueError(f"poll interval must be > 0 s, got {poll_s} (local waits {local_s})")
        self.poll_s = poll_s
        self.local_s = local_s

    def __getattr__(self, name: str) -> Any:  # everything but sleep: the real time module
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.local_s if seconds < 1 else self.poll_s))


def shorten_polling(poll_s: float) -> bool:
    """Make Flower's SuperNode loop poll every ``poll_s`` s; False (stock loop) on an unchecked version."""
    import flwr.supernode.start_client_internal as loop

    return replace_checked(
        loop, "time", time, PollingClock(poll_s), "its SuperNode loop runs unchanged (3 s idle polls)"
    )


def cap_reconnect_backoff(max_s: float = RECONNECT_MAX_S) -> list[str]:
    """Cap the delay between Flower's connection retries at ``max_s``; the modules changed."""
    import importlib

    changed: list[str] = []
    if not flower_checked():
        return changed
    for name in RETRY_MODULES:
        module = importlib.import_module(name)
        if isinstance(getattr(module, "MAX_RETRY_DELAY", None), (int, float)):
            module.MAX_RETRY_DELAY = min(module.MAX_RETRY_DELAY, max_s)  # type: ignore[attr-defined]
            changed.append(name)
    return changed


def split_args(argv: Sequence[str]) -> tuple[float, list[str]]:
    """``--poll-interval S`` (ours, anywhere) and the rest (Flower's)."""
    rest, poll_s, args = [], DEFAULT_POLL_S, list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--poll-interval":
            if not args:
                raise SystemExit("--poll-interval needs a value in seconds")
            value = args.pop(0)
        elif arg.startswith("--poll-interval="):
            value = arg.split("=", 1)[1]
        else:
            rest.append(arg)
            continue
        try:
            poll_s = float(value)
        except ValueError:
            raise SystemExit(f"--poll-interval: not a number of seconds: {value!r}") from None
        if not 0 < poll_s <= 3:
            raise SystemExit(f"--poll-interval must be in (0, 3] s, got {value}")
    return poll_s, rest


def main(argv: Sequence[str] | None = None) -> int:
    poll_s, rest = split_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per poll otherwise (REST fleet API)
    with imports_frozen():
        from flwr.supercore.logger import update_console_handler
        from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True)  # a site's log says when each message came and went

    if shorten_polling(poll_s):
        log.info("polling the SuperLink every %.2f s (Flower's SuperNode waits 3 s when idle)", poll_s)
    if prompt_object_pulls(SUPERNODE_MODULE):
        log.info("retrying a message's objects still uploading after %.2f s (Flower: 1 s, then 2, 4 ...)", PULL_BACKOFF_S)
    if cap_reconnect_backoff():
        log.info("reconnecting at least every %.0f s while the server is down (Flower: up to 20 s)", RECONNECT_MAX_S)
    sys.argv = ["flower-supernode", *rest]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
