"""Remembered file checks: a restart of ``flower-client run`` re-reads only the cases that changed.

Checking a case's image and mask (``common.filecheck``) reads both NIfTI
files whole; for a hospital with hundreds of full CTs that is minutes at every
start, although the files have not changed since the last one.  The memo
keeps each case's problems under a key made of everything they depend on: the
checks' version, the HU range, the patient id and each file's path as given
(the messages name both), and each file's resolved path, size, modification
time and inode.  Any change to a file
gives a new key, so the case is read again.

Results that may be transient are never kept: a missing file (a share not yet
mounted) and a check that raised.  The memo lives in the site's own output
folder, next to the preprocessing cache, and never leaves the site.  A memo
that cannot be read is ignored (logged) and rebuilt; it is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from .atomicfile import write_atomic
from .problems import Problem

log = logging.getLogger(__name__)

VALIDATION_MEMO = "validation-memo.json"  # its file name, in a site's output cache folder; never sent
MEMO_VERSION = 1  # bump whenever a file check in common.filecheck changes what it reports
TRANSIENT_CODES = frozenset({"missing_file", "check_failed"})


def _stat(path: Path) -> list[int] | None:
    try:
        st = path.resolve().stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def memo_path(out_dir: Path) -> Path:
    """Where a site keeps its memo: in its output folder, beside its preprocessing cache (``out_dir/cache``)."""
    return Path(out_dir) / "cache" / VALIDATION_MEMO


def site_memo(out_dir: Path) -> FileCheckMemo:
    """The memo a site keeps in its output folder (:func:`memo_path`), loaded."""
    return FileCheckMemo(memo_path(out_dir))


class FileCheckMemo:
    """Per-case file-check results, loaded from and saved to one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, list[dict[str, object]]] = {}
        self.reused = 0
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == MEMO_VERSION and isinstance(data.get("entries"), dict):
                    self.entries = data["entries"]
            except (OSError, ValueError, AttributeError) as exc:
                log.warning("%s: file-check memo unreadable (%s); every case is checked again", self.path, exc)

    @staticmethod
    def key(patient_id: str, image: Path, mask: Path, hu_range: tuple[float, float]) -> str | None:
        """The case's key, or None when a file cannot be stat'ed (then it is always checked)."""
        files = [(str(p), str(p.resolve()), _stat(p)) for p in (image, mask)]  # the path as given: messages name it
        if any(st is None for *_, st in files):
            return None
        blob = json.dumps([MEMO_VERSION, list(hu_range), patient_id, files])
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str | None) -> list[Problem] | None:
        """The remembered problems (possibly none), or None when the case must be checked."""
        found = self.entries.get(key) if key else None
        if found is None:
            return None
        try:
            problems = [Problem(**p) for p in found]  # type: ignore[arg-type]
        except TypeError:
            return None
        self.reused += 1
        return problems

    def put(self, key: str | None, problems: Sequence[Problem]) -> None:
        if key and not any(p.code in TRANSIENT_CODES for p in problems):
            self.entries[key] = [asdict(p) for p in problems]

    def save(self, keep: set[str] | None = None) -> None:
        """Write the memo (only the ``keep`` keys, when given: cases no longer in the manifest are dropped)."""
        entries = self.entries if keep is None else {k: v for k, v in self.entries.items() if k in keep}
        try:
            write_atomic(self.path, json.dumps({"version": MEMO_VERSION, "entries": entries}))
        except OSError as exc:
            log.warning("%s: file-check memo not written (%s); the next start checks every case", self.path, exc)
