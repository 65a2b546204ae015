"""TLS material for a federation: a private CA and the server certificate.

The SuperLink presents ``server.crt`` (signed by ``ca.crt``) and each
hospital's SuperNode trusts only ``ca.crt``.  The server certificate's
subject alternative names must list every name and address hospitals use to
reach the server (``localhost`` and ``127.0.0.1`` for loopback tests).
Uses the ``cryptography`` package that Flower already depends on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.keyfile import write_private


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey, force: bool) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_private(path, pem, force=force)


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_certificates(
    out_dir: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1"), days: int = 365, *, force: bool = False
) -> CertPaths:
    """Write ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` (keys created mode 0600).

    Refuses, before writing anything, when any of the four files exists:
    replacing ``ca.key`` silently would orphan every certificate it signed.
    ``force`` replaces them (each key atomically).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.crt", out_dir / "server.key")
    present = [str(p) for p in (paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key) if p.exists()]
    if present and not force:
        raise FileExistsError(f"{', '.join(present)}: exist; not overwritten (pass --force to issue new ones)")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sacral-fl federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    srv_key = _key()
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(paths.ca_key, ca_key, force)
    _write_key(paths.server_key, srv_key, force)
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    return paths


def existing(certs_dir: Path) -> CertPaths:
    """The certificate files of ``certs_dir``; raises naming the first one missing."""
    paths = CertPaths(certs_dir / "ca.crt", certs_dir / "ca.key", certs_dir / "server.crt", certs_dir / "server.key")
    for p in (paths.ca_cert, paths.server_cert, paths.server_key):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: TLS file missing (make them with `flower-server certs --out {certs_dir}`)")
    return paths
