"""Private key files: mode 0600 from the moment they exist, never replaced by accident.

Writing the file and then ``chmod``-ing it leaves a window in which any local
user can read the key; opening it with ``O_CREAT | O_EXCL`` and mode 0600
closes that window and refuses an existing file, so a second ``certs`` or
``keygen`` cannot silently replace an enrolled or deployed key.  With
``force`` the new key replaces the old one through ``common.atomicfile``
(a fresh 0600 file renamed over it: readers see the old key or the new one).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .atomicfile import write_atomic


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Create ``path`` holding ``data`` with mode 0600; refuse an existing file unless ``force``."""
    if force:
        write_atomic(path, data, mode_bits=0o600, fsync=True)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path}: exists; not overwritten (remove it, or pass --force to replace it)"
        ) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            path.unlink()
        raise
