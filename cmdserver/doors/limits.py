"""Connection limits shared by every door: in total and per client address,
and the refusal of penalised addresses.

Twisted's ``LimitConnectionsByPeer`` indexes the address like a tuple, which
today's ``IPv4Address`` does not support, so the count is kept here, keyed on
``addr.host``.  One :class:`ConnectionLimits` is shared by all doors, so an SSH
connection and a line connection from one host count against the same limit.

Every door's factory is wrapped in a :class:`LimitedFactory`, so this is also
where a new connection from an address the login gate penalises is refused,
before the door's protocol exists: no session, no banner, no protocol exchange.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    INegotiated,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import alsoProvides

from cmdserver.sources import SourceReports, source_key
from cmdserver.stats import Stats

log = Logger()

TOO_MANY_CONNECTIONS = "Too many connections"
# What a door says to a connection it refuses: fixed bytes, or words made from the reason.
Refusal = bytes | Callable[[str], bytes] | None


def peer_host(addr: IAddress | None) -> str | None:
    """The client's host; None for local (UNIX) sockets."""
    return getattr(addr, "host", None)


def format_peer(addr: IAddress | None) -> str:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is None:
        return "local"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnectionLimits:
    """Counts open connections; refuses past ``max_total`` or ``max_per_host``."""

    def __init__(self, max_total: int, max_per_host: int) -> None:
        self.max_total = max_total
        self.max_per_host = max_per_host
        self.total = 0
        self.per_host: Counter[str] = Counter()

    def acquire(self, host: str | None) -> bool:
        """Count a connection from ``host`` (None: a UNIX socket, in the total only),
        or False past a limit.  Per host means per source (an IPv6 /64 is one)."""
        if self.total >= self.max_total:
            return False
        if host is not None:
            source = source_key(host)
            if self.per_host[source] >= self.max_per_host:
                return False
            self.per_host[source] += 1
        self.total += 1
        return True

    def release(self, host: str | None) -> None:
        self.total -= 1
        if host is not None:
            source = source_key(host)
            self.per_host[source] -= 1
            if not self.per_host[source]:
                del self.per_host[source]


class _Refusal(Protocol):
    """Says why (if the door has words for it) and hangs up.

    On a TLS door (its transport is Twisted's TLS layer) it says nothing: words
    could only go out after a TLS handshake, which is work a refused client does
    not get.  Closed before the handshake, the client sees the connection end.
    """

    transport: ITransport  # set in makeConnection, before connectionMade

    def __init__(self, message: bytes | None) -> None:
        self.message = message

    def connectionMade(self) -> None:
        if self.message and not INegotiated.providedBy(self.transport):
            self.transport.write(self.message)
        self.transport.loseConnection()  # TLS: aborted at once, no handshake


class _Counted(ProtocolWrapper):
    """Remembers the host it was counted under, for an exact release.

    Twisted's ``ProtocolWrapper`` drops half-close; this one passes it on when the
    wrapped protocol supports it (``printf 'ping\n' | nc -N host port``).
    """

    host: str | None = None

    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)  # this resets what self directly provides
        if IHalfCloseableProtocol.providedBy(self.wrappedProtocol):
            alsoProvides(self, IHalfCloseableProtocol)

    def readConnectionLost(self) -> None:
        # Called only when the wrapped protocol provides it (see makeConnection).
        cast(IHalfCloseableProtocol, self.wrappedProtocol).readConnectionLost()

    def writeConnectionLost(self) -> None:
        cast(IHalfCloseableProtocol, self.wrappedProtocol).writeConnectionLost()


class LimitedFactory(WrappingFactory[_Counted]):
    """Wraps a door's factory; counts its connections against shared limits."""

    protocol = _Counted
    noisy = False

    def __init__(self, wrapped: Factory[Any], limits: ConnectionLimits, stats: Stats,
                 door: str, refusal: Refusal = None, gate: Any = None) -> None:
        super().__init__(wrapped)
        self.limits = limits
        self.stats = stats
        self.door = door
        self.refusal = refusal
        self.gate = gate  # the core's LoginGate: refuses penalised addresses
        self.refusals: SourceReports | None = None  # refused connections, to report

    def words(self, reason: str) -> bytes | None:
        """What the door says when it refuses a connection for ``reason``."""
        return self.refusal(reason) if callable(self.refusal) else self.refusal

    def logPrefix(self) -> str:
        return self.door

    def buildProtocol(self, addr: IAddress | None) -> Any:
        host = peer_host(addr)
        if self.gate is not None:
            why = self.gate.connection_refusal(self.door, host, format_peer(addr))
            if why is not None:  # counted and audited by the gate
                self.stats.refused += 1
                return _Refusal(self.words(why[0].upper() + why[1:]))
        if not self.limits.acquire(host):
            self.stats.refused += 1
            self._report_refusal(host, format_peer(addr))
            return _Refusal(self.words(TOO_MANY_CONNECTIONS))
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:  # the door declined the connection itself
            self.limits.release(host)
            return None
        wrapper = self.protocol(self, inner)
        wrapper.host = host
        self.stats.connection_opened(self.door)
        return wrapper

    def _report_refusal(self, host: str | None, peer: str) -> None:
        """A connection refused by the limits: in the audit log and the main log, at
        most once a second per source, with how many were refused meanwhile."""
        core = getattr(self.gate, "core", None)
        if core is None:  # no core to audit through (a door used on its own)
            log.info("{door}: refused {peer}: too many connections", door=self.door, peer=peer)
            return
        source = source_key(host)
        if self.refusals is None:
            self.refusals = SourceReports(core.reactor)
        count = self.refusals.count(source)
        if count:
            core.audit_refusal(self.door, peer, TOO_MANY_CONNECTIONS,
                               {"source": source, "connections": count})

    def unregisterProtocol(self, p: _Counted) -> None:
        if p in self.protocols:
            self.limits.release(p.host)
            self.stats.connection_closed(self.door)
        super().unregisterProtocol(p)

    def disconnect_all(self) -> None:
        """Close every open connection (on shutdown).

        A door that can say goodbye (``server_shutdown``: cancel the running
        command, tell the client why) does so; the others are just closed, and
        their running commands are cancelled as the connections go.
        """
        for p in list(self.protocols):
            shutdown = getattr(p.wrappedProtocol, "server_shutdown", None)
            if shutdown is not None:
                shutdown()
            else:
                p.transport.loseConnection()
