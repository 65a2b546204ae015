"""Which addresses stay on this machine: ``--insecure`` (no TLS) is allowed only there."""

from __future__ import annotations

import ipaddress


def host_of(address: str) -> str:
    """The host part of ``HOST:PORT`` (``[v6]:PORT`` too); ``address`` itself when it has no port."""
    if address.startswith("["):
        return address[1 : address.index("]")]
    if address.count(":") == 1:
        return address.rsplit(":", 1)[0]
    return address


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, no port) is this machine's loopback interface only.

    ``localhost`` counts; ``0.0.0.0``/``::`` (every interface), other names
    and other addresses do not: a name could resolve anywhere.
    """
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
