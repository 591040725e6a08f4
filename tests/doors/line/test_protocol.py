"""The line door through StringTransport and task.Clock."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from cmdserver.commands.base import Command, Context
from cmdserver.doors.line.protocol import (
    LINES_PER_TURN,
    QUEUE_HIGH,
    QUEUE_LOW,
    LineFactory,
    LineSettings,
)
from tests.helpers import make_core


class Gate(Command):
    """A command the test finishes by hand: `gate NAME` waits for release(NAME)."""

    name = "gate"
    summary = "Wait for the test."
    usage = "gate NAME"

    def __init__(self) -> None:
        self.waiting: dict[str, defer.Deferred] = {}
        self.cancelled: list[str] = []

    def parse(self, argv: Any) -> dict[str, Any]:
        return {"label": argv[0]}

    def run(self, ctx: Context, label: str) -> defer.Deferred:
        ctx.out.line(f"start {label}")
        d: defer.Deferred = defer.Deferred(lambda _: self.cancelled.append(label))
        self.waiting[label] = d
        return d

    def release(self, label: str) -> None:
        self.waiting.pop(label).callback(f"done {label}")


class LineDoorTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.core = make_core(self.mktemp())
        self.clock = self.core.reactor
        self.gate = Gate()
        self.core.registry.add(self.gate)
        self.settings = LineSettings(max_line=64, idle_timeout=30, greeting="hello")
        self.protocol, self.transport = self.connect()

    def connect(self, host: str = "10.1.2.3"):
        protocol = LineFactory(self.core, self.settings).buildProtocol(None)
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def output(self) -> list[str]:
        value = self.transport.value()
        self.transport.clear()
        self.assertTrue(value == b"" or value.endswith(b"\r\n"), value)
        return value.decode("utf-8").split("\r\n")[:-1]

    def test_greeting_and_peer(self) -> None:
        self.assertEqual(self.output(), ["hello"])
        self.assertEqual(self.protocol.ctx.peer, "10.1.2.3:40000")
        self.assertEqual(self.protocol.ctx.user, "anonymous")
        self.assertEqual(self.protocol.ctx.door, "line")

    def test_no_greeting_by_default(self) -> None:
        # printf 'test\n' | nc HOST PORT: the first line read is the first reply.
        self.settings = LineSettings()
        protocol, transport = self.connect()
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(b"test\n")
        self.assertEqual(transport.value(), b"Command not found.\r\n")

    def test_a_greeting_comes_before_the_first_reply(self) -> None:
        self.settings = LineSettings(greeting="cmdserver on host7")
        protocol, transport = self.connect()
        protocol.dataReceived(b"test\n")
        self.assertEqual(transport.value(), b"cmdserver on host7\r\nCommand not found.\r\n")

    def test_lf_and_crlf(self) -> None:
        self.output()
        self.send(b"ping\nping\r\n")
        self.assertEqual(self.output(), ["pong", "pong"])

    def test_line_split_across_packets(self) -> None:
        self.output()
        self.send(b"pi")
        self.assertEqual(self.output(), [])
        self.send(b"ng\r")
        self.send(b"\n")
        self.assertEqual(self.output(), ["pong"])

    def test_empty_lines_are_ignored(self) -> None:
        self.output()
        self.send(b"\n\r\n   \n")
        self.assertEqual(self.output(), [])

    def test_unknown_command(self) -> None:
        self.output()
        self.send(b"frobnicate\n")
        self.assertEqual(self.output(), ["Command not found."])

    def test_commands_run_one_after_another(self) -> None:
        self.output()
        self.send(b"gate a\nping\ngate b\nping\n")
        self.assertEqual(self.output(), ["start a"])
        self.gate.release("a")
        self.assertEqual(self.output(), ["done a", "pong", "start b"])
        self.gate.release("b")
        self.assertEqual(self.output(), ["done b", "pong"])

    def test_other_connections_are_not_held_up(self) -> None:
        self.send(b"gate a\n")
        other, other_transport = self.connect("10.9.9.9")
        other.dataReceived(b"ping\n")
        self.assertEqual(other_transport.value(), b"hello\r\npong\r\n")
        self.gate.release("a")

    def test_line_too_long_closes(self) -> None:
        self.output()
        self.send(b"x" * 65 + b"\nping\n")
        self.assertEqual(self.output(), ["Error: line too long (the limit is 64 bytes)"])
        self.assertTrue(self.transport.disconnecting)

    def test_line_too_long_without_newline(self) -> None:
        self.output()
        self.send(b"y" * 100)
        self.assertEqual(self.output(), ["Error: line too long (the limit is 64 bytes)"])
        self.assertTrue(self.transport.disconnecting)

    def test_line_at_the_limit_is_fine(self) -> None:
        self.output()
        self.send(b"ping" + b" " * 60 + b"\n")
        self.assertEqual(self.output(), ["pong"])

    def test_invalid_utf8(self) -> None:
        self.output()
        self.send(b"ping \xff\xfe\n\x80\x81\n")
        self.assertEqual(self.output(), ["Error: the command is not valid UTF-8"] * 2)
        self.assertFalse(self.transport.disconnecting)

    def test_telnet_iac(self) -> None:
        self.output()
        self.send(b"\xff\xf4\xff\xfd\x06\r\nping\r\n")  # Ctrl-C as telnet sends it
        self.assertEqual(self.output(), ["Error: the command is not valid UTF-8", "pong"])

    def test_control_characters(self) -> None:
        self.output()
        self.send(b"ping\x00\nls \x1b[2J\nping\tnow\n")
        self.assertEqual(self.output(), [
            "Error: control characters are not allowed in a command",
            "Error: control characters are not allowed in a command",
            "Error: usage: ping",  # a tab is white space
        ])

    def test_output_is_sanitized(self) -> None:
        self.output()
        self.protocol.line("evil \x1b]0;title\x07 name\r\nx\ttab")
        self.assertEqual(self.transport.value(),
                         "evil \ufffd]0;title\ufffd name\ufffd\ufffdx\ttab\r\n".encode())

    def test_idle_timeout(self) -> None:
        self.output()
        self.clock.advance(29)
        self.send(b"ping\n")
        self.clock.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1.5)
        self.assertEqual(self.output(), ["pong",
                                         "Timeout: idle for 30 s, closing the connection."])
        self.assertTrue(self.transport.disconnecting)

    def test_running_command_is_not_idleness(self) -> None:
        self.output()
        self.send(b"gate a\n")
        self.clock.advance(100)
        self.assertFalse(self.transport.disconnecting)
        self.gate.release("a")
        self.clock.advance(31)
        self.assertTrue(self.transport.disconnecting)

    def test_no_timeout_when_zero(self) -> None:
        self.settings = LineSettings(idle_timeout=0, greeting="")
        protocol, transport = self.connect()
        self.clock.advance(10**6)
        self.assertFalse(transport.disconnecting)

    def test_disconnect_cancels_the_running_command(self) -> None:
        self.send(b"gate a\nping\n")
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gate.cancelled, ["a"])
        self.assertEqual(self.core.stats.in_flight, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_exit_closes_and_ignores_the_rest(self) -> None:
        self.output()
        self.send(b"exit\nping\n")
        self.assertEqual(self.output(), ["bye !"])
        self.assertTrue(self.transport.disconnecting)

    def test_quit_after_a_slow_command(self) -> None:
        self.output()
        self.send(b"gate a\nquit\nping\n")
        self.gate.release("a")
        self.assertEqual(self.output(), ["start a", "done a", "bye !"])
        self.assertTrue(self.transport.disconnecting)

    def test_registered_as_a_streaming_producer(self) -> None:
        self.assertIs(self.transport.producer, self.protocol)
        self.assertTrue(self.transport.streaming)

    def test_slow_reader_stops_commands_then_reading(self) -> None:
        self.output()
        self.protocol.pauseProducing()  # the client is not reading its output
        self.send(b"ping\n" * 5)
        self.assertEqual(self.output(), [])
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"ping\n" * QUEUE_HIGH)  # the queue fills: reading stops
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.output(), ["pong"] * (5 + QUEUE_HIGH))

    def test_long_queue_stops_reading_until_it_drains(self) -> None:
        self.output()
        self.send(b"gate a\n")
        self.send(b"ping\n" * (QUEUE_HIGH - 1))
        self.assertEqual(self.transport.producerState, "producing")
        self.send(b"ping\n")
        self.assertEqual(self.transport.producerState, "paused")
        self.gate.release("a")
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.output(), ["start a", "done a"] + ["pong"] * QUEUE_HIGH)
        self.assertGreater(QUEUE_HIGH, QUEUE_LOW)

    def test_a_long_pipeline_does_not_recurse(self) -> None:
        self.output()
        self.send(b"gate a\n" + b"ping\n" * 5000)
        self.gate.release("a")
        for _ in range(5000 // LINES_PER_TURN + 2):  # a turn at a time, others get theirs
            self.clock.advance(0)
        self.assertEqual(len(self.output()), 5002)

    def test_half_close_answers_everything_then_closes(self) -> None:
        self.output()
        self.send(b"gate a\nping\nping")  # the last line has no newline
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.gate.release("a")
        self.assertEqual(self.output(), ["start a", "done a", "pong", "pong"])
        self.assertTrue(self.transport.disconnecting)

    def test_half_close_when_idle_closes_at_once(self) -> None:
        self.protocol.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)

    def test_half_close_waits_for_a_slow_reader(self) -> None:
        self.output()
        self.protocol.pauseProducing()
        self.send(b"ping\n")
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.protocol.resumeProducing()
        self.assertEqual(self.output(), ["pong"])
        self.assertTrue(self.transport.disconnecting)

    def test_half_close_in_the_middle_of_raw_bytes_aborts(self) -> None:
        class Consumer:
            """What receive_raw needs of an upload: remaining, write, producers."""

            def __init__(self) -> None:
                self.data = b""
                self.remaining = 10

            def registerProducer(self, producer: Any, streaming: bool) -> None:
                pass

            def write(self, data: bytes) -> None:
                self.data += data
                self.remaining -= len(data)

        self.output()
        self.send(b"gate a\n")
        consumer = Consumer()
        self.protocol.receive_raw(10, consumer)
        self.send(b"12345")
        self.protocol.readConnectionLost()
        self.assertEqual(consumer.data, b"12345")
        self.assertEqual(self.output(), [
            "start a", "Error: upload incomplete: the client closed the stream early"])
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.gate.cancelled, ["a"])

    def test_half_close_while_reading_is_stopped_answers_every_line(self) -> None:
        self.output()
        self.send(b"gate a\n" + b"ping\n" * (QUEUE_HIGH + 50) + b"ping")
        self.assertEqual(self.transport.producerState, "paused")
        self.protocol.readConnectionLost()
        self.assertFalse(self.transport.disconnecting)
        self.gate.release("a")
        for _ in range(10):
            self.clock.advance(0)
        self.assertEqual(self.output(), ["start a", "done a"] + ["pong"] * (QUEUE_HIGH + 51))
        self.assertTrue(self.transport.disconnecting)

    def test_server_shutdown_cancels_and_says_why(self) -> None:
        self.output()
        self.send(b"gate a\nping\n")
        self.protocol.server_shutdown()
        self.assertEqual(self.gate.cancelled, ["a"])
        self.assertEqual(self.output(), ["start a", "Error: the server is shutting down"])
        self.assertTrue(self.transport.disconnecting)
        self.protocol.server_shutdown()  # twice is harmless
        self.assertEqual(self.output(), [])
