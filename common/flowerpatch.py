"""Flower internals this project changes, only on the Flower version whose code was read.

Flower 1.42 has no setting for three of its waits, so three modules replace one
attribute of a Flower module each: the SuperNode loop's clock
(``client.supernode``), the backoff of object pulls (``common.objectpull``) and
the runtimes' exit flush (``server.exitflush``).  Each does it through
:func:`replace_checked`: only when the installed Flower is one those modules were
read against (``CHECKED_FLWR``) and the attribute is still Flower's own;
otherwise it logs why and leaves Flower as it is.  Upgrading Flower means
re-reading the three, then extending ``CHECKED_FLWR`` here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType

log = logging.getLogger(__name__)

CHECKED_FLWR = ("1.42.",)


def flower_checked() -> bool:
    """Whether the installed Flower is a version whose changed internals were read."""
    import flwr

    return str(flwr.__version__).startswith(CHECKED_FLWR)


def replace_checked(
    module: ModuleType,
    name: str,
    stock: object,
    replacement: object,
    what: str,
    *,
    done: Callable[[object], bool] | None = None,
) -> bool:
    """Set ``module.name`` to ``replacement`` where it is still ``stock`` on a checked Flower; True if ours now.

    ``done`` tells a replacement made before in this process (default: identity), so a
    second call changes nothing.  An unchecked version, or an attribute someone else
    changed, is left alone with a warning naming ``what`` stays as Flower has it.
    """
    import flwr

    current = getattr(module, name, None)
    if (done or (lambda value: value is replacement))(current):
        return True
    if not flower_checked() or current is not stock:
        log.warning("flwr %s: %s.%s was not checked; %s", flwr.__version__, module.__name__, name, what)
        return False
    setattr(module, name, replacement)
    return True
