"""The line door's output: replies to a chunk of lines leave together and in
order, and nothing is lost when the connection closes in the middle of one."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from cmdserver.commands import default_registry
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore
from cmdserver.doors.line.protocol import BATCH_LIMIT, LineFactory, LineSettings
from cmdserver.policy import Policy
from tests.helpers import Later


class CountingTransport(StringTransport):
    """Remembers how many write calls reached it."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.calls = 0

    def write(self, data: bytes) -> None:
        self.calls += 1
        super().write(data)

    def writeSequence(self, seq: list[bytes]) -> None:
        self.calls += 1
        super().write(b"".join(seq))



class LineOutputTests(unittest.TestCase):
    def setUp(self) -> None:
        registry = default_registry(LogSource("/nonexistent"))
        self.later = Later()
        registry.add(self.later)
        self.core = CommandCore(registry, Policy(["/"]), MemoryReactorClock())
        self.proto = LineFactory(self.core, LineSettings(greeting="", idle_timeout=0,
                                                         max_line=100)).buildProtocol(None)
        self.transport = CountingTransport()
        self.proto.makeConnection(self.transport)

    def test_one_write_per_chunk(self) -> None:
        self.proto.dataReceived(b"ping\nping\r\nnope\nping extra\n\n")
        self.assertEqual(self.transport.value(),
                         b"pong\r\npong\r\nCommand not found.\r\nError: usage: ping\r\n")
        self.assertEqual(self.transport.calls, 1)

    def test_exit_mid_chunk_writes_bye_then_closes(self) -> None:
        self.proto.dataReceived(b"ping\nexit\nping\n")
        self.assertEqual(self.transport.value(), b"pong\r\nbye !\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_overlong_line_error_written_before_close(self) -> None:
        self.proto.dataReceived(b"ping\n" + b"x" * 200 + b"\n")
        self.assertEqual(self.transport.value(),
                         b"pong\r\nError: line too long (the limit is 100 bytes)\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_async_reply_written_directly_and_queue_resumes(self) -> None:
        self.proto.dataReceived(b"later\nping\n")
        self.assertEqual(self.transport.value(), b"")
        self.later.pending[0].callback("done")
        self.assertEqual(self.transport.value(), b"done\r\npong\r\n")

    def test_large_output_handed_over_in_pieces(self) -> None:
        # Enough help output to pass the batch limit several times: the transport
        # sees it early (where its back-pressure can act), not all at the end.
        self.proto.dataReceived(b"help\n" * 200)
        self.assertGreater(len(self.transport.value()), 2 * BATCH_LIMIT)
        self.assertGreater(self.transport.calls, 2)
        self.assertEqual(self.transport.value().count(b"Commands:\r\n"), 200)
