"""The PB door's bounds: message size before and after login, nesting depth, calls in
flight per connection; the bounded decoder reads what Twisted's reads."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.spread import banana, pb
from twisted.test import iosim
from twisted.trial import unittest

from cmdserver.auth.portal import Realm, build_portal
from cmdserver.commands import default_registry
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore
from cmdserver.doors.pb.door import DoorBroker, pb_factory
from cmdserver.doors.pb.wire import BEFORE_LOGIN_LIMIT, MAX_DEPTH, MESSAGE_LIMIT, BoundedBanana
from cmdserver.policy import Policy
from tests.helpers import Later, capture_log

ADDR = IPv4Address("TCP", "127.0.0.1", 4321)
PB_DIALECT = b"\x02\x82pb"  # the client's choice of dialect: the string b"pb"


def make_door(core: CommandCore | None = None) -> tuple[Any, CommandCore]:
    core = core or CommandCore(default_registry(LogSource("/nonexistent")), Policy(["/"]),
                               Clock())
    portal = build_portal(Realm(), [InMemoryUsernamePasswordDatabaseDontUse(u=b"p")])
    return pb_factory(core, portal, idle_timeout=300), core


def connected_broker() -> tuple[DoorBroker, StringTransport]:
    factory, _ = make_door()
    broker = factory.buildProtocol(ADDR)
    transport = StringTransport(peerAddress=ADDR)
    broker.makeConnection(transport)
    broker.dataReceived(PB_DIALECT)
    return broker, transport


def nested(depth: int) -> bytes:
    """Lists in lists, ``depth`` deep, as banana sends them (too deep for its encoder)."""
    return b"\x01\x80" * (depth - 1) + b"\x00\x80"


class MessageSizeTests(unittest.TestCase):
    def setUp(self) -> None:
        self.log = capture_log(self)

    def lines(self) -> list[dict]:
        return [e for e in self.log if "closing the connection" in str(e.get("log_format"))]

    def test_a_large_message_before_login_is_refused_before_its_bytes_arrive(self) -> None:
        broker, transport = connected_broker()
        message = banana.encode([b"message", 1, 0, b"authenticate", 1, [b"x" * 100_000]])
        broker.dataReceived(message[:40])  # the string's length is in these bytes
        self.assertTrue(transport.disconnected)
        self.assertTrue(broker.refused)
        self.assertEqual(broker.listStack, [])
        broker.dataReceived(message[40:])  # what follows is not even looked at
        self.assertEqual(len(self.lines()), 1)
        self.assertIn("a message over 64 KiB", self.lines()[0]["reason"])
        self.assertFalse([e for e in self.log if "log_failure" in e])

    def test_many_strings_add_up(self) -> None:
        broker, transport = connected_broker()
        message = banana.encode([b"message", [b"y" * 1000] * 100])
        for i in range(0, len(message), 4096):
            broker.dataReceived(message[i:i + 4096])
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(self.lines()), 1)

    def test_after_login_larger_messages_are_decoded(self) -> None:
        broker, transport = connected_broker()
        broker.logged_in()
        got: list[Any] = []
        broker.expressionReceived = got.append  # type: ignore[method-assign]
        message = banana.encode([b"message", b"z" * 500_000, [b"w" * 300_000]])
        for i in range(0, len(message), 65536):
            broker.dataReceived(message[i:i + 65536])
        self.assertFalse(transport.disconnected)
        self.assertEqual(len(got), 1)
        self.assertEqual(len(got[0][1]), 500_000)
        broker.dataReceived(banana.encode([[b"v" * 600_000, b"v" * 600_000]]))
        self.assertTrue(transport.disconnected)
        self.assertIn("a message over 1024 KiB", self.lines()[0]["reason"])

    def test_deep_nesting_is_one_line_in_the_log(self) -> None:
        broker, transport = connected_broker()
        broker.dataReceived(b"\x02\x80" + banana.encode(b"message") + nested(5000))
        self.assertTrue(transport.disconnected)
        self.assertEqual(len(self.lines()), 1)
        self.assertIn(f"lists nested more than {MAX_DEPTH} deep", self.lines()[0]["reason"])
        self.assertFalse([e for e in self.log if "log_failure" in e])

    def test_bad_type_byte_and_unknown_symbol(self) -> None:
        for data in (b"\xff", b"\x7f\x7f\x87"):
            broker, transport = connected_broker()
            broker.dataReceived(data)
            self.assertTrue(transport.disconnected)
        self.assertEqual(len(self.lines()), 2)
        self.assertFalse([e for e in self.log if "log_failure" in e])

    def test_login_raises_the_limit(self) -> None:
        factory, _ = make_door()
        client_factory = pb.PBClientFactory()
        brokers: list[DoorBroker] = []

        def server() -> DoorBroker:
            brokers.append(factory.buildProtocol(ADDR))
            return brokers[-1]

        _, _, pump = iosim.connectedServerAndClient(
            server, lambda: client_factory.buildProtocol(ADDR))
        d = client_factory.getRootObject()
        pump.flush()
        root = self.successResultOf(d)
        self.assertEqual(brokers[0].message_limit, BEFORE_LOGIN_LIMIT)
        d = root.callRemote("authenticate", "u", "p")
        pump.flush()
        self.successResultOf(d)
        self.assertEqual(brokers[0].message_limit, MESSAGE_LIMIT)


class ReadingTests(unittest.TestCase):
    def test_a_client_that_does_not_read_its_answers_is_not_read(self) -> None:
        broker, transport = connected_broker()
        self.assertTrue(transport.streaming)
        assert transport.producer is not None
        transport.producer.pauseProducing()  # the transport's buffer of answers is full
        self.assertEqual(transport.producerState, "paused")
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")


class Collector(BoundedBanana):
    message_limit = 1 << 30

    def __init__(self) -> None:
        super().__init__(isClient=1)
        self.setPrefixLimit(64)
        self.currentDialect = b"pb"
        self.got: list[Any] = []

    def expressionReceived(self, lst: Any) -> None:
        self.got.append(lst)


items = st.recursive(
    st.one_of(st.integers(-(2 ** 200), 2 ** 200), st.binary(max_size=300),
              st.floats(allow_nan=False), st.sampled_from([b"None", b"remote", b"message"])),
    lambda children: st.lists(children, max_size=6), max_leaves=40)


class DecoderTests(unittest.SynchronousTestCase):
    @settings(max_examples=100, deadline=None)
    @given(st.lists(items, min_size=1, max_size=5), st.lists(st.integers(1, 64), max_size=30))
    def test_same_items_as_twisted_whatever_the_reads(self, messages: list, cuts: list) -> None:
        encoder = banana.Banana()
        encoder.currentDialect = b"pb"  # symbols of the vocabulary go out as VOCAB
        encoder.setPrefixLimit(64)
        data = b""
        for message in messages:
            out: list[bytes] = []
            encoder._encode(message, out.append)
            data += b"".join(out)
        decoder = Collector()
        pos = 0
        for cut in cuts:
            decoder.dataReceived(data[pos:pos + cut])
            pos += cut
        decoder.dataReceived(data[pos:])
        self.assertEqual(decoder.got, messages)
        self.assertFalse(decoder.refused)


class CallsInFlightTests(unittest.TestCase):
    def test_pipelined_calls_beyond_the_limit_are_refused(self) -> None:
        core = CommandCore(default_registry(LogSource("/nonexistent")), Policy(["/"]),
                           Clock())
        later = Later()
        core.registry.add(later)
        factory, _ = make_door(core)
        client_factory = pb.PBClientFactory()
        _, _, pump = iosim.connectedServerAndClient(
            lambda: factory.buildProtocol(ADDR), lambda: client_factory.buildProtocol(ADDR))
        d = client_factory.getRootObject()
        d.addCallback(lambda root: root.callRemote("authenticate", "u", "p"))
        pump.flush()
        avatar = self.successResultOf(d)
        calls = [avatar.callRemote("later") for _ in range(20)]
        pump.flush()
        self.assertEqual(len(later.pending), 16)
        for refused in calls[16:]:
            failure = self.failureResultOf(refused, pb.Error)
            self.assertEqual(failure.value,
                             "too many calls in flight on this connection (the limit is 16)")
        later.pending[0].callback("done")
        pump.flush()
        self.assertEqual(self.successResultOf(calls[0]), "done")
        again = avatar.callRemote("later")
        pump.flush()
        self.assertNoResult(again)
        self.assertEqual(len(later.pending), 17)



