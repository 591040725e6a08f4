"""The scan engine against a fake reactor and fake sockets: bounds, timeouts, cancellation."""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cmdserver.commands.portscan import scanner
from cmdserver.commands.portscan.scanner import BATCH, ConnectBudget, Scan, ScanError
from tests.helpers.fakenet import FakeNetwork


class ScanTestsMixin:
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.budget = ConnectBudget(10_000)
        self.found: list[int] = []

    def scan(self, net: FakeNetwork, ports, concurrency: int = 100, timeout: float = 2.0,
             budget: ConnectBudget | None = None, family: int = socket.AF_INET,
             address: str = "127.0.0.1") -> Scan:
        return Scan(self.reactor, family, address, ports, concurrency=concurrency,
                    timeout=timeout, budget=budget or self.budget,
                    on_open=self.found.append, socket_factory=net.socket)

    def turn(self, times: int = 1) -> None:
        """One reactor iteration: run the calls due now, but not those they schedule.

        (``Clock.advance(0)`` would also run calls scheduled while it runs; a real
        reactor leaves those to its next iteration, after polling for I/O.)
        """
        for _ in range(times):
            now = self.reactor.seconds()
            due = [c for c in self.reactor.calls if c.getTime() <= now]
            for call in due:
                if call.active():
                    self.reactor.calls.remove(call)
                    call.called = 1
                    call.func(*call.args, **call.kw)

    def settle(self, net: FakeNetwork, port: int, state: str) -> None:
        """The network answers for a pending port; the reactor reports it writable."""
        (probe,) = [w for w in self.reactor.getWriters() if w.port == port]
        probe.sock.state = state
        probe.doWrite()


