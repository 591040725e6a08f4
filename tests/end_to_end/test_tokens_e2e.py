"""API tokens against the real service: a token logs in on PB and the line door without
a bcrypt check, only as its user, is audited as a token login, and revoking it ends the
sessions it opened."""

from __future__ import annotations

import io
import json
import os
import sys
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from cmdserver import client
from cmdserver.auth.credentials import ReloadService
from cmdserver.auth.tokens import TokenStore
from cmdserver.cli import main as cli
from tests.end_to_end.support import LineClient, RunningService, in_thread


class TokenTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits for a Deferred setUp
        self.tmp = os.path.abspath(self.mktemp())
        data = os.path.join(self.tmp, "data")
        for user in ("ops", "dev"):
            self.patch(sys, "stdin", io.StringIO("a-good-password\n"))
            self.assertEqual(cli(["useradd", user, "--password-stdin", "--cost", "4",
                                  "--data-dir", data]), 0)
        self.store = TokenStore(data)
        self.token_id, self.token = self.store.add("ops", "test")
        self.server = RunningService(self.tmp, "--pb", "tcp:0:interface=127.0.0.1",
                                     "--line-auth", "required", "--bcrypt-cost", "4",
                                     "--users-poll-interval", "0")
        yield self.server.start()
        self.addCleanup(self.server.stop)
        [reloader] = [s for s in self.server.service if isinstance(s, ReloadService)]
        self.credentials = reloader.credentials
        self.pb_port = self.server.ports[1].getHost().port
        checks: list[str] = []
        real = self.credentials.check_password

        def counted(name: str, *args: Any) -> Any:
            checks.append(name)
            return real(name, *args)

        self.patch(self.credentials, "check_password", counted)
        self.bcrypt_checks = checks

    def audit(self) -> list[dict[str, Any]]:
        audit = self.server.service.audit
        assert audit is not None
        audit.flush()
        with open(os.path.join(self.server.data_dir, "audit.log")) as f:
            return [json.loads(line) for line in f]

    @defer.inlineCallbacks
    def wait_for(self, what: str, predicate: Any) -> Any:
        for _ in range(250):
            if predicate():
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail(f"never happened: {what}")

    @defer.inlineCallbacks
    def test_pb_login_by_token(self) -> Any:
        session = yield client.connect("127.0.0.1", self.pb_port, "ops", self.token)
        self.addCleanup(session.close)
        self.assertEqual((yield session.whoami()), "ops")
        self.assertEqual(self.bcrypt_checks, [])  # no bcrypt for a token
        yield self.assertFailure(client.connect("127.0.0.1", self.pb_port, "dev", self.token),
                                 client.LoginError)  # ops's token is not dev's
        [ok] = [e for e in self.audit() if e["event"] == "login" and e["outcome"] == "ok"]
        self.assertEqual((ok["user"], ok["args"]),
                         ("ops", {"method": "token", "token": self.token_id}))
        self.assertNotIn(self.token, open(os.path.join(self.server.data_dir,
                                                       "audit.log")).read())

    @defer.inlineCallbacks
    def test_line_login_by_token(self) -> Any:
        def session() -> list[str]:
            c = LineClient(self.server.address)
            try:
                c.send(f"login ops {self.token}\nwhoami\n".encode())
                lines: list[str] = []
                while not lines or lines[-1] != "ops":
                    lines.append(c.read_line())
                return lines
            finally:
                c.close()

        lines = yield in_thread(session)
        self.assertEqual(lines, ["Logged in as ops", "ops"])
        self.assertEqual(self.bcrypt_checks, [])

    @defer.inlineCallbacks
    def test_revoking_ends_its_sessions(self) -> Any:
        by_token = yield client.connect("127.0.0.1", self.pb_port, "ops", self.token)
        by_password = yield client.connect("127.0.0.1", self.pb_port, "ops", "a-good-password")
        self.addCleanup(by_password.close)
        line = LineClient(self.server.address)
        self.addCleanup(line.close)
        yield in_thread(line.send, f"login ops {self.token}\n".encode())
        yield self.wait_for("the line login", lambda: any(
            e["event"] == "login" and e["door"] == "line" for e in self.audit()))
        self.store.revoke(self.token_id)
        yield self.credentials.reload()
        for _ in range(100):
            if by_token.avatar.broker.disconnected:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        yield self.assertFailure(by_token.ping(), client.ConnectionClosed)
        self.assertEqual((yield by_password.ping()), "pong")  # a password session stays
        rest = yield in_thread(line.read_until_closed)  # the server closed it
        self.assertTrue(rest.endswith(b"Logged in as ops\r\n"), rest)
        ends = [e for e in self.audit() if e["event"] == "session-end"
                and e["error"] == "token revoked"]
        self.assertEqual(len(ends), 2)
        yield self.assertFailure(client.connect("127.0.0.1", self.pb_port, "ops", self.token),
                                 client.LoginError)
