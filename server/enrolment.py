"""Which hospital key belongs to which site: the coordinating site's enrolment registry.

``flower-server run --enroll DIR`` reads one ``<site>.pub`` per hospital
(``flower-client keygen --site <site>`` writes it), registers each key with
the SuperLink (so that only these keys can connect) and records
site -> key fingerprint in ``enrolment.json`` in the run folder.  The
ServerApp reads it to check that a node speaks for the site its key was
enrolled for (``server/identity.py``).  Fingerprints are SHA-256 of the
key's DER SubjectPublicKeyInfo, the same whether the key comes as the
hospital's OpenSSH ``.pub`` line or as the PEM the SuperLink stores.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from common.atomicfile import write_atomic

SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class EnrolmentError(ValueError):
    """A key or a registry that cannot be used as it is."""


def key_fingerprint(public_key: bytes) -> str:
    """SHA-256 (hex) of a public key given as PEM (Flower's form) or as an OpenSSH line (a ``.pub`` file)."""
    data = public_key.strip()
    try:
        if data.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise EnrolmentError(f"not a public key: {exc}") from None
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Enrolment:
    """Site name -> fingerprint of the one key enrolled for it; no key serves two sites."""

    sites: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for site in self.sites:
            if not SITE_NAME.fullmatch(site):
                raise EnrolmentError(f"{site!r}: a site name is letters, digits, '.', '_' and '-' only")
        seen: dict[str, str] = {}
        for site, fp in self.sites.items():
            if fp in seen:
                raise EnrolmentError(f"one key enrolled for two sites: {seen[fp]} and {site}")
            seen[fp] = site
        object.__setattr__(self, "sites", MappingProxyType(dict(self.sites)))

    def site_of(self, fingerprint: str) -> str | None:
        """The site this key was enrolled for, or None when it was not enrolled."""
        return next((s for s, fp in self.sites.items() if fp == fingerprint), None)

    def with_key(self, site: str, public_key: bytes) -> Enrolment:
        """This registry plus ``site``'s key; a site keeps the key it has (refused: a second key)."""
        fp = key_fingerprint(public_key)
        if site in self.sites and self.sites[site] != fp:
            raise EnrolmentError(f"site {site} already has another key enrolled; a site has one key")
        return Enrolment({**self.sites, site: fp})

    @classmethod
    def from_key_dir(cls, folder: Path) -> Enrolment:
        """One ``<site>.pub`` per hospital in ``folder``; the file name is the site the key speaks for."""
        registry = cls()
        for pub in sorted(folder.glob("*.pub")):
            try:
                registry = registry.with_key(pub.stem, pub.read_bytes())
            except EnrolmentError as exc:
                raise EnrolmentError(f"{pub}: {exc}") from None
        return registry

    @classmethod
    def load(cls, path: Path) -> Enrolment:
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise EnrolmentError(f"{path}: not an enrolment registry ({exc})") from None
        sites = data.get("sites") if isinstance(data, dict) else None
        if not isinstance(sites, dict) or not all(isinstance(v, str) for v in sites.values()):
            raise EnrolmentError(f"{path}: not an enrolment registry")
        return cls(dict(sites))

    def save(self, path: Path) -> None:
        """Written to a temporary file and renamed: the ServerApp never reads half a registry."""
        write_atomic(path, json.dumps({"sites": dict(self.sites)}, indent=2, sort_keys=True) + "\n")
