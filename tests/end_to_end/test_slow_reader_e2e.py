"""A real client that floods commands and never reads: the server stops reading
it, keeps its unsent output bounded, and forgets it cleanly when it vanishes."""

from __future__ import annotations

import socket
import struct
import tempfile
import threading

from twisted.internet import reactor, task, threads
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from cmdserver.commands import default_registry
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore, TextReply
from cmdserver.doors.limits import ConnectionLimits, LimitedFactory
from cmdserver.doors.line.protocol import BATCH_LIMIT, TOO_MANY, LineFactory, LineSettings
from cmdserver.policy import Policy

BURST = b"help\n" * 1_000_000  # a million lines


def flood(port: int, stop: threading.Event, progress: list[int]) -> None:
    """Send the burst without ever reading; close with a reset when told to."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(0.05)
    sent = 0
    try:
        while sent < len(BURST) and not stop.is_set():
            try:
                sent += sock.send(BURST[sent:sent + 65536])
            except TimeoutError:
                pass
            progress[0] = sent
        stop.wait()
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def unsent(transport: FileDescriptor) -> int:
    """Bytes the server's TCP transport holds that the kernel has not taken yet.

    (Twisted's FileDescriptor keeps them in dataBuffer past offset, plus _tempDataBuffer.)
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


class SlowReaderTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        root = tempfile.TemporaryDirectory(prefix="cmdserver-e2e-")
        self.addCleanup(root.cleanup)
        self.core = CommandCore(default_registry(LogSource("")), Policy([root.name]), reactor)
        self.factory = LimitedFactory(LineFactory(self.core, LineSettings()),
                                      ConnectionLimits(10, 10), self.core.stats, "line",
                                      TOO_MANY)
        # listenTCP takes any Factory (LimitedFactory wraps); its stub asks for a ServerFactory.
        self.port = reactor.listenTCP(0, self.factory,  # type: ignore[arg-type]
                                      interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @inlineCallbacks
    def test_never_reading_client_is_bounded(self):
        stop, progress = threading.Event(), [0]
        address = self.port.getHost()
        assert isinstance(address, IPv4Address)
        client = threads.deferToThread(flood, address.port, stop, progress)
        try:
            # Wait until the server has stopped reading and no more commands run.
            last, steady, peak = -1, 0, 0
            while steady < 10:
                yield task.deferLater(reactor, 0.02, lambda: None)
                if not self.factory.protocols:
                    continue
                wrapper = next(iter(self.factory.protocols))
                proto = wrapper.wrappedProtocol
                peak = max(peak, unsent(wrapper.transport))
                done = self.core.stats.commands["help"]
                steady = steady + 1 if (done == last and not proto._reading) else 0
                last = done
            self.assertTrue(proto.paused)
            self.assertGreater(done, 0)
            self.assertLess(done * 5, len(BURST))  # far from all of it was taken
            help_reply = self.core.run_text(proto.ctx, "help")
            assert isinstance(help_reply, TextReply)
            help_size = len("\r\n".join(help_reply.lines)) + 2
            self.assertLessEqual(peak, 65536 + BATCH_LIMIT + help_size)
            self.assertLessEqual(len(proto._queue), 64)
            self.assertLessEqual(len(proto._buffer), 65536 + 4096)
        finally:
            stop.set()
            yield client
        # The client reset the connection: everything about it is released.
        while self.core.stats.connections["line"]:
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(self.factory.limits.total, 0)
        self.assertEqual(self.core.stats.in_flight, 0)
