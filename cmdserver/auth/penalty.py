"""Login penalties per source address, shared by every door.

In the spirit of OpenSSH's ``PerSourcePenalties``: each failed login from a
source adds penalty time to it, and while a source is penalised the doors
refuse its new connections before any work and its login attempts without
checking them (:class:`cmdserver.auth.gate.LoginGate` applies this).

A source is an IPv4 address, an IPv6 /64 or ``local``, as for every
per-address policy (:mod:`cmdserver.sources`).

The n-th failure counted against a source adds ``step * 2**(n-1)`` seconds
(1, 2, 4 … with the default step) to what is left of its penalty, which never
exceeds ``cap``.  Failures are forgiven one per ``cap`` seconds without a
failure, so an attacker at the cap stays there, while a user who mistyped a
few times is back to a clean slate minutes later.  A success forgives nothing:
otherwise an attacker with one valid account could clear their address between
guesses at the others.  A source with nothing left to forgive and no penalty
running is forgotten; at most ``max_sources`` are remembered (the one whose
last failure is oldest goes first).  Sources in the exempt networks are never
penalised.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cmdserver.sources import LOCAL, SourceReports, ip_of, source_key

MAX_SOURCES = 65536  # remembered at most (OpenSSH's max-sources default)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_exempt(values: Iterable[str]) -> tuple[tuple[Network, ...], bool]:
    """The exempt networks and whether ``local`` (UNIX sockets) is exempt.

    Each value is a network (``10.0.0.0/8``, ``2001:db8::/48``), an address
    (a network of one) or ``local``; raises ValueError naming a bad one."""
    networks: list[Network] = []
    local = False
    for value in values:
        if value.strip().lower() == LOCAL:
            local = True
            continue
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not a network (CIDR), an address or "
                             f"'{LOCAL}'") from None
    return tuple(networks), local


@dataclass(slots=True)
class Source:
    """What is remembered of one source."""

    strikes: int = 0  # failures not yet forgiven
    last: float = 0.0  # time of the last failure (forgiveness counts from here)
    until: float = 0.0  # penalised until then


class Penalties:
    """Penalty time per source (see the module's description)."""

    def __init__(self, clock: Any, step: float = 1.0, cap: float = 60.0,
                 exempt: Iterable[str] = (), max_sources: int = MAX_SOURCES,
                 report_interval: float = 1.0) -> None:
        self.clock = clock
        self.reports = SourceReports(clock, report_interval)  # refused connections
        self.step = step
        self.cap = max(cap, step)
        self.networks, self.local_exempt = parse_exempt(exempt)
        self.max_sources = max_sources
        # Enough failures for the cap, and one more so that it takes a while to leave it.
        self.max_strikes = 2 + (math.ceil(math.log2(self.cap / step)) if step > 0 else 0)
        self.sources: OrderedDict[str, Source] = OrderedDict()  # oldest last failure first

    def key(self, host: str | None) -> str | None:
        """The source of a client at ``host`` (None for a UNIX socket), or None if exempt."""
        if self.networks or self.local_exempt:
            ip = ip_of(host)
            if ip is None:
                if self.local_exempt and (host is None or host == LOCAL):
                    return None
            elif any(ip.version == net.version and ip in net for net in self.networks):
                return None
        return source_key(host)

    def remaining(self, key: str) -> float:
        """Seconds ``key`` stays penalised (0: not penalised)."""
        source = self.sources.get(key)
        if source is None:
            return 0.0
        return max(0.0, source.until - self.clock.seconds())

    def strikes(self, key: str) -> int:
        """Failures of ``key`` not forgiven yet."""
        source = self._current(key)
        return source.strikes if source is not None else 0

    def failure(self, key: str) -> float:
        """Count a failed login of ``key``; returns its penalty from now, in seconds."""
        if self.step <= 0:
            return 0.0
        now = self.clock.seconds()
        source = self._current(key) or Source()
        source.strikes = min(source.strikes + 1, self.max_strikes)
        source.last = now
        added = min(self.cap, self.step * 2 ** min(source.strikes - 1, 62))
        source.until = min(max(source.until, now) + added, now + self.cap)
        self.sources[key] = source
        self.sources.move_to_end(key)
        self._trim(now)
        return source.until - now

    def refused(self, key: str) -> int:
        """Count a connection of ``key`` refused for its penalty.

        Returns how many refusals to report now (this one and those not
        reported yet), at most once per report interval; else 0."""
        if key not in self.sources:
            return 0
        return self.reports.count(key)

    def __len__(self) -> int:
        return len(self.sources)

    def _current(self, key: str) -> Source | None:
        """``key``'s entry with what time forgave taken off (dropped if nothing is left)."""
        source = self.sources.get(key)
        if source is None:
            return None
        now = self.clock.seconds()
        forgiven = int((now - source.last) // self.cap)
        if forgiven > 0:
            source.strikes = max(0, source.strikes - forgiven)
            source.last += forgiven * self.cap
            if not source.strikes and source.until <= now:
                del self.sources[key]
                return None
        return source

    def _trim(self, now: float) -> None:
        """Forget sources that time forgave entirely, oldest first; keep at most max_sources."""
        while self.sources:
            oldest_key, oldest = next(iter(self.sources.items()))
            over = len(self.sources) > self.max_sources
            if not over and not (oldest.until <= now
                                 and now - oldest.last >= oldest.strikes * self.cap):
                break
            del self.sources[oldest_key]
