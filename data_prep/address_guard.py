"""Refusing URLs whose host is, or resolves to, an address that is not on the public internet.

An untrusted URL list can point a crawler at loopback services, the private network it runs in, or a cloud
metadata endpoint (169.254.169.254). Hosts are resolved once per host and every resolved address must be global.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip


def is_public_address(address: str) -> bool:
    ip = _ip(address)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_link_local)


def parse_networks(networks: list[str] | tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDR strings ("127.0.0.1/32") as networks; ValueError names a bad one."""
    out = []
    for net in networks:
        try:
            out.append(ipaddress.ip_network(net, strict=False))
        except ValueError:
            raise ValueError(f"{net!r} is not an IP network (write e.g. 127.0.0.1/32 or 10.0.0.0/8)") from None
    return tuple(out)


def is_allowed_address(address: str, allowed_networks: tuple = ()) -> bool:
    """Public, or inside one of ``allowed_networks`` (explicit exceptions such as a local test server)."""
    if is_public_address(address):
        return True
    ip = _ip(address)
    return any(ip.version == net.version and ip in net for net in allowed_networks)


def refusal_reason(url: str, cache: dict[str, str | None] | None = None, allowed_networks: tuple = (),
                   resolve: bool = True) -> str | None:
    """None when ``url``'s host resolves only to public (or allowed) addresses; otherwise why it is refused.

    With ``resolve=False`` only address literals and localhost names are judged (no DNS lookup): what a list can
    be checked for up front at web scale, leaving names to the check every connection makes (data_prep.fetch).
    """
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return "malformed_url"
    if not host:
        return "malformed_url"
    try:  # an address literal needs no lookup
        return None if is_allowed_address(host, allowed_networks) else "private_address"
    except ValueError:
        pass
    if not resolve:
        local = host.lower().rstrip(".")
        return "private_address" if local == "localhost" or local.endswith(".localhost") else None
    if cache is not None and host in cache:
        return cache[host]
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        addresses = {info[4][0] for info in infos}
        reason = None if addresses and all(is_allowed_address(a, allowed_networks) for a in addresses) else "private_address"
    except (socket.gaierror, UnicodeError, ValueError):
        reason = "dns_failure"
    if cache is not None:
        cache[host] = reason
    return reason
