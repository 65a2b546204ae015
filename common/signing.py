"""The coordinating site's bundle-signing key: Ed25519, PEM files.

The coordinating site signs each model bundle's manifest (which holds the
SHA-256 of every other member) with its private key; a hospital verifies
the signature against the public key it was given out of band before using
anything in the bundle.  So a bundle altered in transit or made by anyone
else is refused, checksums included.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.keyfile import write_private

__all__ = [
    "SigningKeyError",
    "create_signing_key",
    "fingerprint",
    "load_private_key",
    "load_public_key",
    "sign",
    "verify",
]


class SigningKeyError(ValueError):
    """A key file is missing, unreadable or not an Ed25519 key; the message names the file."""


def create_signing_key(path: Path) -> tuple[Path, Path]:
    """Write a new private key to ``path`` (mode 0600 from creation) and its public key to ``path.pub``.

    Refuses to overwrite either file: a replaced key would orphan every
    hospital's trusted copy of the old public key.
    """
    path = Path(path)
    public = path.with_name(path.name + ".pub")
    if public.exists():
        raise SigningKeyError(f"{public}: exists; remove it explicitly to make a new signing key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_private(path, pem)
    except FileExistsError:
        raise SigningKeyError(f"{path}: exists; remove it explicitly to make a new signing key") from None
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path, public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path}: cannot read the signing key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise SigningKeyError(f"{path}: cannot read the trusted public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path}: not an Ed25519 public key")
    return key


def fingerprint(key: Ed25519PublicKey) -> str:
    """Short SHA-256 of the raw public key, to say which key signed (or was expected)."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    return key.sign(data)


def verify(data: bytes, signature: bytes, key: Ed25519PublicKey) -> bool:
    try:
        key.verify(signature, data)
    except InvalidSignature:
        return False
    return True
