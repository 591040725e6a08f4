"""Connection limits: in total and per address, counts exact however clients leave."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from cmdserver.doors.limits import (
    TOO_MANY_CONNECTIONS,
    ConnectionLimits,
    LimitedFactory,
    format_peer,
)
from cmdserver.stats import Stats
from tests.helpers import capture_audit, make_core


class LimitTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.limits = ConnectionLimits(max_total=4, max_per_host=2)
        self.stats = Stats(0)
        self.factory = LimitedFactory(Factory.forProtocol(Protocol), self.limits, self.stats,
                                      "line", refusal=b"Too many connections. bye !\r\n")

    def connect(self, host: str = "10.0.0.1", cls=IPv4Address):
        addr = cls("TCP", host, 1234) if cls is not UNIXAddress else UNIXAddress(None)
        protocol = self.factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_per_address_limit(self) -> None:
        self.connect()
        self.connect()
        _, refused = self.connect()
        self.assertEqual(refused.value(), b"Too many connections. bye !\r\n")
        self.assertTrue(refused.disconnecting)
        _, other = self.connect("10.0.0.2")
        self.assertFalse(other.disconnecting)
        self.assertEqual(self.stats.refused, 1)
        self.assertEqual(self.limits.per_host, {"10.0.0.1": 2, "10.0.0.2": 1})

    def test_total_limit(self) -> None:
        for i in range(4):
            self.connect(f"10.0.0.{i}")
        _, refused = self.connect("10.0.0.9")
        self.assertTrue(refused.disconnecting)
        self.assertEqual(self.limits.total, 4)
        self.assertEqual(self.stats.connections["line"], 4)

    def test_counts_are_exact_however_clients_leave(self) -> None:
        conns = [self.connect(f"10.0.0.{i % 2}") for i in range(4)]
        reasons = [ConnectionDone(), ConnectionLost(), ConnectionDone(), ConnectionLost()]
        for (protocol, _), reason in zip(conns, reasons, strict=True):
            protocol.connectionLost(Failure(reason))
        self.assertEqual(self.limits.total, 0)
        self.assertEqual(dict(self.limits.per_host), {})
        self.assertEqual(self.stats.connections["line"], 0)
        self.assertEqual(self.stats.connections_total, 4)
        # ...and the slots are free again.
        for _ in range(2):
            self.assertFalse(self.connect()[1].disconnecting)

    def test_refused_connections_do_not_count(self) -> None:
        self.connect()
        self.connect()
        refused, _ = self.connect()
        refused.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.limits.total, 2)
        self.assertEqual(self.limits.per_host["10.0.0.1"], 2)

    def test_ipv6_and_unix(self) -> None:
        self.connect("::1", IPv6Address)
        self.assertEqual(self.limits.per_host["::/64"], 1)
        for _ in range(3):  # local sockets only count in the total
            self.assertFalse(self.connect(cls=UNIXAddress)[1].disconnecting)
        self.assertTrue(self.connect(cls=UNIXAddress)[1].disconnecting)

    def test_an_ipv6_64_is_one_client(self) -> None:
        """Addresses of one /64 share --max-per-ip (a host's privacy addresses
        rotate inside its /64); another /64 has its own share."""
        first = self.connect("2001:db8:1:2::10", IPv6Address)[1]
        second = self.connect("2001:db8:1:2:aaaa::1", IPv6Address)[1]
        third = self.connect("2001:db8:1:2:ffff::ffff", IPv6Address)[1]
        self.assertEqual([t.disconnecting for t in (first, second, third)],
                         [False, False, True])
        self.assertFalse(self.connect("2001:db8:1:3::10", IPv6Address)[1].disconnecting)
        self.assertEqual(dict(self.limits.per_host),
                         {"2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1})

    def test_declined_connection_releases(self) -> None:
        class Declining(Factory):
            def buildProtocol(self, addr):
                return None

        factory = LimitedFactory(Declining(), self.limits, self.stats, "line")
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1)))
        self.assertEqual(self.limits.total, 0)

    def test_silent_refusal(self) -> None:
        factory = LimitedFactory(Factory.forProtocol(Protocol), ConnectionLimits(0, 1),
                                 self.stats, "ssh")
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)

    def test_disconnect_all(self) -> None:
        transports = [self.connect(f"10.0.0.{i}")[1] for i in range(3)]
        self.factory.disconnect_all()
        self.assertTrue(all(t.disconnecting for t in transports))


def test_format_peer():
    assert format_peer(IPv4Address("TCP", "1.2.3.4", 5)) == "1.2.3.4:5"
    assert format_peer(IPv6Address("TCP", "::1", 5)) == "[::1]:5"
    assert format_peer(UNIXAddress(None)) == "local"


class HalfCloseTests(unittest.SynchronousTestCase):
    def test_half_close_passes_through_the_wrapper(self) -> None:
        from twisted.internet.interfaces import IHalfCloseableProtocol
        from zope.interface import implementer

        @implementer(IHalfCloseableProtocol)
        class HalfCloser(Protocol):
            events: list[str] = []

            def readConnectionLost(self) -> None:
                self.events.append("read")

            def writeConnectionLost(self) -> None:
                self.events.append("write")

        limits, stats = ConnectionLimits(5, 5), Stats(0)
        for inner, expected in ((HalfCloser, True), (Protocol, False)):
            factory = LimitedFactory(Factory.forProtocol(inner), limits, stats, "line")
            wrapper = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
            wrapper.makeConnection(StringTransport())
            self.assertEqual(IHalfCloseableProtocol.providedBy(wrapper), expected)
        wrapper = LimitedFactory(Factory.forProtocol(HalfCloser), limits, stats,
                                 "line").buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        wrapper.makeConnection(StringTransport())
        wrapper.readConnectionLost()
        wrapper.writeConnectionLost()
        self.assertEqual(HalfCloser.events, ["read", "write"])


class PenaltyRefusalTests(unittest.SynchronousTestCase):
    """A penalised address's connection is refused here, before the door builds anything."""

    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from cmdserver.commands.base import Registry
        from cmdserver.core import CommandCore
        from cmdserver.doors.line.protocol import refusal
        from cmdserver.policy import Policy

        self.core = CommandCore(Registry(), Policy(["/"]), MemoryReactorClock())
        self.built: list[object] = []

        class Door(Factory):
            def buildProtocol(inner, addr):  # noqa: N805  (inner: the door's factory)
                self.built.append(addr)
                return Protocol()

        self.factory = LimitedFactory(Door(), ConnectionLimits(10, 10), self.core.stats,
                                      "line", refusal, self.core.gate)
        session = self.core.open_session("line", "10.0.0.1:1")
        self.core.gate.failure(session, "ops")  # penalised for 1 s

    def connect(self, host: str, transport: StringTransport | None = None) -> StringTransport:
        protocol = self.factory.buildProtocol(IPv4Address("TCP", host, 1))
        transport = transport or StringTransport()
        protocol.makeConnection(transport)
        return transport

    def test_refused_with_the_doors_words_before_the_door_sees_it(self) -> None:
        transport = self.connect("10.0.0.1")
        self.assertEqual(transport.value(), b"Too many failed logins from your address; "
                                            b"try again in 1 s. bye !\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.built, [])
        self.assertEqual((self.core.stats.refused, self.core.stats.refused_penalised), (1, 1))
        self.assertEqual(self.limits_total(), 0)  # not counted as open
        self.assertFalse(self.connect("10.0.0.2").disconnecting)  # another address
        self.assertEqual(len(self.built), 1)

    def limits_total(self) -> int:
        return self.factory.limits.total

    def test_nothing_is_said_on_tls(self) -> None:
        from twisted.internet.interfaces import INegotiated
        from zope.interface import alsoProvides

        tls = StringTransport()
        alsoProvides(tls, INegotiated)  # what Twisted's TLS layer provides
        transport = self.connect("10.0.0.1", tls)
        self.assertEqual(transport.value(), b"")  # closed before any handshake
        self.assertTrue(transport.disconnecting)


class RefusalAuditTests(unittest.SynchronousTestCase):
    """Connections the limits refuse are in the audit log (and the main log) once a
    second per source at most, with how many were refused: a flood of refused
    connections is not a flood of records."""

    def setUp(self) -> None:
        self.core = make_core(self.mktemp())
        self.clock = self.core.reactor
        self.audit = capture_audit(self)
        self.limits = ConnectionLimits(max_total=10, max_per_host=1)
        self.factory = LimitedFactory(Factory.forProtocol(Protocol), self.limits,
                                      self.core.stats, "line", gate=self.core.gate)

    def connect(self, host: str) -> StringTransport:
        addr = IPv6Address("TCP", host, 1234) if ":" in host else IPv4Address("TCP", host, 1)
        transport = StringTransport(peerAddress=addr)
        self.factory.buildProtocol(addr).makeConnection(transport)
        return transport

    def refusals(self) -> list[tuple[str, str, Any]]:
        return [(r["door"], r["error"], r.get("result")) for r in self.audit
                if r["event"] == "refused"]

    def test_refusals_audited_once_a_second_per_source(self) -> None:
        self.connect("10.0.0.1")
        for _ in range(5):
            self.assertTrue(self.connect("10.0.0.1").disconnecting)
        self.connect("2001:db8::1")
        self.connect("2001:db8::2")  # the same /64: refused, and reported apart
        self.assertEqual(self.refusals(), [
            ("line", TOO_MANY_CONNECTIONS, {"source": "10.0.0.1", "connections": 1}),
            ("line", TOO_MANY_CONNECTIONS, {"source": "2001:db8::/64", "connections": 1})])
        self.clock.advance(1)
        self.connect("10.0.0.1")
        self.assertEqual(self.refusals()[-1],
                         ("line", TOO_MANY_CONNECTIONS, {"source": "10.0.0.1", "connections": 5}))
        self.assertEqual(self.core.stats.refused, 7)
