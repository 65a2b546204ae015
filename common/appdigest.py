"""The digest a hospital approves: what code a run ships, independent of how the bundle was zipped.

Flower packs the app (``pyproject.toml`` and the packages) into a FAB, a zip
file, and identifies it by the SHA-256 of the zip.  Zip bytes depend on the
zlib build that compressed them, so the same source can give two FAB
hashes on two machines.  The app digest is computed from the files
themselves: SHA-256 over the sorted ``path``, SHA-256 of content lines of
every member (the FAB's own ``.info/CONTENT`` manifest excluded: it is
what the sender claims, the members are what it sent).  A hospital computes
it from its own installed code (``flower-client app-digest``) and refuses
any run whose FAB has another.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import zipfile
from pathlib import Path

MANIFEST = ".info/CONTENT"
MAX_MEMBERS = 10_000


class AppDigestError(ValueError):
    """Not a readable FAB."""


def fab_digest(fab: bytes) -> str:
    """The app digest of a FAB's members (hex)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and i.filename != MANIFEST]
            if len(infos) > MAX_MEMBERS:
                raise AppDigestError(f"FAB has {len(infos)} members")
            lines = sorted(f"{i.filename},{hashlib.sha256(zf.read(i)).hexdigest()}" for i in infos)
    except (zipfile.BadZipFile, OSError, RuntimeError) as exc:
        raise AppDigestError(f"not a Flower app bundle: {exc}") from None
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def local_app_digest(repo: Path) -> str:
    """The digest of the app ``flower-server run`` would ship from the installation at ``repo``."""
    from flwr.cli.build import build_fab_from_disk

    from server.superlink import stage_app  # the same staging the server does

    if not (repo / "pyproject.toml").is_file():
        raise AppDigestError(
            f"{repo}: no pyproject.toml (install the project editable, or give the digest explicitly)"
        )
    with tempfile.TemporaryDirectory(prefix="sacral-app-") as tmp:
        app = stage_app(repo, Path(tmp) / "app")
        return fab_digest(build_fab_from_disk(app))
