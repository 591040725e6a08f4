"""``portscan`` through the command core, with a fake reactor, fake sockets and a fake resolver."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from cmdserver.commands.base import Context, ListSink, Registry
from cmdserver.commands.portscan.command import PortScan
from cmdserver.core import CommandCore, TextReply
from cmdserver.policy import Policy, ScanPolicy
from tests.helpers import capture_audit
from tests.helpers.fakenet import FakeNetwork


@implementer(IHostnameResolver)
class FakeResolver:
    """Answers from a table; names not in it resolve to nothing.  ``hold`` keeps answers back."""

    def __init__(self, table: dict[str, list[str]], hold: bool = False) -> None:
        self.table = table
        self.hold = hold
        self.asked: list[str] = []
        self.held: list[Any] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0,
                        addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        if self.hold:
            self.held.append(receiver)
            return None
        for host in self.table.get(hostName, []):
            kind = IPv6Address if ":" in host else IPv4Address
            receiver.addressResolved(kind("TCP", host, portNumber))
        receiver.resolutionComplete()
        return None


class Session:
    def end_session(self) -> None:
        pass


class PortScanTests(TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.net = FakeNetwork(open_ports={22, 80, 8080}, pending={9999})
        self.resolver = FakeResolver({
            "localhost": ["127.0.0.1", "::1"],
            "evil.example": ["10.0.0.1"],
            "mixed.example": ["127.0.0.1", "192.0.2.7"],
            "six.example": ["::1"],
        })
        self.build()
        self.events: list[dict[str, Any]] = capture_audit(self)

    def build(self, **scan: Any) -> None:
        self.policy = Policy([self.mktemp()], ScanPolicy(**scan))
        registry = Registry([PortScan(self.resolver, self.net.socket)])
        self.core = CommandCore(registry, self.policy, self.reactor)

    def context(self, session: Any = None) -> Context:
        return Context(self.core, "ops", "127.0.0.1:5000", "test", out=ListSink(),
                       session=session if session is not None else Session())

    def run_line(self, line: str, ctx: Context | None = None) -> tuple[Any, Context]:
        ctx = ctx or self.context()
        return self.core.run_line(ctx, line), ctx

    def finish(self, d: Any) -> TextReply:
        self.reactor.advance(0)
        return self.successResultOf(d)

    def audit(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "cmdserver.audit"]

    # -- what a user sees ---------------------------------------------------

    def test_open_ports_streamed_then_summary(self) -> None:
        d, ctx = self.run_line("portscan 127.0.0.1 20-100,8080")
        reply = self.finish(d)
        assert isinstance(ctx.out, ListSink)
        self.assertEqual(ctx.out.lines, ["Connected to port 22", "Connected to port 80",
                                         "Connected to port 8080"])
        self.assertEqual(reply, TextReply(["Scanned 82 ports on 127.0.0.1 in 0.00s: 3 open"],
                                          True))
        self.assertEqual(self.net.open_sockets(), [])

    def test_default_ports_are_1_to_1024(self) -> None:
        d, _ = self.run_line("portscan 127.0.0.1")
        reply = self.finish(d)
        self.assertEqual(reply.lines, ["Scanned 1024 ports on 127.0.0.1 in 0.00s: 2 open"])
        self.assertEqual(sorted(a[1] for a in self.net.connects), list(range(1, 1025)))

    def test_elapsed_time_in_summary(self) -> None:
        d, _ = self.run_line("portscan 127.0.0.1 9999")
        self.reactor.advance(0)
        self.reactor.advance(1.0)  # the pending port times out
        self.assertEqual(self.successResultOf(d).lines,
                         ["Scanned 1 ports on 127.0.0.1 in 1.00s: 0 open"])

    def test_result_value_for_pb(self) -> None:
        d = self.core.call(self.context(), "portscan", host="127.0.0.1", ports="1-100")
        self.reactor.advance(0)
        result = self.successResultOf(d)
        self.assertEqual(result, {"host": "127.0.0.1", "address": "127.0.0.1", "ports": 100,
                                  "open": [22, 80], "elapsed": 0.0})

    def test_pb_wrong_types_are_clean_errors(self) -> None:
        d = self.core.call(self.context(), "portscan", host="127.0.0.1", ports=[True])
        self.assertEqual(self.failureResultOf(d).value.text,
                         "Error: ports must be a string or a list of integers")
        d = self.core.call(self.context(), "portscan", host=None)
        self.assertEqual(self.failureResultOf(d).value.text, "Error: host must be a string")
        self.assertEqual(self.net.connects, [])

    def test_ipv6_literal_and_brackets(self) -> None:
        self.net.host = "::1"
        for host in ("::1", "[::1]"):
            d, _ = self.run_line(f"portscan {host} 22")
            self.assertEqual(self.finish(d).lines,
                             [f"Scanned 1 ports on {host} in 0.00s: 1 open"])
        self.assertEqual(self.net.connects, [("::1", 22, 0, 0)] * 2)
        self.assertEqual({s.family for s in self.net.sockets}, {socket.AF_INET6})

    def test_ipv4_mapped_address_scanned_as_ipv4(self) -> None:
        d, _ = self.run_line("portscan ::ffff:127.0.0.1 22")
        self.assertEqual(self.finish(d).ok, True)
        self.assertEqual(self.net.connects, [("127.0.0.1", 22)])
        self.assertEqual(self.net.sockets[0].family, socket.AF_INET)

    # -- host names ---------------------------------------------------------

    def test_host_name_resolved_then_scanned(self) -> None:
        d, _ = self.run_line("portscan localhost 22")
        self.assertEqual(self.finish(d).lines, ["Scanned 1 ports on localhost in 0.00s: 1 open"])
        self.assertEqual(self.resolver.asked, ["localhost"])
        self.assertEqual(self.net.connects, [("127.0.0.1", 22)])

    def test_host_name_resolving_to_ipv6(self) -> None:
        self.net.host = "::1"
        d = self.core.call(self.context(), "portscan", host="six.example", ports="80")
        self.reactor.advance(0)
        self.assertEqual(self.successResultOf(d)["address"], "::1")

    def test_unknown_host(self) -> None:
        d, _ = self.run_line("portscan nosuch.example")
        self.assertEqual(self.finish(d), TextReply(["Error: cannot resolve host: nosuch.example"],
                                                   False))
        self.assertEqual(self.net.sockets, [])

    def test_bad_host(self) -> None:
        for host in ("-x", "a/b", "ex\N{LATIN SMALL LETTER E WITH ACUTE}.com", "x" * 254, "a:b"):
            d, _ = self.run_line(f"portscan '{host}'")
            self.assertEqual(self.finish(d).lines,
                             [f"Error: bad host {host!r} (an IP address or a host name)"])
        self.assertEqual(self.resolver.asked, [])

    # -- the allowlist ------------------------------------------------------

    def test_targets_outside_the_allowlist_refused_before_any_packet(self) -> None:
        for host in ("10.0.0.1", "8.8.8.8", "0.0.0.0", "::2", "::", "::ffff:10.0.0.1",
                     "[2001:db8::1]", "fe80::1%1", "evil.example", "mixed.example"):
            d, _ = self.run_line(f"portscan {host} 22")
            self.assertEqual(self.finish(d), TextReply(["Error: target not allowed"], False),
                             host)
        self.assertEqual(self.net.sockets, [])

    def test_configured_allowlist(self) -> None:
        self.build(allow=["10.0.0.0/24"])
        d, _ = self.run_line("portscan evil.example 22")
        self.assertEqual(self.finish(d).ok, True)
        d, _ = self.run_line("portscan 127.0.0.1 22")
        self.assertEqual(self.finish(d).lines, ["Error: target not allowed"])

    def test_link_local_needs_a_known_interface(self) -> None:
        self.build(allow=["fe80::/10"])
        d, _ = self.run_line("portscan fe80::1%nosuch0 22")
        self.assertEqual(self.finish(d).lines, ["Error: no such network interface: nosuch0"])
        self.assertEqual(self.net.sockets, [])

    def test_link_local_with_interface_index(self) -> None:
        self.build(allow=["fe80::/10"])
        self.net.host = "fe80::1"
        d, _ = self.run_line("portscan fe80::1%1 22")
        self.assertEqual(self.finish(d).ok, True)
        self.assertEqual(self.net.connects, [("fe80::1", 22, 0, 1)])

    def test_a_resolver_that_raises_frees_the_connection(self) -> None:
        ctx = self.context()

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("resolver broke")

        self.patch(self.resolver, "resolveHostName", broken)
        d, _ = self.run_line("portscan localhost 22", ctx)
        self.assertEqual(self.successResultOf(d).lines,
                         ["Error: internal error (see the server log)"])
        self.flushLoggedErrors(RuntimeError)
        d, _ = self.run_line("portscan 127.0.0.1 22", ctx)
        self.assertEqual(self.finish(d).ok, True)

    # -- limits -------------------------------------------------------------

    def test_max_ports(self) -> None:
        self.build(max_ports=1024)
        d, _ = self.run_line("portscan 127.0.0.1 all")
        self.assertEqual(self.finish(d).lines,
                         ["Error: too many ports: 65535 (the limit is 1024)"])
        d, _ = self.run_line("portscan 127.0.0.1 1-1024")
        self.assertEqual(self.finish(d).ok, True)

    def test_bad_port_lists(self) -> None:
        for spec, message in [("0", "port out of range: 0 (ports are 1-65535)"),
                              ("65536", "port out of range: 65536 (ports are 1-65535)"),
                              ("90-80", "reversed port range '90-80'"),
                              ("22,,80", "empty item in port list '22,,80'"),
                              ("ssh", "bad port 'ssh' (ports are numbers 1-65535)")]:
            d, _ = self.run_line(f"portscan 127.0.0.1 {spec}")
            self.assertEqual(self.finish(d).lines, [f"Error: {message}"])
        self.assertEqual(self.net.sockets, [])

    def test_arguments(self) -> None:
        d, _ = self.run_line("portscan")
        self.assertEqual(self.successResultOf(d).lines, ["Please provide a host."])
        d, _ = self.run_line("portscan 127.0.0.1 22 80")
        self.assertEqual(self.successResultOf(d).lines, [
            "Error: usage: portscan HOST [PORTS]   (PORTS: 22,80,8000-8100 | all; "
            "default 1-1024)"])

    def test_scan_limits_come_from_the_core_policy(self) -> None:
        """A per-user policy (own roots) cannot loosen the daemon-wide scan policy."""
        ctx = self.context()
        ctx.policy = Policy([self.mktemp()], ScanPolicy(allow=["0.0.0.0/0"]))
        d, _ = self.run_line("portscan 10.0.0.1 22", ctx)
        self.assertEqual(self.finish(d).lines, ["Error: target not allowed"])

    def test_policy_concurrency_honoured(self) -> None:
        self.net.pending = set(range(1, 100))
        self.build(concurrency=5)
        d, _ = self.run_line("portscan 127.0.0.1 1-99")
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.getWriters()), 5)
        self.assertEqual(len(self.net.open_sockets()), 5)
        d.cancel()

    def test_global_cap_across_connections(self) -> None:
        self.net.pending = set(range(1, 1000))
        self.build(concurrency=8, max_in_flight=10)
        first, _ = self.run_line("portscan 127.0.0.1 1-100")
        second, _ = self.run_line("portscan 127.0.0.1 101-200")
        self.reactor.advance(0)
        self.assertEqual(len(self.net.open_sockets()), 10)
        self.assertEqual(self.policy.scan.budget.in_flight, 10)
        first.cancel()
        second.cancel()
        self.assertEqual(self.net.open_sockets(), [])
        self.assertEqual(self.policy.scan.budget.in_flight, 0)

    # -- one scan per connection --------------------------------------------

    def test_one_running_scan_per_connection(self) -> None:
        ctx = self.context()
        first, _ = self.run_line("portscan 127.0.0.1 9999", ctx)
        self.reactor.advance(0)
        second, _ = self.run_line("portscan 127.0.0.1 22", ctx)
        self.assertEqual(self.successResultOf(second).lines,
                         ["Error: a scan is already running on this connection"])
        other, _ = self.run_line("portscan 127.0.0.1 22")  # another connection may
        self.assertEqual(self.finish(other).ok, True)
        self.reactor.advance(1.0)  # the first one ends (timeout) ...
        self.assertEqual(self.successResultOf(first).ok, True)
        again, _ = self.run_line("portscan 127.0.0.1 22", ctx)  # ... so a new one may start
        self.assertEqual(self.finish(again).ok, True)

    def test_one_scan_per_connection_without_session_object(self) -> None:
        """Doors without a session object are keyed on door and peer address."""
        a = Context(self.core, "ops", "127.0.0.1:5000", "pb", out=ListSink())
        b = Context(self.core, "ops", "127.0.0.1:5000", "pb", out=ListSink())
        first = self.core.call(a, "portscan", host="127.0.0.1", ports="9999")
        second = self.core.call(b, "portscan", host="127.0.0.1", ports="22")
        self.assertEqual(self.failureResultOf(second).value.text,
                         "Error: a scan is already running on this connection")
        first.cancel()
        self.failureResultOf(first)

    def test_failed_scan_frees_the_connection(self) -> None:
        ctx = self.context()
        d, _ = self.run_line("portscan evil.example", ctx)
        self.assertEqual(self.finish(d).lines, ["Error: target not allowed"])
        d, _ = self.run_line("portscan 127.0.0.1 22", ctx)
        self.assertEqual(self.finish(d).ok, True)

    # -- cancellation -------------------------------------------------------

    def test_cancel_while_resolving(self) -> None:
        self.resolver.hold = True
        ctx = self.context()
        d, _ = self.run_line("portscan localhost", ctx)
        d.cancel()
        self.assertEqual(self.successResultOf(d).lines, ["Error: cancelled"])
        self.resolver.held[0].resolutionComplete()  # a late answer changes nothing
        self.assertEqual(self.net.sockets, [])
        self.resolver.hold = False
        d, _ = self.run_line("portscan localhost 22", ctx)
        self.assertEqual(self.finish(d).ok, True)

    def test_cancel_while_scanning_closes_every_socket(self) -> None:
        self.net.pending = set(range(1, 1000))
        ctx = self.context()
        d, _ = self.run_line("portscan 127.0.0.1 1-2000", ctx)
        self.reactor.advance(0)
        self.assertEqual(len(self.net.open_sockets()), 997)  # 1-999 but the open 22 and 80
        d.cancel()
        self.assertEqual(self.successResultOf(d).lines, ["Error: cancelled"])
        self.assertEqual(self.net.open_sockets(), [])
        self.assertEqual(self.reactor.getWriters(), [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        d, _ = self.run_line("portscan 127.0.0.1 22", ctx)
        self.assertEqual(self.finish(d).ok, True)

    # -- audit --------------------------------------------------------------

    def test_audit_has_target_port_count_open_count_and_duration(self) -> None:
        d, _ = self.run_line("portscan localhost 1-100,9999")
        self.reactor.advance(0)
        self.reactor.advance(1.0)
        self.successResultOf(d)
        (event,) = self.audit()
        self.assertEqual(event["outcome"], "ok")
        self.assertEqual(event["args"], {"host": "localhost", "ports": "1-100,9999",
                                         "count": 101})
        self.assertEqual(event["result"], {"address": "127.0.0.1", "ports": 101, "open": 2,
                                           "elapsed": 1.0})
        self.assertEqual(event["duration"], 1.0)

    def test_audit_of_refused_and_cancelled_scans(self) -> None:
        d, _ = self.run_line("portscan evil.example 1-10")
        self.finish(d)
        d, _ = self.run_line("portscan 127.0.0.1 9999")
        self.reactor.advance(0)
        d.cancel()
        d, _ = self.run_line("portscan 127.0.0.1 0")
        refused, cancelled, bad = self.audit()
        self.assertEqual((refused["outcome"], refused["error"]), ("error", "target not allowed"))
        self.assertEqual(refused["args"], {"host": "evil.example", "ports": "1-10", "count": 10})
        self.assertEqual(cancelled["outcome"], "cancelled")
        self.assertEqual(cancelled["args"]["count"], 1)
        self.assertEqual(bad["args"], {"host": "127.0.0.1", "ports": "0", "count": None})
        self.assertNotIn("result", refused)
