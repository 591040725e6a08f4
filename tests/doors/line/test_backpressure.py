"""Back-pressure in the line door: a client that does not read, or floods us
with lines, costs bounded memory and bounded work per reactor turn."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from cmdserver.commands import default_registry
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore
from cmdserver.doors.line.protocol import (
    BATCH_LIMIT,
    LINES_PER_TURN,
    QUEUE_HIGH,
    LineFactory,
    LineSettings,
)
from cmdserver.policy import Policy
from tests.helpers import Later

SEND_BUFFER = 65536  # what a real TCP transport buffers before it pauses its producer
READ_SIZE = 65536  # what a real TCP transport reads at once


class PausingTransport(StringTransport):
    """A StringTransport that, like Twisted's TCP transport, pauses its push
    producer once more than ``SEND_BUFFER`` bytes wait to be sent."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.peak = 0
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        size = len(self.io.getvalue())
        self.peak = max(self.peak, size)
        if size > SEND_BUFFER and self.producer is not None and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def client_reads(self) -> bytes:
        """The client reads everything; the transport resumes its producer."""
        data = self.value()
        self.clear()
        if self.producer_paused:
            self.producer_paused = False
            assert self.producer is not None  # it was paused
            self.producer.resumeProducing()
        return data


def next_turn(reactor: MemoryReactorClock) -> None:
    """Run the calls due now, as one reactor turn does: not the ones they schedule."""
    due = [c for c in reactor.calls if c.getTime() <= reactor.seconds()]
    for call in due:
        reactor.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)



class BackPressureTests(unittest.TestCase):
    def setUp(self) -> None:
        registry = default_registry(LogSource("/nonexistent"))
        self.later = Later()
        registry.add(self.later)
        self.reactor = MemoryReactorClock()
        self.core = CommandCore(registry, Policy(["/"]), self.reactor)
        self.proto = LineFactory(self.core, LineSettings(greeting="", idle_timeout=0)
                                 ).buildProtocol(None)
        self.transport = PausingTransport()
        self.proto.makeConnection(self.transport)

    def feed(self, data: bytes) -> int:
        """Deliver ``data`` as a real transport would: in reads, only while reading."""
        delivered = 0
        while delivered < len(data) and self.transport.producerState == "producing":
            self.proto.dataReceived(data[delivered:delivered + READ_SIZE])
            delivered += READ_SIZE
        return min(delivered, len(data))

    def test_registered_as_push_producer(self) -> None:
        self.assertIs(self.transport.producer, self.proto)
        self.assertTrue(self.transport.streaming)

    def test_paused_by_transport_stops_output_and_reading(self) -> None:
        self.proto.pauseProducing()  # the client stopped reading
        self.proto.dataReceived(b"ping\n" * 10_000)
        # Nothing runs; lines queue until the queue is full, then reading stops and
        # the rest stays in LineReceiver's buffer as raw bytes.
        self.assertEqual(self.transport.producerState, "paused")
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(len(self.proto._queue or ()), QUEUE_HIGH)
        self.assertEqual(self.core.stats.commands["ping"], 0)
        self.assertEqual(len(self.proto._buffer), (10_000 - QUEUE_HIGH) * 5)
        self.proto.resumeProducing()
        for _ in range(10_000 // LINES_PER_TURN + 1):
            self.reactor.advance(0)
        self.assertEqual(self.transport.value(), b"pong\r\n" * 10_000)

    def test_burst_from_client_that_never_reads(self) -> None:
        burst = b"help\n" * 1_000_000
        delivered = self.feed(burst)
        self.assertEqual(self.transport.producerState, "paused")
        for _ in range(20):  # turns pass; nothing drains the output
            next_turn(self.reactor)
            delivered += self.feed(burst[delivered:])
        self.assertLess(delivered, len(burst) // 50)
        one_help = len(self.transport.value()) // max(1, self.core.stats.commands["help"])
        self.assertLessEqual(self.transport.peak, SEND_BUFFER + BATCH_LIMIT + one_help)
        self.assertLessEqual(len(self.proto._queue or ()), QUEUE_HIGH)
        self.assertLessEqual(len(self.proto._buffer), READ_SIZE)

    def test_burst_is_answered_in_full_once_the_client_reads(self) -> None:
        lines = 30_000
        burst = b"".join(b"ping %d\n" % i if i % 3 == 0 else b"ping\n" for i in range(lines))
        delivered, received = 0, b""
        while delivered < len(burst) or self.reactor.getDelayedCalls():
            delivered += self.feed(burst[delivered:])
            next_turn(self.reactor)
            received += self.transport.client_reads()
            self.assertLessEqual(self.transport.peak, SEND_BUFFER + BATCH_LIMIT)
        replies = received.split(b"\r\n")[:-1]
        self.assertEqual(len(replies), lines)
        for i, reply in enumerate(replies):
            self.assertEqual(reply, b"Error: usage: ping" if i % 3 == 0 else b"pong")

    def test_flood_yields_to_other_connections(self) -> None:
        self.proto.dataReceived(b"ping\n" * (LINES_PER_TURN * 3))
        self.assertEqual(self.core.stats.commands["ping"], LINES_PER_TURN)
        self.assertEqual(self.transport.producerState, "paused")
        next_turn(self.reactor)
        self.assertEqual(self.core.stats.commands["ping"], LINES_PER_TURN * 2)
        next_turn(self.reactor)
        next_turn(self.reactor)
        self.assertEqual(self.core.stats.commands["ping"], LINES_PER_TURN * 3)
        self.assertEqual(self.transport.producerState, "producing")

    def test_queue_bounded_while_a_command_runs(self) -> None:
        self.proto.dataReceived(b"later\n" + b"ping\n" * 1000)
        self.assertEqual(len(self.proto._queue or ()), QUEUE_HIGH)
        self.assertEqual(self.transport.producerState, "paused")
        self.later.pending[0].callback("done")
        for _ in range(10):
            self.reactor.advance(0)
        self.assertEqual(self.transport.value(), b"done\r\n" + b"pong\r\n" * 1000)
        self.assertEqual(self.transport.producerState, "producing")

    def test_connection_lost_while_paused_cancels_and_forgets(self) -> None:
        self.proto.dataReceived(b"later\n" + b"ping\n" * 1000)
        running = self.later.pending[0]
        self.proto.connectionLost(None)
        self.assertTrue(running.called)  # cancelled
        self.assertEqual(len(self.proto._queue or ()), 0)
        self.reactor.advance(0)  # a pending turn does nothing on a closed connection
        self.assertEqual(self.transport.value(), b"")
