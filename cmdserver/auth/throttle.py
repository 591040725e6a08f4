"""The login throttle: failed logins cost the source address time."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def peer_host(peer: str) -> str:
    """The address part of a Context's peer (``1.2.3.4:5``, ``[::1]:5``, ``local``)."""
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    return peer.rsplit(":", 1)[0] if ":" in peer else peer


class LoginThrottle:
    """Per-address login delays: ``base * 2**(n-1)`` seconds after n consecutive failures.

    An address must wait that long before its next attempt is even checked, so
    parallel connections from one address gain nothing.  A success clears the
    address; a quiet ``forget`` seconds does too.  At most ``max_hosts`` are kept.
    """

    def __init__(self, clock: Any, base: float = 1.0, cap: float = 30.0,
                 forget: float = 900.0, max_hosts: int = 10000) -> None:
        self.clock = clock
        self.base = base
        self.cap = cap
        self.forget = forget
        self.max_hosts = max_hosts
        # host -> (consecutive failures, time of the last one, earliest next check)
        self._hosts: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def failures(self, host: str) -> int:
        entry = self._entry(host)
        return entry[0] if entry else 0

    def wait(self, host: str) -> float:
        """Seconds before an attempt from ``host`` may be checked."""
        entry = self._entry(host)
        return max(0.0, entry[2] - self.clock.seconds()) if entry else 0.0

    def failure(self, host: str) -> float:
        """Record a failure; returns the delay before it is answered."""
        now = self.clock.seconds()
        entry = self._entry(host)
        count = (entry[0] if entry else 0) + 1
        delay = min(self.cap, self.base * 2 ** (count - 1))
        self._hosts[host] = (count, now, now + delay)
        self._hosts.move_to_end(host)
        while len(self._hosts) > self.max_hosts:
            self._hosts.popitem(last=False)
        return delay

    def success(self, host: str) -> None:
        self._hosts.pop(host, None)

    def _entry(self, host: str) -> tuple[int, float, float] | None:
        entry = self._hosts.get(host)
        if entry is not None and self.clock.seconds() - entry[1] > self.forget:
            del self._hosts[host]
            return None
        return entry
