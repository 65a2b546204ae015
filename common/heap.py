"""The cyclic garbage collector around a process's large imports.

Importing torch, MONAI and Flower creates about half a million objects, and
CPython runs a full collection, which visits every one of them, each time the
long-lived generation grows by a quarter: a sixth of a hospital's preload CPU
(0.6 of 3.6 s on these cores) and about 7 s of the 90 s of CPU one bench
deployment spends (``perf``, 2026-12-05).  Those objects live as long as the
process, so the collector has nothing to find among them.

``imports_frozen`` pauses collection while they load and then moves them to the
collector's permanent generation (``gc.freeze``), which later collections skip.
In a process that forks a child per message (``client.warm``) this is also
what the ``gc.freeze`` documentation prescribes: a child's collections then no
longer write to, and so copy, the memory pages it shares with its parent.  The
few garbage cycles made during import (some thousand objects) are kept for good.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import time
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def imports_frozen() -> Iterator[None]:
    """No cyclic collection inside; everything alive on leaving is frozen, and collection resumes as before."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def preload(modules: Sequence[str]) -> float:
    """Import ``modules`` into this process (call it inside :func:`imports_frozen`); seconds taken."""
    t0 = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    return time.perf_counter() - t0