class FastPathTests(ScanTestsMixin, TestCase):
    def test_open_ports_found_and_closed_ports_not(self) -> None:
        net = FakeNetwork(open_ports={22, 80, 443})
        d = self.scan(net, range(1, 1001)).start()
        self.turn(10)
        self.assertEqual(self.successResultOf(d), [22, 80, 443])
        self.assertEqual(self.found, [22, 80, 443])
        self.assertEqual(net.open_sockets(), [])
        self.assertEqual(len(net.connects), 1000)
        self.assertEqual(self.budget.probed, 1000)  # every scan's, for /metrics

    def test_refused_socket_reused_for_the_next_port(self) -> None:
        """One socket serves a run of closed ports; an open port's socket is not reused."""
        net = FakeNetwork(open_ports={5})
        d = self.scan(net, range(1, 11)).start()
        self.turn()
        self.assertEqual(self.successResultOf(d), [5])
        self.assertEqual([a[1] for a in net.connects], list(range(1, 11)))
        self.assertEqual(len(net.sockets), 2)  # 1-5 (5 open, so closed), then 6-10
        self.assertEqual(net.reused, 9)
        self.assertEqual(net.open_sockets(), [])  # the spare is closed after the batch

    def test_without_reuse_every_port_gets_its_own_socket(self) -> None:
        net = FakeNetwork(open_ports={5})
        scan = self.scan(net, range(1, 11))
        scan.reuse_refused = False
        d = scan.start()
        self.turn()
        self.assertEqual(self.successResultOf(d), [5])
        self.assertEqual(len(net.sockets), 10)
        self.assertEqual(net.open_sockets(), [])

    def test_every_port_probed_once_in_order(self) -> None:
        net = FakeNetwork()
        d = self.scan(net, [5, 1, 3]).start()
        self.turn()
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual([a[1] for a in net.connects], [5, 1, 3])

    def test_open_socket_closed_with_a_reset(self) -> None:
        net = FakeNetwork(open_ports={80})
        self.scan(net, [80]).start()
        self.turn()
        (sock,) = net.sockets
        self.assertTrue(sock.closed)
        self.assertEqual(sock.linger, b"\x01\x00\x00\x00\x00\x00\x00\x00")

    def test_self_connect_is_not_an_open_port(self) -> None:
        net = FakeNetwork(open_ports={80}, self_connect={45000})
        d = self.scan(net, [80, 45000]).start()
        self.turn()
        self.assertEqual(self.successResultOf(d), [80])

    def test_ipv6_address_tuple(self) -> None:
        net = FakeNetwork(open_ports={22}, host="::1")
        d = self.scan(net, [22], family=socket.AF_INET6, address="::1").start()
        self.turn()
        self.assertEqual(self.successResultOf(d), [22])
        self.assertEqual(net.connects, [("::1", 22, 0, 0)])
        self.assertEqual(net.sockets[0].family, socket.AF_INET6)

    def test_batches_yield_to_the_reactor(self) -> None:
        """No turn starts more than BATCH connects, so other clients are served between."""
        net = FakeNetwork()
        d = self.scan(net, range(1, 3 * BATCH + 1)).start()
        self.assertEqual(len(net.sockets), 0)  # nothing happens before the reactor runs
        for turn in range(1, 4):
            self.turn()
            self.assertEqual(len(net.connects), turn * BATCH)
            self.assertEqual(net.open_sockets(), [])
        self.turn()
        self.assertEqual(self.successResultOf(d), [])

    def test_a_turn_ends_when_its_time_is_up(self) -> None:
        """A turn whose connects are slow (a loaded machine) ends after TURN_SECONDS,
        looking at the clock every CLOCK_EVERY connects, and the scan goes on."""
        now = [100.0]

        def clock() -> float:  # each look at the clock finds 0.4 ms more gone
            now[0] += 0.0004
            return now[0]

        self.patch(scanner, "perf_counter", clock)
        self.assertEqual(scanner.TURN_SECONDS, 0.001)
        net = FakeNetwork()
        d = self.scan(net, range(1, 201)).start()
        self.turn()  # looks at 16 (0.4 ms), 32 (0.8), 48 (1.2 ms: over)
        self.assertEqual(len(net.connects), 3 * scanner.CLOCK_EVERY)
        for _ in range(4):
            self.turn()
        self.assertEqual(len(net.connects), 200)
        self.assertEqual(self.successResultOf(d), [])

    def test_no_ports(self) -> None:
        d = self.scan(FakeNetwork(), []).start()
        self.turn()
        self.assertEqual(self.successResultOf(d), [])

    def test_unreachable_network_fails_the_scan(self) -> None:
        net = FakeNetwork(errors={3: errno.ENETUNREACH})
        d = self.scan(net, range(1, 10)).start()
        self.turn()
        failure = self.failureResultOf(d, ScanError)
        self.assertEqual(failure.value.text, "Error: scan failed: network is unreachable")
        self.assertEqual(net.open_sockets(), [])
        self.assertEqual(len(net.connects), 3)  # stopped at the first failure

    def test_host_unreachable_is_not_open(self) -> None:
        net = FakeNetwork(errors={3: errno.EHOSTUNREACH})
        d = self.scan(net, range(1, 10)).start()
        self.turn()
        self.assertEqual(self.successResultOf(d), [])

    def test_out_of_sockets_fails_the_scan(self) -> None:
        net = FakeNetwork()
        net.fail_socket = OSError(errno.EMFILE, "Too many open files")
        d = self.scan(net, [1]).start()
        self.turn()
        failure = self.failureResultOf(d, ScanError)
        self.assertEqual(failure.value.text,
                         "Error: scan failed: cannot open a socket: too many open files")

    def test_a_failing_sink_fails_the_scan_and_closes_everything(self) -> None:
        net = FakeNetwork(open_ports={2}, pending={1})

        def boom(port: int) -> None:
            raise RuntimeError("sink broke")

        scan = Scan(self.reactor, socket.AF_INET, "127.0.0.1", [1, 2], concurrency=10,
                    timeout=1, budget=self.budget, on_open=boom, socket_factory=net.socket)
        d = scan.start()
        self.turn()
        self.failureResultOf(d, RuntimeError)
        self.assertEqual(net.open_sockets(), [])
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.budget.in_flight, 0)


    def test_cancel_from_the_sink_stops_at_once(self) -> None:
        """A client that goes away while an open port is being reported."""
        net = FakeNetwork(open_ports={3}, pending={1})
        scans: list[Any] = []

        def leave(port: int) -> None:
            scans[0].cancel()

        scan = Scan(self.reactor, socket.AF_INET, "127.0.0.1", range(1, 100), concurrency=10,
                    timeout=1, budget=self.budget, on_open=leave, socket_factory=net.socket)
        scans.append(scan.start())
        self.turn()
        self.failureResultOf(scans[0], CancelledError)
        self.assertEqual([a[1] for a in net.connects], [1, 2, 3])
        self.assertEqual(net.open_sockets(), [])
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.budget.in_flight, 0)


