"""A paused writer stops commands, not reading, until the queue is full.

TLS pauses its producer until the handshake completes; the line door must
keep reading then, or the handshake never finishes.
"""

from __future__ import annotations

import tempfile

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from cmdserver.commands.base import Registry
from cmdserver.commands.basic import Ping
from cmdserver.core import CommandCore
from cmdserver.doors.line.protocol import QUEUE_HIGH, LineProtocol, LineSettings
from cmdserver.policy import Policy


class PausedWriterTests(unittest.TestCase):
    def test_reading_continues_until_the_queue_is_full(self) -> None:
        core = CommandCore(Registry([Ping()]), Policy([tempfile.gettempdir()]),
                           MemoryReactorClock())
        proto = LineProtocol(core, LineSettings(greeting="", idle_timeout=0))
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.pauseProducing()  # what TLS does before its handshake
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(b"ping\n" * (QUEUE_HIGH - 1))
        self.assertEqual((transport.value(), transport.producerState), (b"", "producing"))
        proto.dataReceived(b"ping\n")
        self.assertEqual(transport.producerState, "paused")
        proto.resumeProducing()
        self.assertEqual(transport.value(), b"pong\r\n" * QUEUE_HIGH)
        self.assertEqual(transport.producerState, "producing")
