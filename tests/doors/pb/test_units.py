"""PB door pieces with test doubles: brokers joined by an iosim pump, a fake clock,
fake observers and a fake upload engine (no sockets, no threads)."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.spread import pb
from twisted.test import iosim
from twisted.trial import unittest

from cmdserver.auth.portal import Realm, build_portal
from cmdserver.commands import default_registry
from cmdserver.commands.base import Context
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore
from cmdserver.doors.pb.calls import RemoteSink
from cmdserver.doors.pb.door import pb_factory
from cmdserver.doors.pb.upload import ConsumerEngine, consumer_starter
from cmdserver.errors import CommandError
from cmdserver.policy import Policy


class FakeObserver:
    """A remote observer whose answers the test fires by hand."""

    def __init__(self, dead: bool = False) -> None:
        self.calls: list[tuple[str, defer.Deferred]] = []
        self.dead = dead

    def callRemote(self, name: str, text: str) -> defer.Deferred:
        if self.dead:
            raise pb.DeadReferenceError("gone")
        d: defer.Deferred = defer.Deferred()
        self.calls.append((text, d))
        return d


class RemoteSinkTests(unittest.TestCase):
    def test_window_drops_and_reports(self) -> None:
        observer = FakeObserver()
        sink = RemoteSink(cast(pb.RemoteReference, observer), window=2)
        for i in range(5):
            sink.line(f"l{i}")
        self.assertEqual([t for t, _ in observer.calls], ["l0", "l1"])
        self.assertEqual(sink.dropped, 3)
        observer.calls[0][1].callback(None)
        self.assertEqual(observer.calls[-1][0], "[3 lines dropped: the observer was too slow]")
        observer.calls[1][1].callback(None)
        sink.line("l5")
        self.assertEqual(observer.calls[-1][0], "l5")

    def test_failing_observer_is_left_alone(self) -> None:
        observer = FakeObserver()
        sink = RemoteSink(cast(pb.RemoteReference, observer))
        sink.line("a")
        observer.calls[0][1].errback(pb.Error("observer broke"))
        sink.line("b")
        self.assertEqual(len(observer.calls), 1)
        self.assertTrue(sink.gone)

    def test_dead_observer(self) -> None:
        sink = RemoteSink(cast(pb.RemoteReference, FakeObserver(dead=True)))
        sink.line("a")
        sink.line("b")
        self.assertTrue(sink.gone)
        self.assertEqual(sink.pending, 0)


class SlowEngine:
    """An engine whose writes stay pending until the test fires them."""

    def __init__(self) -> None:
        self.fed: list[defer.Deferred] = []
        self.aborted = False

    def feed(self, chunk: bytes) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.fed.append(d)
        return d

    def finish(self) -> defer.Deferred:
        return defer.succeed("done")

    def abort(self) -> None:
        self.aborted = True


class PumpedDoorTests(unittest.TestCase):
    """Client and server brokers over an in-memory pump, on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.engine = SlowEngine()
        core = CommandCore(default_registry(LogSource("/nonexistent")), Policy(["/"]),
                           self.clock)
        portal = build_portal(Realm(), [InMemoryUsernamePasswordDatabaseDontUse(u=b"p")])
        server_factory = pb_factory(core, portal, upload=lambda *a: defer.succeed(self.engine),
                                    idle_timeout=300)
        client_factory = pb.PBClientFactory()
        addr = IPv4Address("TCP", "127.0.0.1", 4321)
        self.client_broker, _, self.pump = iosim.connectedServerAndClient(
            lambda: server_factory.buildProtocol(addr),
            lambda: client_factory.buildProtocol(addr))
        self.core = core
        d = client_factory.getRootObject()
        d.addCallback(lambda root: root.callRemote("authenticate", "u", "p"))
        self.pump.flush()
        self.avatar = self.successResultOf(d)

    def call(self, ref: pb.RemoteReference, *args: Any) -> defer.Deferred:
        d = ref.callRemote(*args)
        self.pump.flush()
        return d

    def test_ping(self) -> None:
        self.assertEqual(self.successResultOf(self.call(self.avatar, "ping")), "pong")
        self.assertEqual(self.core.stats.commands["ping"], 1)

    def test_writes_in_flight_are_bounded(self) -> None:
        writer = self.successResultOf(self.call(self.avatar, "upload", "f", 1000, "00"))
        pending = [writer.callRemote("write", b"x") for _ in range(17)]
        self.pump.flush()
        self.assertEqual(len(self.engine.fed), 16)
        failure = self.failureResultOf(pending[16], pb.Error)
        self.assertEqual(failure.value, "more than 16 writes in flight, upload discarded")
        self.assertTrue(self.engine.aborted)
        for d in pending[:16]:
            self.assertNoResult(d)
        self.assertEqual(self.core.stats.in_flight, 0)

    def test_disconnect_aborts_upload(self) -> None:
        writer = self.successResultOf(self.call(self.avatar, "upload", "f", 10, "00"))
        write = self.call(writer, "write", b"12345")
        self.assertEqual(self.core.stats.in_flight, 1)
        self.client_broker.transport.loseConnection()
        self.pump.flush()
        self.assertTrue(self.engine.aborted)
        self.assertEqual(self.core.stats.in_flight, 0)
        self.failureResultOf(write, pb.PBConnectionLost)

    def test_idle_connection_is_closed(self) -> None:
        self.clock.advance(299)
        self.pump.flush()
        self.successResultOf(self.call(self.avatar, "ping"))  # input resets the timer
        self.clock.advance(299)
        self.pump.flush()
        self.assertFalse(self.client_broker.disconnected)
        self.clock.advance(2)
        self.pump.flush()
        self.assertTrue(self.client_broker.disconnected)

    def test_running_upload_is_not_idleness(self) -> None:
        writer = self.successResultOf(self.call(self.avatar, "upload", "f", 10, "00"))
        self.clock.advance(301)
        self.pump.flush()
        self.assertFalse(self.client_broker.disconnected)
        self.call(writer, "abort")
        self.clock.advance(301)
        self.pump.flush()
        self.assertTrue(self.client_broker.disconnected)
        self.assertTrue(self.engine.aborted)


