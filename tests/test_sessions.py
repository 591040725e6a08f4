"""Sessions in the core: opened, logged in and closed by the doors, audited here."""

from __future__ import annotations

import re

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from cmdserver.sessions import SessionIds
from cmdserver.text import escape
from tests.helpers import capture_audit, capture_log, make_context, make_core


class SessionTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.core = make_core(self.mktemp(), reactor=self.reactor)
        self.log = capture_log(self)
        self.audit = capture_audit(self)

    def fields(self, *names: str) -> list[tuple]:
        return [tuple(e.get(n) for n in names) for e in self.audit]

    def test_a_session_from_start_to_end(self) -> None:
        session = self.core.open_session("line", "10.0.0.1:5")
        self.assertIn(session.id, self.core.sessions)
        ctx = make_context(self.core, door="line", peer="10.0.0.1:5", session_id=session.id)
        self.core.run_text(ctx, "ping")
        self.core.run_text(ctx, "nosuch")
        self.core.login(session, "ops", "password", "ok")
        ctx.user = "ops"
        self.core.run_text(ctx, "ping")
        self.core.audit_operation(ctx, "put", {"path": "a"}, "ok", 0.5, None, {"bytes": 3})
        self.reactor.advance(2.5)
        self.core.close_session(session)
        self.core.close_session(session)  # once only
        self.assertNotIn(session.id, self.core.sessions)
        self.assertEqual(self.fields("session", "event", "user", "command", "outcome"), [
            (session.id, "session-start", "anonymous", None, "ok"),
            (session.id, "command", "tester", "ping", "ok"),
            (session.id, "command", "tester", "nosuch", "not-found"),
            (session.id, "login", "ops", None, "ok"),
            (session.id, "command", "ops", "ping", "ok"),
            (session.id, "file", "ops", "put", "ok"),
            (session.id, "session-end", "ops", None, "ok"),
        ])
        login, end = self.audit[3], self.audit[-1]
        self.assertEqual((login["args"], login["door"], login["peer"]),
                         ({"method": "password"}, "line", "10.0.0.1:5"))
        self.assertEqual(end["duration"], 2.5)
        self.assertEqual(end["result"], {"commands": 2, "file_operations": 1,
                                         "login_failures": 0})
        self.assertEqual(self.audit[5]["result"], {"bytes": 3})
        self.assertEqual((session.user, session.method), ("ops", "password"))

    def test_failed_logins_are_counted_audited_and_logged_escaped(self) -> None:
        session = self.core.open_session("ssh", "10.0.0.1:5")
        self.core.login(session, b"ev\x1b[2Jil\nroot", "password", "failed", "login failed")
        self.core.login(session, "x" * 5000, "key", "failed")
        self.assertEqual((self.core.stats.login_failures, session.login_failures,
                          self.core.stats.logins), (2, 2, 0))
        first, second = self.audit[1:]
        self.assertEqual((first["event"], first["user"], first["outcome"], first["error"]),
                         ("login", "ev\\x1b[2Jil\\x0aroot", "failed", "login failed"))
        self.assertEqual(len(second["user"]), 257)  # cut, with an ellipsis
        self.assertEqual(session.user, "anonymous")  # a failure logs no one in
        texts = [e["log_format"].format(**e) for e in self.log if "log_format" in e
                 and e.get("log_namespace") != "cmdserver.audit"]
        [failed] = [t for t in texts if "ev" in t]
        self.assertIn("failed login as ev\\x1b[2Jil\\x0aroot from 10.0.0.1:5 by password", failed)
        self.assertNotIn("\x1b", "".join(texts))
        self.assertNotIn("\n", "".join(texts))

    def test_two_sessions_have_different_ids(self) -> None:
        ids = {self.core.open_session("pb", "p").id for _ in range(100)}
        self.assertEqual(len(ids), 100)
        other = make_core(self.mktemp(), reactor=self.reactor)
        self.assertNotEqual(other.open_session("pb", "p").id[:8],
                            self.core.open_session("pb", "p").id[:8])

    def test_a_context_outside_any_session(self) -> None:
        ctx = make_context(self.core)
        self.core.run_text(ctx, "ping")
        self.core.login(self.core.session_for(ctx), "ops", "password", "ok")
        self.assertEqual(self.fields("session", "event"), [(None, "command"), (None, "login")])
        self.assertEqual(self.core.sessions, {})


def test_session_ids_are_short_hex_and_count_up() -> None:
    ids = SessionIds("0badcafe")
    assert [ids() for _ in range(3)] == ["0badcafe0001", "0badcafe0002", "0badcafe0003"]
    assert re.fullmatch(r"[0-9a-f]{12}", SessionIds()())


def test_escape() -> None:
    assert escape("ops") == "ops"
    assert escape(b"op\xffs") == "op\\xffs"
    assert escape("a\tb\nc\x7fd\x85e\u2028f\U000e0001") == (
        "a\\x09b\\x0ac\\x7fd\\x85e\\u2028f\\U000e0001")
    assert escape("é ü 日本") == "é ü 日本"
    assert escape("x" * 10, 4) == "xxxx…"
    assert escape(None) == "None"


class MainLogEscapeTests(unittest.SynchronousTestCase):
    def test_refused_ssh_requests_are_escaped(self) -> None:
        from cmdserver.auth.portal import Account
        from cmdserver.doors.ssh.avatar import SSHAvatar, SSHSettings

        log = capture_log(self)
        avatar = SSHAvatar(make_core(self.mktemp()), Account("ops"), SSHSettings())
        avatar.refused("env", b"LD_\x1b]0;pwned\x07\nfake line")
        [event] = [e for e in log if e.get("what") == "env"]
        self.assertEqual(event["detail"], "LD_\\x1b]0;pwned\\x07\\x0afake line")
