"""The line door's probe after a client's FIN: plain TCP only (real sockets are in
tests/end_to_end/test_line_e2e.py)."""

from __future__ import annotations

import socket

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from cmdserver.doors.line.protocol import PeerProbe


class FakeSocket:
    family = socket.AF_INET

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, int]] = []
        self.error = 0

    def send(self, data: bytes, flags: int) -> int:
        self.sent.append((data, flags))
        return len(data)

    def getsockopt(self, level: int, name: int) -> int:
        return self.error


class PeerProbeTests(unittest.TestCase):
    def test_nothing_to_ask_without_a_tcp_socket(self) -> None:
        self.assertIsNone(PeerProbe.of(StringTransport(), MemoryReactorClock(), lambda: None))

    def test_one_urgent_byte_then_the_socket_error_is_watched(self) -> None:
        sock, clock, gone = FakeSocket(), MemoryReactorClock(), []
        probe = PeerProbe(sock, clock, lambda: gone.append(True))  # type: ignore[arg-type]
        probe.start()
        self.assertEqual(sock.sent, [(b"\0", socket.MSG_OOB)])
        clock.advance(0.05)
        self.assertEqual(gone, [])
        sock.error = 32  # EPIPE: the client's TCP answered with a reset
        clock.advance(0.15)
        self.assertEqual(gone, [True])
        self.assertEqual(len(sock.sent), 1)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_a_client_that_reads_on_is_left_alone(self) -> None:
        sock, clock, gone = FakeSocket(), MemoryReactorClock(), []
        probe = PeerProbe(sock, clock, lambda: gone.append(True))  # type: ignore[arg-type]
        probe.start()
        clock.pump([1.0] * 10)
        self.assertEqual((gone, len(sock.sent), clock.getDelayedCalls()), ([], 1, []))
        probe.stop()
