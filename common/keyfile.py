"""Private key files: mode 0600 from the moment they exist, never replaced by accident.

Writing the file and then ``chmod``-ing it leaves a window in which any local
user can read the key; opening it with ``O_CREAT | O_EXCL`` and mode 0600
closes that window and refuses an existing file, so a second ``certs`` or
``keygen`` cannot silently replace an enrolled or deployed key.  With
``force`` the new key goes to a fresh 0600 file that is then renamed over
the old one (atomic on POSIX: readers see the old key or the new one).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def write_private(path: Path, data: bytes, *, force: bool = False) -> None:
    """Create ``path`` holding ``data`` with mode 0600; refuse an existing file unless ``force``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    target = path if not force else path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise FileExistsError(
            f"{path}: exists; not overwritten (remove it, or pass --force to replace it)"
        ) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if force:
            os.replace(target, path)
    except BaseException:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
