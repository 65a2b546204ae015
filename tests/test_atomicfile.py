"""common.atomicfile: a reader sees the old file or the new one, and a failed write leaves no trace."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from common.atomicfile import atomic_write, write_atomic
from common.splits import fivefold, save_splits


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_replaces_and_creates_parent(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "memo.json"
    write_atomic(target, "first")
    write_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["memo.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path) -> None:
    target = tmp_path / "round3.npz"
    write_atomic(target, b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(target) as fh:
        fh.write(b"half a checkpo")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["round3.npz"]


def test_a_file_object_writer_gets_the_whole_payload(tmp_path: Path) -> None:
    target = tmp_path / "w.npz"
    with atomic_write(target, fsync=True) as fh:
        np.savez(fh, weights=np.arange(5, dtype=np.float32))
    with np.load(target) as z:
        np.testing.assert_array_equal(z["weights"], np.arange(5, dtype=np.float32))


def test_permissions_exact_when_given_else_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        plain = write_atomic(tmp_path / "plain", b"x")
        private = write_atomic(tmp_path / "private", b"x", mode_bits=0o600)
        shared = write_atomic(tmp_path / "shared", b"x", mode_bits=0o644)
    finally:
        os.umask(old)
    assert _mode(plain) == 0o644
    assert _mode(private) == 0o600
    assert _mode(shared) == 0o644


def test_a_planted_symlink_at_a_temporary_name_is_never_followed(tmp_path: Path) -> None:
    """Temporary names are random and opened exclusively: a link planted at the old fixed name is inert."""
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / ".manifest.csv.tmp").symlink_to(victim)
    write_atomic(tmp_path / "manifest.csv", "patient_id\n")
    assert victim.read_text() == "keep"
    assert (tmp_path / "manifest.csv").read_text() == "patient_id\n"


def test_site_splits_stay_private(tmp_path: Path) -> None:
    folds = fivefold([f"p{i}" for i in range(20)], [i % 2 for i in range(20)], folds=5, val_fraction=0.2, seed=0)
    path = tmp_path / "splits.json"
    save_splits(path, "centre1", folds)
    assert _mode(path) == 0o600
