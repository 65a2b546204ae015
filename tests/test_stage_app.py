"""The Flower app bundle is built from a staged copy of the app, not from the whole repository."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

from server.superlink import stage_app

REPO = Path(__file__).resolve().parents[1]


def test_staged_app_bundles_the_apps_and_their_packages_only(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "stale.py").write_text("left from an earlier run\n")
    t0 = time.perf_counter()
    app = stage_app(REPO, tmp_path / "app")
    fab = build_fab_from_disk(app)
    seconds = time.perf_counter() - t0
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    assert {"client/app.py", "server/app.py", "common/records.py", "common/presets/quick.yaml"} <= names
    assert not any(n.startswith((".venv/", "runs/", "data/", "tests/", "bench/", "stale")) for n in names)
    assert seconds < 20, f"staging and building the bundle took {seconds:.1f} s"
