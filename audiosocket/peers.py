"""
Who may connect to an AudioSocket port: the one rule, used by the listeners (L{LegFactory})
and by the config (C{ServerConfig.peer_allowed}), so the two can never disagree.

C{[server] allowed_peers} lists addresses and networks. A peer is allowed when its address
is in one of them, after two normalisations a listener on C{"::"} makes necessary:

  - an IPv4 peer reaches a dual-stack C{"::"} listener as an IPv4-mapped IPv6 address
    (C{::ffff:10.0.0.5}); it is judged as the IPv4 address it carries (C{10.0.0.5});
  - a link-local IPv6 peer carries its zone (C{fe80::1%eth0}); the zone is dropped before the
    comparison (C{allowed_peers} names addresses, not interfaces).

An empty list allows any peer; the config refuses an empty list on a non-loopback C{bind}.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

__all__ = ["Network", "is_loopback", "networks", "peer_allowed"]


def networks(peers: Iterable[str]) -> tuple[Network, ...]:
    """C{allowed_peers} as written (addresses or networks) → networks (an address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(peer, strict=False) for peer in peers)


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def peer_allowed(host: str | None, allowed: Iterable[Network]) -> bool:
    """
    May a peer at C{host} connect to an AudioSocket port?

    @param host: the peer's address as C{transport.getPeer().host} gives it; L{None} for a
        UNIX socket peer (local by construction: allowed).
    @param allowed: the allowed networks (L{networks}); empty allows any peer.
    """
    allowed = tuple(allowed)
    if not allowed or host is None:
        return True
    try:
        ip = _address(host)
    except ValueError:
        return False
    return any(ip.version == net.version and ip in net for net in allowed)


def is_loopback(host: str) -> bool:
    """Is C{host} (an address, possibly IPv4-mapped) a loopback address?"""
    try:
        return _address(host).is_loopback
    except ValueError:
        return False
