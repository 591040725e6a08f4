"""Idle timeouts for all of a door's connections, with one reactor timer.

The connections of one door share one timeout, so ordering them by their last
activity orders them by deadline.  An insertion-ordered dict where a connection
that shows activity moves to the end keeps that order at O(1) a move, and one
timer, set for the oldest, is all it takes.  Against Twisted's ``TimeoutMixin``
(a ``DelayedCall`` per connection, reset on every read) this keeps about 300
bytes less per idle connection (bench/idle.py) and costs a dict move per read.

A connection is told through its ``timeoutConnection()``, as with the mixin; it
may ``touch`` itself there to stay (a long command is not idleness).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger

log = Logger()


class Expiring(Protocol):
    def timeoutConnection(self) -> None: ...


class IdleClock:
    """The last activity of each connection of a door, and the one timer."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self._last: dict[Expiring, float] = {}  # oldest activity first
        self._call: Any = None

    def __len__(self) -> int:
        return len(self._last)

    def touch(self, conn: Expiring) -> None:
        """``conn`` showed activity now (or started): its deadline is a timeout away."""
        last = self._last
        last.pop(conn, None)
        last[conn] = self.reactor.seconds()
        if self._call is None:
            self._arm()

    def forget(self, conn: Expiring) -> None:
        """``conn`` has ended, or no longer times out."""
        if self._last.pop(conn, None) is not None and not self._last and self._call:
            self._call.cancel()  # nothing left to watch: no timer left behind
            self._call = None

    def _arm(self) -> None:
        if not self._last:
            self._call = None
            return
        oldest = next(iter(self._last.values()))
        delay = max(0.0, oldest + self.timeout - self.reactor.seconds())
        self._call = self.reactor.callLater(delay, self._expire)

    def _expire(self) -> None:
        self._call = None
        deadline = self.reactor.seconds() - self.timeout
        expired = []
        for conn, last in self._last.items():
            if last > deadline:
                break
            expired.append(conn)
        for conn in expired:
            del self._last[conn]
        try:
            for conn in expired:
                try:
                    conn.timeoutConnection()  # may touch itself to stay
                except Exception:  # one connection's trouble is not the others'
                    log.failure("idle timeout of {conn!r}", conn=conn)
                    abort = getattr(getattr(conn, "transport", None), "abortConnection", None)
                    if abort is not None:
                        abort()
        finally:
            if self._call is None:
                self._arm()
