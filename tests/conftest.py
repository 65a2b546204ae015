"""Shared fixtures: the real CT files under ../shared and a tiny synthetic cohort."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.loopback import Loopback

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_ct() -> Path:
    """Folder of real public CT files; tests needing them skip, saying why, outside this workplace."""
    path = SHARED / "data" / "ct"
    if not path.is_dir():
        pytest.skip(f"real CT files not found at {path} (a clone outside the workplace has no ../shared)")
    return path


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic cohort at its floor size (20 patients per centre), generated once per session."""
    from simulation.synth import generate_cohort

    out = tmp_path_factory.mktemp("tiny-cohort")
    generate_cohort(out, scale=0.0, seed=0)
    return out


@pytest.fixture(scope="session")
def cohort(tiny_cohort: Path) -> dict[str, Path]:
    """The tiny cohort's three centres as site folders (modules with other sites define their own)."""
    return {s: tiny_cohort / s for s in ("centre1", "centre2", "centre3")}


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the flwr-serverapp process sets before running a ServerApp (messages need a run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[Loopback]:
    """Real flower-server/flower-client processes on 127.0.0.1 (tests/loopback.py).

    At teardown every command is stopped as an operator would (SIGTERM to the
    command only); the test fails if any process it started, at any depth,
    is still running afterwards.
    """
    from tests.loopback import Loopback

    lb = Loopback(tmp_path)
    yield lb
    left = lb.stop()
    assert not left, "processes still running after their commands were stopped:\n" + "\n".join(
        f"  {pid}: {cmd}" for pid, cmd in left.items()
    )
