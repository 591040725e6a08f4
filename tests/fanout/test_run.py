"""cmdserver fleet's fan-out against real PB doors on loopback, and its bounds."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any, cast

from twisted.internet import defer, protocol, reactor, utils
from twisted.internet.address import IPv4Address
from twisted.trial import unittest

from cmdserver.fanout import run as fanout
from cmdserver.fanout.inventory import Host
from cmdserver.fanout.run import FAILED, OK, UNREACHABLE, HostResult, exit_status, run_on
from tests.end_to_end.pb_server import PBServer


class Silent(protocol.Protocol):
    """Accepts the connection and never says a word."""


class FanOutTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits for a Deferred setUp
        self.tmp = tempfile.mkdtemp(prefix="cmdserver-fleet-")
        self.servers = []
        for i in range(3):
            root = os.path.join(self.tmp, f"root{i}")
            os.makedirs(os.path.join(root, f"only-on-{i}"))
            server = PBServer(root, os.devnull)
            yield server.start()
            self.addCleanup(server.stop)
            self.servers.append(server)
        silent: protocol.ServerFactory = protocol.ServerFactory()
        silent.protocol = Silent
        self.silent = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(self.silent.stopListening)
        self.silent_port = cast(IPv4Address, self.silent.getHost()).port
        closed = reactor.listenTCP(0, protocol.ServerFactory(), interface="127.0.0.1")
        self.closed_port = cast(IPv4Address, closed.getHost()).port
        yield closed.stopListening()  # nothing listens there any more

    def hosts(self) -> list[Host]:
        return [Host(f"h{i}", "127.0.0.1", s.port) for i, s in enumerate(self.servers)]

    @defer.inlineCallbacks
    def test_every_host_answers_in_order(self) -> Any:
        seen: list[str] = []
        results = yield run_on(self.hosts(), "ls", [], "ops", "s3cret", forks=2,
                               on_result=lambda r: seen.append(r.host))
        self.assertEqual([r.host for r in results], ["h0", "h1", "h2"])
        self.assertEqual(sorted(seen), ["h0", "h1", "h2"])
        self.assertEqual([r.value for r in results], [["only-on-0"], ["only-on-1"],
                                                      ["only-on-2"]])
        self.assertEqual([r.status for r in results], [OK] * 3)
        self.assertEqual(exit_status(results), 0)

    @defer.inlineCallbacks
    def test_failed_and_unreachable_hosts(self) -> Any:
        hosts = [*self.hosts(), Host("gone", "127.0.0.1", self.closed_port),
                 Host("mute", "127.0.0.1", self.silent_port)]
        results = yield run_on(hosts, "ls", ["../.."], "ops", "s3cret", timeout=2)
        by_host = {r.host: r for r in results}
        self.assertEqual(by_host["h0"].status, FAILED)
        self.assertEqual(by_host["h0"].error, "Error: path outside allowed roots")
        self.assertEqual(by_host["gone"].status, UNREACHABLE)
        self.assertIn("refused", by_host["gone"].error)
        self.assertEqual(by_host["mute"].status, UNREACHABLE)
        self.assertEqual(exit_status(results), 2)
        wrong = yield run_on(self.hosts()[:1], "ping", [], "ops", "wrong")
        self.assertEqual((wrong[0].status, wrong[0].error), (FAILED, "Error: login failed"))
        self.assertEqual(exit_status(wrong), 1)

    @defer.inlineCallbacks
    def test_forks_bound_the_hosts_worked_on_at_once(self) -> Any:
        busy, most = [0], [0]
        real = fanout._run_one

        @defer.inlineCallbacks
        def counted(*args: Any) -> Any:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
            try:
                return (yield real(*args))
            finally:
                busy[0] -= 1

        self.patch(fanout, "_run_one", counted)
        hosts = self.hosts() * 4
        results = yield run_on(hosts, "ping", [], "ops", "s3cret", forks=3)
        self.assertEqual([r.value for r in results], ["pong"] * 12)
        self.assertEqual(most[0], 3)

    @defer.inlineCallbacks
    def test_the_cli(self) -> Any:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.servers)
        env = {**os.environ, "CMDSERVER_PASSWORD": "s3cret"}
        argv = ["-m", "cmdserver.cli", "fleet", "--user", "ops", "--hosts", hosts]
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, [*argv, "whoami"], env=env)
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(lines[0].split(), ["HOST", "STATUS", "SUMMARY"])
        self.assertEqual([line.split()[1:] for line in lines[1:4]], [["ok", "ops"]] * 3)
        self.assertEqual(lines[-1], "3 hosts: 3 ok, 0 failed, 0 unreachable")
        gone = ["--hosts", f"127.0.0.1:{self.closed_port}"]
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, [*argv, *gone, "--json", "ls", ".."], env=env)
        self.assertEqual(code, 2, err)
        records = [json.loads(line) for line in out.decode().splitlines()]
        self.assertEqual(sorted(r["status"] for r in records),
                         ["failed", "failed", "failed", "unreachable"])
        self.assertEqual({r["error"] for r in records if r["status"] == "failed"},
                         {"Error: path outside allowed roots"})


def test_summary() -> None:
    result = HostResult("h", "127.0.0.1", 1, OK, output=["a", "b"], text=["c"])
    assert result.summary == "a (+2 lines)"
    assert HostResult("h", "a", 1, FAILED, error="Error: x").summary == "Error: x"
    assert HostResult("h", "a", 1, OK, text=["pong"]).summary == "pong"
