"""Client sources: what every per-address policy counts a client under.

A source is an IPv4 address, an IPv6 /64 (one host usually owns a whole /64
and its privacy addresses rotate inside it; an IPv4-mapped IPv6 address is the
IPv4 address), or ``local`` for every UNIX-socket client.  The connection
limits (``--max-per-ip``), the commands in flight (``--max-calls-per-ip``),
the worker threads' fair shares and the login penalties all count by it, so a
client cannot get around one of them by taking another address of its /64.
"""

from __future__ import annotations

import ipaddress
import math
from functools import lru_cache
from typing import Any

LOCAL = "local"  # the source of every UNIX-socket client
IPV6_PREFIX = 64  # IPv6 sources are networks of this size


def address_of(peer: str) -> str:
    """The client address of a peer as doors write it: ``127.0.0.1:5555`` →
    ``127.0.0.1``, ``[::1]:5555`` → ``::1``; ``local`` (UNIX sockets) as it is."""
    if peer.startswith("["):
        end = peer.find("]")
        return peer[1:end] if end > 0 else peer
    host, colon, port = peer.rpartition(":")
    return host if colon and port.isdigit() else peer


def ip_of(host: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address (an IPv4-mapped one as IPv4), or None (local, a name)."""
    if host is None or host == LOCAL:
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])  # no IPv6 zone index
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@lru_cache(maxsize=4096)
def source_key(host: str | None) -> str:
    """The source of a client at ``host``: ``10.0.0.7``, ``2001:db8:1:2::/64``, ``local``."""
    ip = ip_of(host)
    if ip is None:
        return LOCAL if host is None or host == LOCAL else host
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


def source_of(peer: str) -> str:
    """The source of a peer as doors write it (``[2001:db8::7]:5555`` →
    ``2001:db8::/64``)."""
    return source_key(address_of(peer))


class SourceReports:
    """Refusals counted per source and reported at most once per ``interval``
    seconds each: a flood of refused connections costs one audit record and one
    log line a second per source, not one each.  At most ``max_sources`` are
    remembered (all are forgotten past it: a report then comes early)."""

    def __init__(self, clock: Any, interval: float = 1.0, max_sources: int = 4096) -> None:
        self.clock = clock
        self.interval = interval
        self.max_sources = max_sources
        self._pending: dict[str, list[float]] = {}  # source -> [not reported, last report]

    def count(self, source: str) -> int:
        """Count one refusal of ``source``; how many to report now (this one and
        those not reported yet), or 0 within ``interval`` of the last report."""
        now = self.clock.seconds()
        entry = self._pending.get(source)
        if entry is None:
            if len(self._pending) >= self.max_sources:
                self._pending.clear()
            entry = self._pending[source] = [0, -math.inf]
        entry[0] += 1
        if now - entry[1] < self.interval:
            return 0
        count = int(entry[0])
        entry[0], entry[1] = 0, now
        return count

    def forget(self, source: str) -> None:
        self._pending.pop(source, None)
