"""XML-RPC on /RPC2 with Python's own client; /metrics with prometheus_client's
parser; /healthz."""

from __future__ import annotations

import xmlrpc.client
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from tests.doors.http.support import HTTPServer
from tests.end_to_end.support import in_thread
from tests.helpers import OutsideTreeTempMixin


class RPCTests(OutsideTreeTempMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.server = HTTPServer(self.mktemp())
        yield self.server.start()
        self.addCleanup(self.server.stop)
        with open(f"{self.server.root}/notes.txt", "w") as f:
            f.write("alpha")

    def proxy(self, password: str | None = None) -> xmlrpc.client.ServerProxy:
        secret = self.server.password if password is None else password
        return xmlrpc.client.ServerProxy(
            f"http://admin:{secret}@127.0.0.1:{self.server.port}/RPC2", allow_none=True)

    @defer.inlineCallbacks
    def test_python_s_own_client_works_unmodified(self) -> Any:
        def run() -> dict:
            proxy = self.proxy()
            out: dict[str, Any] = {
                "ping": proxy.ping(),
                "methods": proxy.system.listMethods(),
                "help": proxy.system.methodHelp("comphash"),
                "positional": proxy.comphash("notes.txt", "md5"),
                "named": proxy.comphash({"path": "notes.txt", "algo": "md5"}),
                "lastlog": proxy.lastlog(2),
                "ls": proxy.ls(),
            }
            faults = []
            for call in (lambda: proxy.ls("../.."), lambda: proxy.nosuch(),
                         lambda: proxy.lastlog(0), lambda: proxy.lastlog(1, 2),
                         lambda: proxy.comphash("missing"), lambda: proxy.exit()):
                try:
                    call()
                except xmlrpc.client.Fault as f:
                    faults.append((f.faultCode, f.faultString))
            out["faults"] = faults
            try:
                self.proxy("wrong").ping()
            except xmlrpc.client.ProtocolError as e:
                out["unauthorized"] = e.errcode
            return out

        out = yield in_thread(run)
        self.assertEqual(out["ping"], "pong")
        served = [c.name for c in self.server.service.core.registry.commands("http")
                  if c.name != "upload"]
        self.assertEqual(out["methods"], [*served, "system.listMethods", "system.methodHelp",
                                          "system.methodSignature"])
        self.assertEqual(out["help"].splitlines()[0], "usage: comphash(path, algo='sha256')")
        self.assertEqual(out["positional"], "2c1743a391305fbf367df8e4f069f9f9")
        self.assertEqual(out["named"], out["positional"])
        self.assertEqual(out["lastlog"], ["log line 18", "log line 19"])
        self.assertEqual(out["ls"], ["notes.txt"])
        self.assertEqual(out["faults"], [
            (403, "path outside allowed roots"), (404, "Command not found."),
            (400, "n must be 1..1000, not 0"), (400, "usage: lastlog(n=10)"),
            (422, "no such file or directory: missing"), (404, "Command not found.")])
        self.assertEqual(out["unauthorized"], 401)

    @defer.inlineCallbacks
    def test_a_call_must_be_xml(self) -> Any:
        body = xmlrpc.client.dumps((), "ping").encode()
        answer = yield self.server.call("POST", "/RPC2", body,
                                        {**self.server.bearer(), "Content-Type": "text/plain"})
        self.assertEqual(answer.status, 415)
        answer = yield self.server.call("POST", "/RPC2", body,
                                        {**self.server.bearer(), "Content-Type": "text/xml"})
        self.assertEqual(xmlrpc.client.loads(answer.body)[0], ("pong",))


class MetricsTests(OutsideTreeTempMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def start(self, *argv: str) -> Any:
        self.server = HTTPServer(self.mktemp(), *argv)
        yield self.server.start()
        self.addCleanup(self.server.stop)

    def families(self, text: bytes) -> dict[str, Any]:
        return {f.name: f for f in text_string_to_metric_families(text.decode())}

    @defer.inlineCallbacks
    def test_metrics_from_the_core_s_counters(self) -> Any:
        yield self.start("--line", "tcp:0:interface=127.0.0.1")
        answer = yield self.server.call("GET", "/metrics", headers={})
        self.assertEqual(answer.status, 401)  # not public unless configured
        for body in ({}, {}, {"args": {"n": 0}}):
            yield self.server.command("ping" if not body else "lastlog", body)
        yield self.server.command("comphash", {"args": {"path": "missing"}})
        answer = yield self.server.call("GET", "/metrics")
        self.assertEqual(answer.status, 200)
        self.assertTrue(answer.headers["Content-Type"].startswith("text/plain"))
        families = self.families(answer.body)
        commands = {tuple(s.labels[k] for k in ("command", "door", "outcome")): s.value
                    for s in families["cmdserver_commands"].samples}
        self.assertEqual(commands[("ping", "http", "ok")], 2)
        self.assertEqual(commands[("lastlog", "http", "refused")], 1)
        self.assertEqual(commands[("comphash", "http", "error")], 1)
        durations = families["cmdserver_command_duration_seconds"]
        counts = {s.labels["command"]: s.value for s in durations.samples
                  if s.name.endswith("_count")}
        self.assertEqual(counts["ping"], 2)
        buckets = [s.value for s in durations.samples
                   if s.name.endswith("_bucket") and s.labels["command"] == "ping"]
        self.assertEqual(buckets, sorted(buckets))  # cumulative
        self.assertEqual(buckets[-1], 2)
        open_now = {s.labels["door"]: s.value for s in families["cmdserver_connections_open"]
                    .samples}
        self.assertEqual(open_now, {"http": 1, "line": 0})
        for name in ("cmdserver_connections_refused", "cmdserver_login_failures",
                     "cmdserver_upload_bytes", "cmdserver_upload_files",
                     "cmdserver_portscan_ports_probed", "cmdserver_audit_write_errors",
                     "process_cpu_seconds", "process_resident_memory_bytes"):
            self.assertIn(name, families)
        # Never a user name or an address as a label value.
        for family in families.values():
            for sample in family.samples:
                for value in sample.labels.values():
                    self.assertNotIn("admin", value)
                    self.assertNotIn("127.0.0.1", value)
        answer = yield self.server.call("GET", "/metrics", headers={
            **self.server.bearer(), "Accept": "application/openmetrics-text"})
        self.assertTrue(answer.headers["Content-Type"].startswith(
            "application/openmetrics-text"))
        self.assertTrue(answer.body.endswith(b"# EOF\n"))

    @defer.inlineCallbacks
    def test_public_metrics_and_health(self) -> Any:
        yield self.start("--metrics-public", "--line", "tcp:0:interface=127.0.0.1")
        answer = yield self.server.call("GET", "/metrics", headers={})
        self.assertEqual(answer.status, 200)
        answer = yield self.server.call("GET", "/healthz", headers={})
        self.assertEqual((answer.status, answer.json),
                         (200, {"status": "ok", "doors": {"line": True, "http": True}}))
        [line] = [d for d in self.server.service.doors if d.door == "line"]
        yield line.stopService()
        answer = yield self.server.call("GET", "/healthz", headers={})
        self.assertEqual((answer.status, answer.json), (503, {
            "status": "unavailable", "doors": {"line": False, "http": True},
            "down": ["line"]}))
