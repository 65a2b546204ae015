"""Atomic file replacement, the one way every module writes a file another process may read.

A reader (a restarted site, the ServerApp polling a registry, the next round
resuming its optimiser) must see either the previous file or the new one,
never a half-written one, and a failed write must leave no stray temporary
file.  The temporary file is created exclusively under a random name in the
target's folder, so two processes writing the same path never share one and
``os.replace`` stays on one file system.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_write(path: Path, *, mode_bits: int | None = None, fsync: bool = False) -> Iterator[IO[bytes]]:
    """Yield a binary file open on a temporary sibling of ``path``; on a clean exit it replaces ``path``.

    ``mode_bits`` sets the permissions exactly (0o600 for a site's private
    files); without it they are those of a plain ``open`` (0o666 less the
    umask).
    ``fsync`` flushes to disk before the rename (keys, caches that must
    survive a power cut).  On any exception the temporary file is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(tmp, flags, 0o666 if mode_bits is None else mode_bits)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        if mode_bits is not None:
            os.chmod(tmp, mode_bits)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes | str, *, mode_bits: int | None = None, fsync: bool = False) -> Path:
    """Replace ``path`` with ``data`` (text is written as UTF-8); see ``atomic_write``."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_write(path, mode_bits=mode_bits, fsync=fsync) as fh:
        fh.write(payload)
    return Path(path)
