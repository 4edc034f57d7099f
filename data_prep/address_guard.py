"""Refusing URLs whose host is, or resolves to, an address that is not on the public internet.

An untrusted URL list can point a crawler at loopback services, the private network it runs in, or a cloud
metadata endpoint (169.254.169.254). Hosts are resolved once per host and every resolved address must be global.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local)


def refusal_reason(url: str, cache: dict[str, str | None] | None = None) -> str | None:
    """None when ``url``'s host resolves only to public addresses; otherwise why the URL is refused."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return "malformed_url"
    if not host:
        return "malformed_url"
    try:  # an address literal needs no lookup
        return None if is_public_address(host) else "private_address"
    except ValueError:
        pass
    if cache is not None and host in cache:
        return cache[host]
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        addresses = {info[4][0] for info in infos}
        reason = None if addresses and all(is_public_address(a) for a in addresses) else "private_address"
    except (socket.gaierror, UnicodeError, ValueError):
        reason = "dns_failure"
    if cache is not None:
        cache[host] = reason
    return reason
