"""The TCP connect scan engine behind ``portscan``, integrated with the reactor.

Why not one ``connectTCP`` (a Factory, a Protocol, a Deferred) per port gathered
with a ``DeferredList``: on loopback almost all the time then goes into that
bookkeeping, and a full 1-65535 scan takes several times as long as nmap's
(docs/benchmarks.md has the figures).
Here a :class:`Scan` is one Deferred for the whole scan and a *pump*:

- each reactor turn it starts connects for up to :data:`TURN_SECONDS` on raw non-blocking
  sockets, never more than ``concurrency`` of its own (and the shared
  :class:`ConnectBudget`) in flight;
- right after ``connect()`` says "in progress" it asks again: on loopback the
  answer (refused, or connected) is almost always already there, so the
  socket is closed in the same call and never reaches the reactor;
- a connect that is really still in progress becomes a :class:`_Probe`, an
  ``IWriteDescriptor`` registered with ``reactor.addWriter``; writability
  settles it, and one timer expires every probe older than ``timeout``;
- a refused socket is reused for the next port (Linux allows it), so most
  ports cost two ``connect()`` calls and no ``socket()``/``close()``;
- an open port's socket is closed at once with ``SO_LINGER`` 0 (a reset, so no
  ``TIME_WAIT`` is left behind).

Memory and file descriptors stay bounded: ports come one at a time from an
iterator and only the probes in flight hold a socket.  Cancelling the Deferred
closes every socket the scan holds, at once.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IWriteDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from cmdserver.errors import CommandError
from cmdserver.policy import ConnectBudget

# A reactor turn starts connects for at most TURN_SECONDS (looking at the clock
# every CLOCK_EVERY connects), and at most BATCH of them: other clients wait at
# most about that long for their turn (bench/responsive.py), while the per-turn
# overhead stays small against the turn (bench/portscan).
TURN_SECONDS = 0.001
CLOCK_EVERY = 16
BATCH = 512
_NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)
_LINGER_RESET = struct.pack("ii", 1, 0)
_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK})
_CONNECTED = frozenset({0, errno.EISCONN})
# The target answered, or a router did for it: the port is not open, go on.
_NOT_OPEN = frozenset({
    errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
    errno.EHOSTUNREACH, errno.EHOSTDOWN,
})

SocketFactory = Callable[[int, int], Any]


class ScanError(CommandError):
    """The scan cannot go on (no route, out of sockets): every later port would fail too."""


@implementer(IWriteDescriptor)
class _Probe:
    """One connect still in progress, watched by the reactor until it settles."""

    __slots__ = ("scan", "sock", "port", "deadline", "_fileno")

    def __init__(self, scan: Scan, sock: Any, port: int, deadline: float) -> None:
        self.scan = scan
        self.sock = sock
        self.port = port
        self.deadline = deadline
        self._fileno = sock.fileno()

    def fileno(self) -> int:
        return self._fileno

    def doWrite(self) -> None:
        self.scan._settle(self, lost=False)

    def connectionLost(self, reason: Failure) -> None:
        self.scan._settle(self, lost=True)

    def logPrefix(self) -> str:
        return "portscan"


class Scan:
    """One TCP connect scan of ``ports`` on one address; :meth:`start` returns its Deferred.

    ``address`` is an IP literal of ``family`` (``AF_INET`` or ``AF_INET6``).
    ``on_open(port)`` is called as each open port is found.  The Deferred fires
    with the sorted open ports, fails with :class:`ScanError`, and on
    ``cancel()`` closes every socket the scan holds.
    """

    def __init__(self, reactor: Any, family: int, address: str, ports: Iterable[int], *,
                 concurrency: int, timeout: float, budget: ConnectBudget,
                 on_open: Callable[[int], None] | None = None,
                 socket_factory: SocketFactory = socket.socket, scope_id: int = 0) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.reactor = reactor
        self.family = family
        self.address = address
        self.concurrency = concurrency
        self.timeout = timeout
        self.budget = budget
        self.on_open = on_open
        self.open: list[int] = []
        self.probed = 0
        # Linux lets a socket whose connect was refused connect again (the refusal
        # resets it to unconnected, its source port released): reusing it saves a
        # socket() and a close() per closed port, a third of a loopback scan's time.
        self.reuse_refused = sys.platform.startswith("linux")
        self._ports = iter(ports)
        self._exhausted = False
        self._new_socket = socket_factory
        self._scope_id = scope_id
        self._pending: dict[_Probe, None] = {}  # insertion order is deadline order
        self._pump_call: Any = None
        self._sweep_call: Any = None
        self._finished = False
        self._deferred: Deferred = Deferred(lambda _: self._stop())

    @property
    def open_sockets(self) -> int:
        """Sockets this scan holds now (only probes still in progress hold one)."""
        return len(self._pending)

    def start(self) -> Deferred:
        self._schedule()
        return self._deferred

    def wake(self) -> None:
        """Called by the budget when a slot is free again."""
        if not self._finished:
            self._schedule()

    # -- the pump -----------------------------------------------------------

    def _schedule(self) -> None:
        if self._pump_call is None:
            self._pump_call = self.reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self._pump_call = None
        if self._finished:
            return
        try:
            self._pump_batch()
        except Exception:
            self._fail(Failure())

    def _sockaddr(self, port: int) -> tuple[Any, ...]:
        if self.family == socket.AF_INET6:
            return (self.address, port, 0, self._scope_id)
        return (self.address, port)

    def _pump_batch(self) -> None:
        """Start connects for one turn (TURN_SECONDS, BATCH at most); most settle
        right here (the hot loop)."""
        pending, budget, ports = self._pending, self.budget, self._ports
        family, new_socket, sockaddr = self.family, self._new_socket, self._sockaddr
        concurrency, reuse = self.concurrency, self.reuse_refused
        blocked_by_budget = False
        started = 0
        turn_ends = perf_counter() + TURN_SECONDS
        turn_over = False
        spare = None  # a socket whose connect was refused, ready for the next port
        try:
            while True:
                if started % CLOCK_EVERY == 0 and started and (
                        started == BATCH or perf_counter() > turn_ends):
                    turn_over = True
                    break
                if len(pending) >= concurrency:
                    break
                if budget.in_flight >= budget.limit:
                    blocked_by_budget = True
                    break
                port = next(ports, None)
                if port is None:
                    self._exhausted = True
                    break
                started += 1
                addr = sockaddr(port)
                if spare is not None:
                    sock, spare = spare, None
                else:
                    try:
                        sock = new_socket(family, _NONBLOCKING_STREAM)
                    except OSError as e:
                        raise ScanError(
                            f"scan failed: cannot open a socket: {_reason(e)}") from None
                err = sock.connect_ex(addr)
                if err == errno.EINPROGRESS:
                    err = sock.connect_ex(addr)  # loopback has usually answered already
                if err == errno.ECONNREFUSED:
                    if reuse:
                        spare = sock
                    else:
                        sock.close()
                elif err in _IN_PROGRESS:
                    self._watch(sock, port)
                else:
                    self._settled(sock, port, err)
                    if self._finished:  # the sink cancelled the scan
                        break
        finally:
            if spare is not None:
                spare.close()
        self.probed += started
        self.budget.probed += started
        if self._finished:
            return
        if self._exhausted:
            if not pending:
                self._finish()
        elif blocked_by_budget:
            budget.wait(self)
        elif turn_over:
            self._schedule()  # the turn's time is up: yield to the reactor, go on next turn
        # else: our own bound is full; a settling probe reschedules the pump.

    def _settled(self, sock: Any, port: int, err: int) -> None:
        """Close a socket whose connect is over and record an open port."""
        try:
            if err in _CONNECTED and not self._is_self_connect(sock, port):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                self.open.append(port)
                if self.on_open is not None:
                    self.on_open(port)
            elif err not in _CONNECTED and err not in _NOT_OPEN:
                raise ScanError(f"scan failed: {os.strerror(err).lower()}")
        finally:
            sock.close()

    def _is_self_connect(self, sock: Any, port: int) -> bool:
        """A connect to a free port of our own address may pick that very port as its
        source and connect to itself; no listener is there, so it is not open."""
        try:
            local = sock.getsockname()
        except OSError:
            return False
        return local[1] == port and local[0] == self.address

    # -- connects still in progress ----------------------------------------

    def _watch(self, sock: Any, port: int) -> None:
        probe = _Probe(self, sock, port, self.reactor.seconds() + self.timeout)
        self._pending[probe] = None
        self.budget.acquire()
        self.reactor.addWriter(probe)
        if self._sweep_call is None:
            self._sweep_call = self.reactor.callLater(self.timeout, self._sweep)

    def _settle(self, probe: _Probe, lost: bool) -> None:
        """The reactor says the probe's socket is writable (or broken): ask how it went."""
        if probe not in self._pending:
            return
        err = probe.sock.connect_ex(self._sockaddr(probe.port))
        if err in _IN_PROGRESS:
            if not lost:
                return  # not settled yet
            err = errno.ECONNRESET
        self._drop(probe)
        try:
            self._settled(probe.sock, probe.port, err)
        except Exception:
            self._fail(Failure())
            return
        self._after_probe()

    def _drop(self, probe: _Probe) -> None:
        """Stop watching a probe and give its slot back (its socket is closed by the caller)."""
        del self._pending[probe]
        self.reactor.removeWriter(probe)
        self.budget.release()

    def _after_probe(self) -> None:
        if self._finished:
            return
        if self._exhausted:
            if not self._pending:
                self._finish()
        else:
            self._schedule()

    def _sweep(self) -> None:
        """Expire every probe past its deadline (a filtered port: not open)."""
        self._sweep_call = None
        now = self.reactor.seconds()
        expired = False
        while self._pending:
            probe = next(iter(self._pending))
            if probe.deadline > now:
                break
            self._drop(probe)
            probe.sock.close()
            expired = True
        if self._pending:
            head = next(iter(self._pending))
            self._sweep_call = self.reactor.callLater(max(0.0, head.deadline - now),
                                                      self._sweep)
        if expired:
            self._after_probe()

    # -- the end ------------------------------------------------------------

    def _stop(self) -> None:
        """Close everything the scan holds; safe to call more than once."""
        self._finished = True
        self.budget.forget(self)
        for call in (self._pump_call, self._sweep_call):
            if call is not None and call.active():
                call.cancel()
        self._pump_call = self._sweep_call = None
        pending, self._pending = self._pending, {}
        for probe in pending:
            self.reactor.removeWriter(probe)
            probe.sock.close()
            self.budget.release()

    def _finish(self) -> None:
        self._stop()
        self.open.sort()
        self._deferred.callback(self.open)

    def _fail(self, failure: Failure) -> None:
        if self._finished:
            return
        self._stop()
        self._deferred.errback(failure)


def _reason(e: OSError) -> str:
    return (e.strerror or str(e)).lower()
