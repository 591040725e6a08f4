"""Output back-pressure on every door: a command's output source (``lastlog``'s child)
is paused while its client does not read, and the SSH shell without a terminal
holds its input at the SSH window while its queue is full."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from cmdserver.commands.base import ChildOutput, ListSink, register_producer
from cmdserver.core import CappedSink
from cmdserver.doors.line.protocol import LineProtocol, LineSettings
from cmdserver.doors.pb.calls import RemoteSink
from cmdserver.doors.ssh.avatar import SSHSettings
from cmdserver.doors.ssh.session import CommandSession, RefusingSSHSession
from cmdserver.doors.ssh.shell import QUEUE_HIGH, QUEUE_LOW
from tests.helpers import Later, ProcessReactor, make_context, make_core

PEER = IPv4Address("TCP", "127.0.0.1", 5555)


class Producer:
    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class LastlogTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.core = make_core(self.mktemp(), self.reactor)

    def test_sinks_without_back_pressure_are_fine(self) -> None:
        unregister = register_producer(ListSink(), cast(IPushProducer, Producer()))
        unregister()

    def test_the_child_is_paused_while_the_sink_is(self) -> None:
        sink = ListSink()
        producers: list[Any] = []
        sink.registerProducer = lambda p, streaming: producers.append(p)  # type: ignore
        sink.unregisterProducer = lambda: producers.append(None)  # type: ignore
        d = self.core.call(make_context(self.core, out=sink), "lastlog", n=5)
        child = self.reactor.processes[0]
        producer = producers[0]
        self.assertIsInstance(producer, ChildOutput)
        producer.pauseProducing()
        self.assertTrue(child.paused)
        producer.resumeProducing()
        self.assertFalse(child.paused)
        child.out(b"a\n")
        child.exit()
        self.assertEqual(producers[-1], None)  # unregistered when it ended
        self.successResultOf(d)

    def test_a_cancelled_child_is_read_again_so_it_is_reaped(self) -> None:
        sink = ListSink()
        producers: list[Any] = []
        sink.registerProducer = lambda p, streaming: producers.append(p)  # type: ignore
        sink.unregisterProducer = lambda: None  # type: ignore
        d = self.core.call(make_context(self.core, out=sink), "lastlog", n=5)
        child = self.reactor.processes[0]
        producers[0].pauseProducing()
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(child.signals, ["KILL"])
        self.assertFalse(child.paused)

    def test_the_output_cap_passes_back_pressure_on(self) -> None:
        line = LineProtocol(self.core, LineSettings(greeting=""))
        capped = CappedSink(line, 1000, self.reactor)
        producer = Producer()
        line.pauseProducing()
        capped.registerProducer(producer, True)
        self.assertTrue(producer.paused)
        capped.unregisterProducer()
        self.assertIsNone(line._out_producer)


class LineDoorTests(unittest.TestCase):
    def test_lastlog_child_waits_while_the_client_does_not_read(self) -> None:
        reactor = ProcessReactor()
        core = make_core(self.mktemp(), reactor)
        proto = LineProtocol(core, LineSettings(greeting="", idle_timeout=0))
        transport = StringTransport(peerAddress=PEER)
        proto.makeConnection(transport)
        proto.dataReceived(b"lastlog 1000\n")
        child = reactor.processes[0]
        child.out(b"x" * 100 + b"\n")
        proto.pauseProducing()  # the transport's buffer is full: the client is not reading
        self.assertTrue(child.paused)
        proto.resumeProducing()
        self.assertFalse(child.paused)
        child.exit()
        self.assertIn(b"End lastlog", transport.value())
        proto.pauseProducing()
        self.assertIsNone(proto._out_producer)  # nothing registered once it ended


class FakeChannel:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.resumed: list[bytes] = []
        self.input_paused = False
        self.conn = self
        self.closed = False

    def pause_input(self) -> None:
        self.input_paused = True

    def resume_input(self) -> None:
        self.input_paused = False
        self.resumed.append(self.kept())  # what the door still keeps, as it lets more in

    def kept(self) -> bytes:
        return b""

    def writeExtended(self, kind: int, data: bytes) -> None:
        self.data.append(data)

    def sendRequest(self, channel: Any, name: bytes, data: bytes) -> None:
        pass

    def loseConnection(self) -> None:
        self.closed = True


class FakeProto:
    def __init__(self) -> None:
        self.session = FakeChannel()

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def write(self, data: bytes) -> None:
        self.session.data.append(data)


class FakeAvatar:
    def __init__(self, core: Any) -> None:
        self.core = core
        self.settings = SSHSettings(greeting="")
        self.busy = 0

    def context(self, out: Any, session: Any) -> Any:
        return make_context(self.core, out=out, session=session, door="ssh")


class SSHTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.core = make_core(self.mktemp(), self.reactor)
        self.later = Later()
        self.core.registry.add(self.later)
        self.session = CommandSession(FakeAvatar(self.core))  # type: ignore[arg-type]
        self.proto = FakeProto()

    def test_piped_shell_queue_is_bounded_and_holds_the_window(self) -> None:
        self.session.openShell(self.proto)
        pipe = self.session.pipe
        assert pipe is not None
        channel = self.proto.session
        channel.kept = lambda: pipe._buffer  # type: ignore[method-assign]
        self.proto.transport.write(b"later\n" * 500)  # more than a window's worth, at once
        self.assertEqual(len(self.later.pending), 1)
        self.assertLessEqual(len(pipe.queue), QUEUE_HIGH)
        self.assertTrue(channel.input_paused)  # the client stops at the window
        self.proto.transport.write(b"later\n" * 100)  # what was already in flight
        self.assertLessEqual(len(pipe.queue), QUEUE_HIGH)
        # The window stays closed until every line kept as bytes is taken: not when
        # the queue is short again (that would let a window more in each time).
        while b"\n" in pipe._buffer:
            self.assertTrue(channel.input_paused)
            self.later.pending[-1].callback("ok")
            self.assertLessEqual(len(pipe.queue), QUEUE_HIGH)
        while len(pipe.queue) > QUEUE_LOW:
            self.later.pending[-1].callback("ok")
        self.assertFalse(channel.input_paused)  # all taken: the client may send again
        self.assertEqual(channel.resumed, [b""])
        while pipe.queue or self.session.running is not None:
            self.later.pending[-1].callback("ok")
        self.assertEqual(len(self.later.pending), 600)

    def test_piped_shell_waits_while_the_client_does_not_read(self) -> None:
        self.session.openShell(self.proto)
        self.proto.transport.write(b"later\nlater\n")
        self.session.output_blocked(True)
        self.later.pending[0].callback("one")
        self.assertEqual(len(self.later.pending), 1)  # the next waits for the window
        self.session.output_blocked(False)
        self.assertEqual(len(self.later.pending), 2)

    def test_exec_lastlog_child_waits_for_the_window(self) -> None:
        self.session.execCommand(self.proto, b"lastlog 1000")
        self.reactor.advance(0)
        child = self.reactor.processes[0]
        channel = RefusingSSHSession.__new__(RefusingSSHSession)
        channel.session = self.session
        channel.stopWriting()  # conch: the client's window is used up
        self.assertTrue(child.paused)
        channel.startWriting()
        self.assertFalse(child.paused)
        self.session.output_blocked(True)
        child.exit()
        self.assertIsNone(self.session._output_producer)


class PBSinkTests(unittest.TestCase):
    def test_observer_window_pauses_the_source_instead_of_dropping(self) -> None:
        from tests.doors.pb.test_units import FakeObserver

        observer = FakeObserver()
        sink = RemoteSink(observer, window=4)  # type: ignore[arg-type]
        producer = Producer()
        sink.registerProducer(producer, True)
        for i in range(4):
            sink.line(f"l{i}")
        self.assertTrue(producer.paused)
        sink.line("l4")  # in the read that filled the window: still sent
        self.assertEqual(sink.dropped, 0)
        for _, d in observer.calls[:3]:
            d.callback(None)
        self.assertFalse(producer.paused)
        self.assertEqual([t for t, _ in observer.calls], [f"l{i}" for i in range(5)])

    def test_a_gone_observer_lets_the_source_run(self) -> None:
        from tests.doors.pb.test_units import FakeObserver

        observer = FakeObserver()
        sink = RemoteSink(observer, window=2)  # type: ignore[arg-type]
        producer = Producer()
        sink.registerProducer(producer, True)
        sink.line("a")
        sink.line("b")
        self.assertTrue(producer.paused)
        from twisted.spread import pb

        observer.calls[0][1].errback(pb.Error("gone"))
        self.assertFalse(producer.paused)
