"""A hospital's SuperNode identity: an ECDSA P-384 key pair in OpenSSH format.

The hospital keeps the private key; the coordinating site enrols the public
key (``flower-server run --enroll DIR`` or ``flower-server enroll``).  With
SuperNode authentication on, the SuperLink refuses any node whose key was
not enrolled.
"""

from __future__ import annotations

import re
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.keyfile import write_private


def make_keypair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``<name>`` (private, mode 0600) and ``<name>.pub``; refuse to overwrite."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ValueError(f"{name!r}: a site name is letters, digits, '.', '_' and '-' only")
    out_dir.mkdir(parents=True, exist_ok=True)
    private, public = out_dir / name, out_dir / f"{name}.pub"
    for p in (private, public):
        if p.exists():
            raise FileExistsError(f"{p}: exists; keep the enrolled key or remove it explicitly")
    key = ec.generate_private_key(ec.SECP384R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    write_private(private, pem)  # created 0600, never over an existing file
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode()
    )
    return private, public
