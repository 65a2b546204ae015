"""Key files are born 0600 and never silently replaced; unsafe command lines are refused before anything starts."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.cli import main as client_main
from client.keys import make_keypair
from common.hosts import host_of, is_loopback
from common.keyfile import write_private
from common.signing import SigningKeyError, create_signing_key
from server.certs import make_certificates
from server.cli import main as server_main


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask() -> Iterator[None]:
    """umask 000: a file written then chmod-ed would be world-readable until the chmod."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("open_umask")
def test_private_files_are_created_0600_and_not_replaced(tmp_path: Path) -> None:
    key = tmp_path / "k"
    write_private(key, b"one")
    assert mode(key) == 0o600 and key.read_bytes() == b"one"
    with pytest.raises(FileExistsError, match="--force"):
        write_private(key, b"two")
    assert key.read_bytes() == b"one"
    write_private(key, b"three", force=True)
    assert mode(key) == 0o600 and key.read_bytes() == b"three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"]  # no temporary file left behind
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        write_private(link, b"x")  # a planted symlink is not followed
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.usefixtures("open_umask")
def test_the_bundle_signing_key_is_born_0600_and_never_replaced(tmp_path: Path) -> None:
    key, public = create_signing_key(tmp_path / "signing.key")
    assert mode(key) == 0o600
    before = key.read_bytes()
    public.unlink()  # only the private key left: still refused, not overwritten
    with pytest.raises(SigningKeyError, match=r"signing\.key: exists"):
        create_signing_key(key)
    assert key.read_bytes() == before


@pytest.mark.usefixtures("open_umask")
def test_certs_never_overwrites_the_ca_key_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "certs"
    assert server_main(["certs", "--out", str(out)]) == 0
    assert mode(out / "ca.key") == 0o600 and mode(out / "server.key") == 0o600
    ca_key, ca_crt = (out / "ca.key").read_bytes(), (out / "ca.crt").read_bytes()
    assert server_main(["certs", "--out", str(out)]) == 1
    assert "ca.key" in capsys.readouterr().err
    assert (out / "ca.key").read_bytes() == ca_key and (out / "ca.crt").read_bytes() == ca_crt
    assert server_main(["certs", "--out", str(out), "--force"]) == 0
    assert (out / "ca.key").read_bytes() != ca_key and mode(out / "ca.key") == 0o600
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "server.key").write_bytes(b"kept")
    with pytest.raises(FileExistsError):
        make_certificates(tmp_path / "half")
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["server.key"]  # nothing written


@pytest.mark.usefixtures("open_umask")
def test_hospital_key_pair_is_0600_and_named_by_a_plain_site_name(tmp_path: Path) -> None:
    private, _ = make_keypair(tmp_path, "centre1")
    assert mode(private) == 0o600
    with pytest.raises(FileExistsError):
        make_keypair(tmp_path, "centre1")
    for bad in ("../centre1", "/etc/x", "a b", ""):
        with pytest.raises(ValueError, match="site name"):
            make_keypair(tmp_path, bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["centre1", "centre1.pub"]


@pytest.mark.parametrize(
    ("host", "local"),
    [("127.0.0.1", True), ("127.8.9.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.0.0.5", False), ("fl.example.org", False),
     ("localhost.example.org", False)],
)  # fmt: skip
def test_loopback_hosts(host: str, local: bool) -> None:
    assert is_loopback(host) is local


def test_host_of_an_address() -> None:
    assert [host_of(a) for a in ("127.0.0.1:9092", "[::1]:9092", "server:9092", "fl")] == [
        "127.0.0.1", "::1", "server", "fl"
    ]  # fmt: skip


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = server_main(["run", "--config", "tiny", *argv])
    return rc, capsys.readouterr().err


def test_server_refuses_insecure_off_loopback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(
        ["--insecure", "--host", "0.0.0.0", "--open-enrolment", "--run-dir", str(tmp_path)], capsys
    )
    assert rc == 2 and "--insecure is for a test on this machine only" in err
    assert not list(tmp_path.iterdir())  # refused before anything was written or started


def test_server_requires_enrolment_unless_told_open(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = _run(["--insecure", "--run-dir", str(tmp_path)], capsys)
    assert rc == 2 and "enrolment is on by default" in err
    empty = tmp_path / "keys"
    empty.mkdir()
    rc, err = _run(["--insecure", "--enroll", str(empty), "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and "no <site>.pub key found" in err


def test_server_requires_tls_certificates_unless_told_insecure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = _run(["--open-enrolment", "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and "TLS is on by default: give --certs DIR" in err
    missing = tmp_path / "no-certs"
    rc, err = _run(["--open-enrolment", "--certs", str(missing), "--run-dir", str(tmp_path / "r")], capsys)
    assert rc == 2 and str(missing) in err
    assert not (tmp_path / "r").exists()  # refused before anything was written or started


def test_server_refuses_a_public_host_without_nginx(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("server.proxy.find_nginx", lambda: None)
    certs = make_certificates(tmp_path / "certs").ca_cert.parent
    rc, err = _run(
        ["--host", "0.0.0.0", "--certs", str(certs), "--open-enrolment", "--run-dir", str(tmp_path / "r")],
        capsys,
    )
    assert rc == 2 and "nginx not found: refusing to expose the SuperLink on 0.0.0.0" in err
    assert not (tmp_path / "r").exists()


def test_client_refuses_insecure_to_a_remote_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = client_main(["run", str(tmp_path), "--site", "centre1", "--server", "192.0.2.10:9092", "--insecure"])
    assert rc == 2 and "--insecure is for a test on this machine only" in capsys.readouterr().err


def test_client_refuses_a_malformed_approved_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = client_main(
        [
            "run",
            str(tmp_path),
            "--site",
            "c1",
            "--server",
            "127.0.0.1:1",
            "--insecure",
            "--approve-app",
            "abc",
        ]
    )
    assert rc == 2 and "an app digest is 64 hex digits" in capsys.readouterr().err


def test_enrolling_a_key_needs_a_server_that_runs_with_enrolment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, pub = make_keypair(tmp_path / "keys", "centre4")
    assert server_main(["enroll", str(pub), "--run-dir", str(tmp_path / "run")]) == 1
    assert "does not run with --enroll" in capsys.readouterr().err
