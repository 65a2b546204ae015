#!/usr/bin/env python3
"""Write ``requirements.lock`` (exact versions, one SHA-256 per file) from a ``pip install --report``.

``make lock`` runs ``pip install --dry-run --ignore-installed --report`` for
the project with ``torch==2.13.0`` (the CPU build) and the build backend,
then this script keeps every resolved distribution but the project itself,
each with the hash of the file pip chose.  The image installs it with
``pip install --require-hashes --no-deps`` (deploy/Dockerfile).  The files
chosen are those for the machine that ran it: CPython 3.11 on
linux/x86_64, the image's platform.  Standard library only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = """\
# Hashed lock file of the image's dependencies (deploy/Dockerfile), for CPython 3.11
# on linux/x86_64 (python:3.11-slim).  Made by `make lock` (deploy/make_lock.py);
# do not edit by hand.  torch is the CPU build (from the PyTorch CPU index).
"""


def lock_lines(report: dict[str, object], skip: set[str]) -> list[str]:
    """``name==version --hash=sha256:...`` per distribution pip resolved, sorted by name."""
    lines = []
    for item in report["install"]:  # type: ignore[attr-defined]
        meta, info = item["metadata"], item["download_info"]
        name = str(meta["name"])
        if name.lower() in skip:
            continue
        digest = (info.get("archive_info") or {}).get("hashes", {}).get("sha256")
        if not digest:
            raise SystemExit(f"{name}: pip reported no sha256 for {info.get('url')}: cannot lock it")
        lines.append(f"{name}=={meta['version']} \\\n    --hash=sha256:{digest}")
    return sorted(lines, key=str.lower)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: make_lock.py PIP_REPORT.json OUT.lock", file=sys.stderr)
        return 2
    report = json.loads(Path(argv[1]).read_text())
    lines = lock_lines(report, skip={"sacral-fl"})
    Path(argv[2]).write_text(HEADER + "\n".join(lines) + "\n")
    print(f"{argv[2]}: {len(lines)} distributions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
