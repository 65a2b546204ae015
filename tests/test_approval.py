"""The app digest a hospital approves: from the FAB's files, not its zip bytes; any change is a different app."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from client.approval import DIGEST, refusal
from common.appdigest import MANIFEST, fab_digest, local_app_digest
from server.superlink import stage_app

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fab(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The FAB `flower-server run` ships (`flwr run` builds it the same way from the staged app)."""
    return build_fab_from_disk(stage_app(REPO, tmp_path_factory.mktemp("stage") / "app"))


def rezip(
    fab: bytes, change: dict[str, bytes | None] | None = None, compression: int = zipfile.ZIP_DEFLATED
) -> bytes:
    """The FAB's members written again (another compression; ``change``: member -> new bytes or None to drop)."""
    change = change or {}
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(fab)) as src, zipfile.ZipFile(out, "w", compression) as dst:
        for info in src.infolist():
            data = change.get(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
        for name, data in change.items():
            if name not in src.namelist() and data is not None:
                dst.writestr(name, data)
    return out.getvalue()


def test_local_digest_is_the_digest_of_the_fab_the_server_ships(fab: bytes) -> None:
    digest = local_app_digest(REPO)
    assert DIGEST.fullmatch(digest) and fab_digest(fab) == digest


def test_digest_ignores_compression_and_the_senders_manifest(fab: bytes) -> None:
    digest = fab_digest(fab)
    assert fab_digest(rezip(fab, compression=zipfile.ZIP_STORED)) == digest
    assert (
        fab_digest(rezip(fab, {MANIFEST: b"client/app.py,0000,0"})) == digest
    )  # a lying manifest changes nothing


def test_any_change_to_the_code_is_another_app(fab: bytes) -> None:
    digest = fab_digest(fab)
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        app = zf.read("client/app.py")
    assert fab_digest(rezip(fab, {"client/app.py": app + b"\nimport os; os.system('id')\n"})) != digest
    assert fab_digest(rezip(fab, {"client/extra.py": b"print('hi')\n"})) != digest
    assert fab_digest(rezip(fab, {"server/app.py": None})) != digest


def test_refusal_says_why_and_accepts_only_the_approved_app(fab: bytes) -> None:
    digest = fab_digest(fab)
    assert refusal(fab, digest) == ""
    other = "0" * 64
    reason = refusal(fab, other)
    assert reason.startswith("app not approved at this site") and digest in reason and other in reason
    assert refusal(b"not a zip file", digest).startswith(
        "app not approved at this site: not a Flower app bundle"
    )