@dataclasses.dataclass(frozen=True)
class FakeResult:
    name: str
    size: int


class FakeConsumerUpload:
    """A consumer-style upload: write(), a done Deferred, abort(), a producer."""

    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()
        self.producer: Any = None
        self.unregistered = False

    def write(self, data: bytes) -> None:
        self.data += data

    def abort(self) -> None:
        if not self.done.called:
            self.done.cancel()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.unregistered = True


class ConsumerEngineTests(unittest.TestCase):
    def test_pause_holds_write_answers(self) -> None:
        upload = FakeConsumerUpload()
        engine = ConsumerEngine(upload)
        self.assertIs(upload.producer, engine)
        self.assertIsNone(engine.feed(b"ab"))
        upload.producer.pauseProducing()
        held = engine.feed(b"cd")
        assert held is not None  # paused: the answer waits
        self.assertNoResult(held)
        upload.producer.resumeProducing()
        self.successResultOf(held)
        self.assertEqual(upload.data, b"abcd")

    def test_finish_gives_plain_values(self) -> None:
        upload = FakeConsumerUpload()
        engine = ConsumerEngine(upload)
        finished = engine.finish()
        self.assertNoResult(finished)
        upload.done.callback(FakeResult("f", 4))
        self.assertEqual(self.successResultOf(finished), {"name": "f", "size": 4})
        self.assertEqual(self.successResultOf(engine.finish()), {"name": "f", "size": 4})
        self.assertTrue(upload.unregistered)

    def test_failure_and_abort(self) -> None:
        upload = FakeConsumerUpload()
        engine = ConsumerEngine(upload)
        upload.done.errback(CommandError("HMAC mismatch, upload discarded"))
        self.failureResultOf(engine.finish(), CommandError)
        upload = FakeConsumerUpload()
        engine = ConsumerEngine(upload)
        upload.producer.pauseProducing()
        held = engine.feed(b"x")
        assert held is not None  # paused: the answer waits
        engine.abort()
        self.successResultOf(held)  # nothing waits for ever
        self.failureResultOf(engine.finish(), defer.CancelledError)

    def test_consumer_starter(self) -> None:
        upload = FakeConsumerUpload()
        start = consumer_starter(lambda ctx, name, size, mac, *options: defer.succeed(upload))
        engine = self.successResultOf(start(cast(Context, None), "f", 1, "00"))  # never used
        self.assertIsInstance(engine, ConsumerEngine)