class PendingTests(ScanTestsMixin, TestCase):
    def test_pending_connect_settles_open_when_writable(self) -> None:
        net = FakeNetwork(pending={80, 81})
        d = self.scan(net, [79, 80, 81]).start()
        self.turn()
        self.assertNoResult(d)
        self.assertEqual(len(self.reactor.getWriters()), 2)
        self.settle(net, 80, "open")
        self.assertEqual(self.found, [80])
        self.assertNoResult(d)
        self.settle(net, 81, "refused")
        self.assertEqual(self.successResultOf(d), [80])
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(net.open_sockets(), [])

    def test_spurious_wakeup_keeps_waiting(self) -> None:
        net = FakeNetwork(pending={80})
        d = self.scan(net, [80]).start()
        self.turn()
        (probe,) = self.reactor.getWriters()
        probe.doWrite()  # still EALREADY
        self.assertNoResult(d)
        self.assertEqual(self.reactor.getWriters(), [probe])

    def test_connection_lost_settles_as_not_open(self) -> None:
        net = FakeNetwork(pending={80})
        d = self.scan(net, [80]).start()
        self.turn()
        (probe,) = self.reactor.getWriters()
        probe.connectionLost(Failure(ConnectionError()))
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(net.open_sockets(), [])

    def test_per_connect_timeout(self) -> None:
        """A port that never answers (filtered) is given up after the timeout, not open."""
        net = FakeNetwork(pending={80, 81})
        d = self.scan(net, [80, 81, 82], timeout=3.0).start()
        self.turn()
        self.reactor.advance(2.9)
        self.assertNoResult(d)
        self.assertEqual(len(net.open_sockets()), 2)
        self.reactor.advance(0.1)
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(net.open_sockets(), [])
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.budget.in_flight, 0)

    def test_timeouts_follow_each_connect_start(self) -> None:
        net = FakeNetwork(pending={1, 2, 3})
        d = self.scan(net, [1, 2, 3], concurrency=1, timeout=1.0).start()
        self.turn()
        self.reactor.advance(1.0)  # port 1 expires, port 2 starts
        self.turn()
        self.assertEqual([w.port for w in self.reactor.getWriters()], [2])
        self.reactor.advance(0.5)
        self.settle(net, 2, "open")  # answers in time
        self.turn()
        self.assertEqual([w.port for w in self.reactor.getWriters()], [3])
        self.reactor.advance(1.0)
        self.assertEqual(self.successResultOf(d), [2])

    def test_concurrency_bound_honoured(self) -> None:
        net = FakeNetwork(pending=range(1, 101))
        d = self.scan(net, range(1, 101), concurrency=7, timeout=1.0).start()
        most = 0
        for _ in range(200):
            self.turn()
            most = max(most, len(self.reactor.getWriters()), len(net.open_sockets()))
            if d.called:
                break
            self.reactor.advance(1.0)
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(most, 7)
        self.assertEqual(len(net.connects), 100)

    def test_cancel_closes_every_socket_at_once(self) -> None:
        net = FakeNetwork(pending=range(1, 501))
        scan = self.scan(net, range(1, 1001), concurrency=300)
        d = scan.start()
        self.turn(2)  # two batches
        self.assertEqual(scan.open_sockets, 300)
        self.assertEqual(len(net.open_sockets()), 300)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(net.open_sockets(), [])
        self.assertEqual(scan.open_sockets, 0)
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.budget.in_flight, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # no pump, no sweep left
        started = len(net.connects)
        self.reactor.advance(10)
        self.assertEqual(len(net.connects), started)  # nothing starts after the cancel


class BudgetTests(ScanTestsMixin, TestCase):
    def test_global_cap_shared_by_scans(self) -> None:
        budget = ConnectBudget(10)
        net = FakeNetwork(pending=range(1, 1000))
        d1 = self.scan(net, range(1, 101), concurrency=8, budget=budget).start()
        d2 = self.scan(net, range(101, 201), concurrency=8, budget=budget).start()
        self.turn()
        self.assertEqual(budget.in_flight, 10)
        self.assertEqual(len(net.open_sockets()), 10)
        most = 0
        for _ in range(100):
            self.reactor.advance(2.0)
            self.turn()
            most = max(most, len(net.open_sockets()))
            if d1.called and d2.called:
                break
        self.assertEqual(self.successResultOf(d1), [])
        self.assertEqual(self.successResultOf(d2), [])
        self.assertEqual(most, 10)
        self.assertEqual(len(net.connects), 200)
        self.assertEqual(budget.in_flight, 0)

    def test_blocked_scan_woken_when_another_frees_a_slot(self) -> None:
        budget = ConnectBudget(2)
        net = FakeNetwork(pending={1, 2, 3})
        d1 = self.scan(net, [1, 2], budget=budget).start()
        self.turn()
        d2 = self.scan(net, [3], budget=budget).start()
        self.turn()
        self.assertEqual([s.port for s in net.sockets], [1, 2])  # scan 2 waits
        self.settle(net, 1, "refused")
        self.turn()
        self.assertEqual([s.port for s in net.sockets], [1, 2, 3])
        self.settle(net, 2, "open")
        self.settle(net, 3, "open")
        self.turn()
        self.assertEqual(self.successResultOf(d1), [2])
        self.assertEqual(self.successResultOf(d2), [3])

    def test_cancelling_one_scan_frees_its_slots_for_another(self) -> None:
        budget = ConnectBudget(3)
        net = FakeNetwork(pending=range(1, 10))
        d1 = self.scan(net, [1, 2, 3], budget=budget).start()
        self.turn()
        d2 = self.scan(net, [4, 5], budget=budget).start()
        self.turn()
        self.assertEqual(len(net.sockets), 3)
        d1.cancel()
        self.failureResultOf(d1, CancelledError)
        self.turn()
        self.assertEqual(budget.in_flight, 2)
        self.assertEqual(sorted(s.port for s in net.open_sockets()), [4, 5])
        self.assertNoResult(d2)

    def test_budget_needs_a_slot(self) -> None:
        self.assertRaises(ValueError, ConnectBudget, 0)
