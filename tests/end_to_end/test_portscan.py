"""``portscan`` with real sockets on loopback: only the test's own few ports are scanned."""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver
from twisted.trial.unittest import SkipTest, TestCase

from cmdserver.commands.base import Context, ListSink, Registry
from cmdserver.commands.portscan.command import PortScan
from cmdserver.core import CommandCore
from cmdserver.doors.line.protocol import LineFactory, LineSettings
from cmdserver.policy import Policy, ScanPolicy


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class Ports:
    """Listening, closed and unanswering ("clogged") ports on 127.0.0.1, all from port 0."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    def _socket(self) -> socket.socket:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.sockets.append(s)
        return s

    def listening(self) -> int:
        s = self._socket()
        s.listen(16)
        return s.getsockname()[1]

    def closed(self) -> int:
        """A port bound but not listening: nobody else gets it, and connects are refused."""
        return self._socket().getsockname()[1]

    def clogged(self) -> int:
        """A listener whose accept queue is full: the kernel drops further SYNs, so
        connects stay in progress, like a filtered port."""
        s = self._socket()
        s.listen(0)
        port = s.getsockname()[1]
        self.sockets.append(socket.create_connection(("127.0.0.1", port)))
        with socket.socket() as probe:
            probe.setblocking(False)
            probe.connect_ex(("127.0.0.1", port))
            if probe.connect_ex(("127.0.0.1", port)) != errno.EALREADY:
                raise SkipTest("this kernel answers connects to a full accept queue")
        return port

    def close(self) -> None:
        for s in self.sockets:
            s.close()


class RealScanTests(TestCase):
    def setUp(self) -> None:
        self.ports = Ports()
        self.addCleanup(self.ports.close)
        self.policy = Policy([self.mktemp()], ScanPolicy(timeout=30.0))
        self.core = CommandCore(Registry([PortScan()]), self.policy, reactor)

    def context(self) -> Context:
        return Context(self.core, "ops", "127.0.0.1:1", "test", out=ListSink())

    @defer.inlineCallbacks
    def test_open_ports_found_exactly(self) -> Any:
        listening = sorted(self.ports.listening() for _ in range(3))
        closed = [self.ports.closed() for _ in range(3)]
        spec = ",".join(map(str, listening + closed))
        ctx = self.context()
        result = yield self.core.call(ctx, "portscan", host="127.0.0.1", ports=spec)
        self.assertEqual(result["open"], listening)
        self.assertEqual(result["ports"], 6)
        assert isinstance(ctx.out, ListSink)
        self.assertEqual(sorted(ctx.out.lines), sorted(f"Connected to port {p}"
                                                       for p in listening))

    @defer.inlineCallbacks
    def test_ipv6_loopback(self) -> Any:
        if not socket.has_ipv6:
            self.skipTest("no IPv6")
        server = socket.socket(socket.AF_INET6)
        self.addCleanup(server.close)
        try:
            server.bind(("::1", 0))
        except OSError:
            self.skipTest("no IPv6 loopback here")
        server.listen(4)
        port = server.getsockname()[1]
        closed = self.ports.closed()  # an IPv4 port: nothing listens on ::1 there
        result = yield self.core.call(self.context(), "portscan", host="::1",
                                      ports=f"{port},{closed}")
        self.assertEqual(result["open"], [port])

    @defer.inlineCallbacks
    def test_cancel_closes_every_socket(self) -> Any:
        listening = [self.ports.listening() for _ in range(2)]
        clogged = [self.ports.clogged() for _ in range(5)]
        yield deferLater(0)  # the reactor runs (its startup opens descriptors of its own)
        baseline = open_fds()
        ctx = self.context()
        d = self.core.run_line(ctx, "portscan 127.0.0.1 " + ",".join(map(str, listening +
                                                                            clogged)))
        self.addCleanup(d.cancel)
        # Wait until the scan has found the open ports and holds the five clogged connects.
        for _ in range(200):
            if self.policy.scan.budget.in_flight == 5:
                break
            yield deferLater(0.01)
        self.assertEqual(self.policy.scan.budget.in_flight, 5)
        self.assertEqual(open_fds(), baseline + 5)
        assert isinstance(ctx.out, ListSink)
        self.assertEqual(len(ctx.out.lines), 2)
        d.cancel()
        self.assertEqual(open_fds(), baseline)  # at once, not within a second
        self.assertEqual(self.policy.scan.budget.in_flight, 0)
        reply = yield d
        self.assertEqual(reply.lines, ["Error: cancelled"])


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class Client(LineReceiver):
    delimiter = b"\r\n"

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.waiting: tuple[str, defer.Deferred] | None = None

    def lineReceived(self, line: bytes) -> None:
        text = line.decode()
        self.lines.append(text)
        if self.waiting and text.startswith(self.waiting[0]):
            d, self.waiting = self.waiting[1], None
            d.callback(list(self.lines))

    def until(self, prefix: str) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting = (prefix, d)
        return d


class LineDoorTests(TestCase):
    """A person with netcat: the scan through the line door, and leaving mid-scan."""

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.ports = Ports()
        self.addCleanup(self.ports.close)
        self.policy = Policy([self.mktemp()], ScanPolicy(timeout=30.0))
        self.core = CommandCore(Registry([PortScan()]), self.policy, reactor)
        factory = LineFactory(self.core, LineSettings(greeting="hi"))
        self.listener = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            factory)
        self.addCleanup(self.listener.stopListening)

    @defer.inlineCallbacks
    def connect(self) -> Any:
        port = self.listener.getHost().port
        client = yield TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(
            Factory.forProtocol(Client))
        self.addCleanup(client.transport.loseConnection)
        yield client.until("hi")
        return client

    @defer.inlineCallbacks
    def test_scan_through_the_line_door(self) -> Any:
        listening = sorted(self.ports.listening() for _ in range(2))
        closed = self.ports.closed()
        client = yield self.connect()
        client.lines.clear()
        done = client.until("Scanned")
        client.sendLine(f"portscan 127.0.0.1 {listening[0]},{closed},{listening[1]}".encode())
        lines = yield done
        self.assertEqual(lines[:2], [f"Connected to port {p}" for p in listening])
        self.assertRegex(lines[2], r"^Scanned 3 ports on 127\.0\.0\.1 in \d+\.\d\ds: 2 open$")

    @defer.inlineCallbacks
    def test_client_leaving_cancels_the_scan(self) -> Any:
        clogged = [self.ports.clogged() for _ in range(3)]
        client = yield self.connect()
        baseline = open_fds()
        client.sendLine(("portscan 127.0.0.1 " + ",".join(map(str, clogged))).encode())
        for _ in range(200):
            if self.policy.scan.budget.in_flight == 3:
                break
            yield deferLater(0.01)
        self.assertEqual(self.policy.scan.budget.in_flight, 3)
        # A reset: a FIN alone reads as a half-close, whose queued answers are still due.
        client.transport.abortConnection()
        for _ in range(100):  # the server sees the close within a reactor turn or two
            if self.policy.scan.budget.in_flight == 0:
                break
            yield deferLater(0.01)
        self.assertEqual(self.policy.scan.budget.in_flight, 0)
        self.assertEqual(open_fds(), baseline - 2)  # client and server ends of the line too
