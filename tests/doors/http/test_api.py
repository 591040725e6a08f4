"""The HTTP door's JSON API against a real daemon on loopback: logins, the Host check,
commands by name and by words, errors and their statuses, NDJSON streaming."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from cmdserver.auth.tokens import TokenStore
from cmdserver.commands.base import Command, Context
from tests.doors.http.support import HTTPServer
from tests.helpers import OutsideTreeTempMixin, capture_audit


class Slow(Command):
    """Writes a line, then waits for its deadline (or a cancel)."""

    name = "slow"
    summary = "Wait."
    streams = True
    timeout = 0.5

    def __init__(self) -> None:
        self.cancelled = 0

    def run(self, ctx: Context) -> defer.Deferred:
        ctx.out.line("started")

        def cancel(_: Any) -> None:
            self.cancelled += 1

        return defer.Deferred(cancel)


class APITests(OutsideTreeTempMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.server = HTTPServer(self.mktemp(), "--http-host", "cmd.example.org")
        self.slow = Slow()
        self.server.service.core.registry.add(self.slow)
        yield self.server.start()
        self.addCleanup(self.server.stop)
        with open(f"{self.server.root}/notes.txt", "w") as f:
            f.write("alpha")

    @defer.inlineCallbacks
    def test_a_command_by_name_by_words_and_with_no_body(self) -> Any:
        answer = yield self.server.command("ping")
        self.assertEqual((answer.status, answer.json), (200, {"result": "pong", "output": []}))
        answer = yield self.server.command("comphash", {"args": {"path": "notes.txt",
                                                                 "algo": "md5"}})
        self.assertEqual(answer.json["result"], "2c1743a391305fbf367df8e4f069f9f9")
        answer = yield self.server.command("lastlog", {"argv": ["2"]})
        self.assertEqual(answer.json, {"result": ["log line 18", "log line 19"],
                                       "output": ["Begin lastlog", "log line 18",
                                                  "log line 19"]})
        answer = yield self.server.call("POST", "/v1/commands/whoami", b"",
                                        {**self.server.bearer(),
                                         "Content-Type": "application/json"})
        self.assertEqual(answer.json["result"], "admin")
        answer = yield self.server.command("stats", {"args": {"json": True}})
        self.assertEqual(json.loads(answer.json["result"])["connections_by_door"], {"http": 1})

    @defer.inlineCallbacks
    def test_errors_have_the_other_doors_words_and_a_fitting_status(self) -> Any:
        cases = [
            ("lastlog", {"args": {"n": 0}}, 400, "n must be 1..1000, not 0"),
            ("lastlog", {"argv": ["x"]}, 400, "not a number: x; usage: lastlog [N]   (1..1000)"),
            ("lastlog", {"args": {"bogus": 1}}, 400,
             "unknown argument bogus; usage: lastlog [N]   (1..1000)"),
            ("comphash", {}, 400, "Please provide a path."),
            ("ls", {"args": {"path": "../.."}}, 403, "path outside allowed roots"),
            ("portscan", {"args": {"host": "192.0.2.1"}}, 403, "target not allowed"),
            ("nosuch", {}, 404, "Command not found."),
            ("exit", {}, 404, "Command not found."),  # served on the text doors only
            ("comphash", {"args": {"path": "missing"}}, 422,
             "no such file or directory: missing"),
            ("upload", {"args": {"name": "a", "size": 1, "hmac": "ab" * 32}}, 422,
             "upload: over HTTP, PUT the file's bytes to /v1/files/NAME with its HMAC in "
             "the X-Cmdserver-HMAC header"),
            ("ping", {"args": {}, "argv": []}, 400, "give args or argv, not both"),
            ("ping", [1], 400, 'the body is {"args": {NAME: VALUE, ...}} or '
                               '{"argv": [WORD, ...]}'),
            ("slow", {}, 504, "deadline exceeded: stopped after 0.5 s"),
        ]
        for name, body, status, message in cases:
            answer = yield self.server.command(name, body)
            self.assertEqual((answer.status, answer.json["error"]), (status, message), name)
            self.assertEqual(answer.headers["Content-Type"], "application/json")
        answer = yield self.server.call("POST", "/v1/commands/ping", b"{",
                                        {**self.server.bearer(),
                                         "Content-Type": "application/json"})
        self.assertEqual(answer.status, 400)
        self.assertTrue(answer.json["error"].startswith("the body is not valid JSON"))
        answer = yield self.server.call("POST", "/v1/commands/ping", b"{}",
                                        {**self.server.bearer(), "Content-Type": "text/plain"})
        self.assertEqual((answer.status, answer.json["error"]),
                         (415, "the body must be JSON (Content-Type: application/json)"))
        answer = yield self.server.call("GET", "/v1/commands/ping")
        self.assertEqual((answer.status, answer.headers["Allow"]), (405, "POST"))
        answer = yield self.server.call("GET", "/nowhere")
        self.assertEqual((answer.status, answer.json), (404, {"error": "not found"}))

    @defer.inlineCallbacks
    def test_logins(self) -> Any:
        server = self.server
        answer = yield server.command("ping", headers={})
        self.assertEqual((answer.status, answer.json["error"]), (401, "login required"))
        self.assertEqual(answer.headers.get_all("WWW-Authenticate"), [
            'Bearer realm="cmdserver"', 'Basic realm="cmdserver", charset="UTF-8"'])
        for headers in (server.basic(), server.bearer(), server.basic(password=server.token)):
            answer = yield server.command("whoami", headers=headers)
            self.assertEqual(answer.json["result"], "admin")
        for headers, message in ((server.basic(password="wrong"), "login failed"),
                                 (server.bearer("cmdserver_00000000_" + "x" * 43),
                                  "login failed"),
                                 ({"Authorization": "Digest x"}, "bad Authorization header "
                                  "(Bearer TOKEN or Basic credentials)"),
                                 ({"Authorization": "Basic !!!"}, "bad Authorization header "
                                  "(Basic: base64 of USER:PASSWORD)")):
            answer = yield server.command("ping", headers=headers)
            self.assertEqual((answer.status, answer.json["error"]), (401, message))

    @defer.inlineCallbacks
    def test_one_session_and_one_login_record_per_connection_and_user(self) -> Any:
        events = capture_audit(self)
        conn = self.server.connection()
        self.addCleanup(conn.close)
        for _ in range(3):
            answer = yield self.server.command("ping", headers=self.server.basic(),
                                               connection=conn)
            self.assertEqual(answer.status, 200)
        [session] = [s for s in self.server.service.core.sessions.values() if s.door == "http"]
        self.assertEqual((session.user, session.method, session.commands),
                         ("admin", "password", 3))
        answer = yield self.server.command("ping", connection=conn)  # now by token: again
        kinds = [(e["event"], e["args"].get("method")) for e in events
                 if e["event"] in ("session-start", "login")]
        self.assertEqual(kinds, [("session-start", None), ("login", "password"),
                                 ("login", "token")])
        conn.close()
        yield task.deferLater(self.server.service.core.reactor, 0.2, lambda: None)
        self.assertEqual([e["result"] for e in events if e["event"] == "session-end"],
                         [{"commands": 4, "file_operations": 0, "login_failures": 0}])

    @defer.inlineCallbacks
    def test_five_failed_logins_close_the_connection(self) -> Any:
        conn = self.server.connection()
        self.addCleanup(conn.close)
        statuses = []
        for _ in range(5):
            answer = yield self.server.command("ping", headers=self.server.basic(password="x"),
                                               connection=conn)
            statuses.append(answer.status)
        self.assertEqual(statuses, [401, 401, 401, 401, 429])
        self.assertEqual(answer.json["error"], "login failed; too many failures, closing")
        self.assertEqual(answer.headers["Connection"], "close")

    @defer.inlineCallbacks
    def test_the_host_must_name_the_server(self) -> Any:
        port = self.server.port
        for host, status in ((f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200),
                             ("cmd.example.org", 200), ("CMD.example.org.", 200),
                             ("rebound.example.com", 421), (f"10.1.2.3:{port}", 421)):
            answer = yield self.server.call("GET", "/healthz", headers={"Host": host})
            self.assertEqual(answer.status, status, host)
        self.assertEqual(answer.json["error"], f"Host '10.1.2.3:{port}' is not a name of "
                         "this server (--http-host adds one)")
        # No Host at all (HTTP/1.0 without it): refused too.
        got = yield self.server.raw(b"GET /healthz HTTP/1.0\r\n\r\n")
        self.assertIn(b" 421 Misdirected Request", got.split(b"\r\n")[0])

    @defer.inlineCallbacks
    def test_a_body_over_the_cap_is_refused_before_it_is_read(self) -> Any:
        head = (b"POST /v1/commands/ping HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nContent-Length: 2000000\r\n\r\n")
        got = yield self.server.raw(head)
        status, _, rest = got.partition(b"\r\n")
        self.assertEqual(status, b"HTTP/1.1 413 Request Entity Too Large")
        self.assertIn(b"Connection: close", rest)
        self.assertTrue(rest.endswith(b'{"error":"request body over 1048576 bytes"}\n'))

    @defer.inlineCallbacks
    def test_ndjson_streams_lines_then_the_result(self) -> Any:
        headers = {**self.server.bearer(), "Accept": "application/x-ndjson"}
        answer = yield self.server.command("lastlog", {"args": {"n": 1}}, headers=headers)
        self.assertEqual(answer.headers["Content-Type"], "application/x-ndjson")
        self.assertEqual([json.loads(x) for x in answer.body.splitlines()], [
            {"line": "Begin lastlog"}, {"line": "log line 19"}, {"result": ["log line 19"]}])
        answer = yield self.server.command("slow", headers=headers)
        self.assertEqual(answer.status, 200)  # sent before the deadline
        self.assertEqual([json.loads(x) for x in answer.body.splitlines()], [
            {"line": "started"},
            {"error": "deadline exceeded: stopped after 0.5 s", "status": 504}])
        answer = yield self.server.command("ls", {"args": {"path": "/"}}, headers=headers)
        self.assertEqual((answer.status, answer.body),
                         (403, b'{"error":"path outside allowed roots","status":403}\n'))

    @defer.inlineCallbacks
    def test_a_client_that_goes_away_cancels_its_command(self) -> Any:
        request = (b"POST /v1/commands/slow HTTP/1.1\r\nHost: localhost\r\n"
                   b"Authorization: Bearer " + self.server.token.encode() +
                   b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
                   b"Accept: application/x-ndjson\r\n\r\n{}")
        self.slow.timeout = 30
        got = yield self.server.raw(request, read=False)
        self.assertEqual(got, b"")
        for _ in range(50):
            if self.slow.cancelled:
                break
            yield task.deferLater(self.server.service.core.reactor, 0.05, lambda: None)
        self.assertEqual(self.slow.cancelled, 1)

    @defer.inlineCallbacks
    def test_describe_and_openapi(self) -> Any:
        answer = yield self.server.call("GET", "/v1/commands")
        names = [c["name"] for c in answer.json["commands"]]
        registry = self.server.service.core.registry
        self.assertEqual(names, [c.name for c in registry.commands("http")
                                 if c.name != "upload"])
        self.assertNotIn("exit", names)
        [lastlog] = [c for c in answer.json["commands"] if c["name"] == "lastlog"]
        self.assertTrue(lastlog["streams"])
        self.assertEqual(lastlog["params"][0]["schema"],
                         {"type": "integer", "minimum": 1, "maximum": 1000})
        answer = yield self.server.call("GET", "/v1/openapi.json")
        document = answer.json
        self.assertEqual(document["openapi"], "3.1.0")
        paths = document["paths"]
        for name in names:
            self.assertEqual(paths[f"/v1/commands/{name}"]["post"]["operationId"], name)
        args = (paths["/v1/commands/comphash"]["post"]["requestBody"]["content"]
                ["application/json"]["schema"]["properties"]["args"])
        self.assertEqual(args["required"], ["path"])
        self.assertEqual(args["properties"]["algo"]["enum"],
                         ["blake2b", "md5", "sha1", "sha256", "sha512"])
        self.assertEqual(args["properties"]["algo"]["default"], "sha256")
        self.assertIn("/v1/files/{path}", paths)
        answer = yield self.server.call("GET", "/v1/openapi.json", headers={})
        self.assertEqual(answer.status, 401)

    @defer.inlineCallbacks
    def test_openapi_offers_the_upload_macs_this_server_takes(self) -> Any:
        def offered(document: dict[str, Any]) -> list[str]:
            [header] = [p for p in document["paths"]["/v1/files/{path}"]["put"]["parameters"]
                        if p["name"] == "X-Cmdserver-MAC-Algorithm"]
            return list(header["schema"]["enum"])

        answer = yield self.server.call("GET", "/v1/openapi.json")
        self.assertEqual(offered(answer.json), ["hmac-sha256", "blake2b"])
        server = HTTPServer(self.mktemp(), "--upload-macs", "blake2b")
        yield server.start()
        self.addCleanup(server.stop)
        answer = yield server.call("GET", "/v1/openapi.json")
        self.assertEqual(offered(answer.json), ["blake2b"])

    @defer.inlineCallbacks
    def test_a_revoked_token_ends_its_connection(self) -> Any:
        conn = self.server.connection()
        self.addCleanup(conn.close)
        answer = yield self.server.command("ping", connection=conn)
        self.assertEqual(answer.status, 200)
        TokenStore(self.server.data_dir).revoke(self.server.token.split("_")[1])
        yield self.server.credentials.reload()
        self.assertEqual([s for s in self.server.service.core.sessions.values()
                          if s.door == "http" and s.user == "admin"], [])
        answer = yield self.server.command("ping")  # a new connection: the token is gone
        self.assertEqual(answer.status, 401)


    @defer.inlineCallbacks
    def test_a_penalised_address_is_refused_by_the_login_gate(self) -> Any:
        # The gate every door shares: an address penalised for a failure on any door
        # gets its HTTP logins refused without a check, and its new connections
        # refused before any work.
        server = HTTPServer(self.mktemp(), "--login-penalty", "30", "--login-penalty-max", "60")
        yield server.start()
        self.addCleanup(server.stop)
        conn = server.connection()
        self.addCleanup(conn.close)
        yield server.call("GET", "/healthz", connection=conn)  # connected, no login yet
        gate = server.service.core.gate
        key = gate.penalties.key("127.0.0.1")
        assert key is not None
        gate.penalties.failure(key)  # a failure on another door, say
        checks: list[str] = []
        real = server.credentials.check_password

        def counted(name: str, *args: Any) -> Any:
            checks.append(name)
            return real(name, *args)

        self.patch(server.credentials, "check_password", counted)
        answer = yield server.command("ping", headers=server.basic(), connection=conn)
        self.assertEqual(answer.status, 429)
        self.assertTrue(answer.json["error"].startswith("login refused: "), answer.json)
        self.assertEqual(checks, [])  # no bcrypt for a refused login
        got = yield server.raw(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        # A new connection: refused in the connection limits, before the door exists.
        self.assertTrue(got.startswith(b"HTTP/1.1 429 "), got)
        self.assertIn(b"Too many failed logins from your address", got)
