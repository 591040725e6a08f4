"""Login on the line door: the gate, success, every failure path, penalties, audit."""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial import unittest

from cmdserver.auth.credentials import Credentials, build_checkers
from cmdserver.auth.portal import Realm, build_portal
from cmdserver.auth.users import UserRecord, UserStore, hash_password
from cmdserver.commands.account import Login, PasswordLogin, Whoami
from cmdserver.commands.base import Registry
from cmdserver.commands.basic import Exit, Help, Ping
from cmdserver.commands.files import ListDir
from cmdserver.core import CommandCore
from cmdserver.doors.line.protocol import LineProtocol, LineSettings
from cmdserver.policy import Policy
from cmdserver.sources import address_of as peer_host
from tests.helpers import capture_audit, capture_log, commands_audited
from tests.helpers.creds import TEST_COST, flatten_events, run_now, temp_dir

PASSWORD = "c0rrect horse"


class LineLoginTests(unittest.TestCase):
    def setUp(self) -> None:
        base = temp_dir(self)
        self.shared = os.path.join(base, "shared")
        self.own = os.path.join(base, "own")
        for path, name in ((self.shared, "shared.txt"), (self.own, "own.txt")):
            os.makedirs(path)
            open(os.path.join(path, name), "w").close()
        store = UserStore(os.path.join(base, "data"))
        with store.locked() as users:
            users["ops"] = UserRecord("ops", hash_password(PASSWORD, TEST_COST), (self.own,))
            users["dev"] = UserRecord("dev", hash_password("dev pw", TEST_COST))
        self.hashes = [u.hash for u in users.values()]
        self.store = store
        self.credentials = credentials = Credentials(store, run_now, TEST_COST)
        credentials.load_now()
        portal = build_portal(Realm(credentials.account), build_checkers(credentials, run_now))
        self.clock = MemoryReactorClock()
        registry = Registry([Help(), Ping(), ListDir(), Whoami(), Login(PasswordLogin(portal))])
        registry.add(Exit(), "quit")
        self.core = CommandCore(registry, Policy([self.shared]), self.clock, run_now)
        self.penalties = self.core.gate.penalties
        self.events = capture_audit(self, capture_log(self))

    def connect(self, login: str = "required", host: str = "10.0.0.7"):
        proto = LineProtocol(self.core, LineSettings(login=login, greeting="", idle_timeout=0))
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        proto.makeConnection(transport)
        return proto, transport

    def send(self, conn, line: str, advance: float = 0) -> list[str]:
        proto, transport = conn
        transport.clear()
        proto.dataReceived(line.encode() + b"\r\n")
        self.clock.advance(0)
        if advance:
            self.clock.advance(advance)
        return transport.value().decode().splitlines()

    def count_checks(self) -> list[str]:
        """The names whose passwords bcrypt checks from now on."""
        checked: list[str] = []
        check = self.credentials.check_password

        def counting(name, password, run):
            checked.append(name)
            return check(name, password, run)

        self.patch(self.credentials, "check_password", counting)
        return checked

    def audit(self) -> list[dict]:
        return commands_audited(self.events)

    def logins(self) -> list[dict]:
        return [e for e in self.events
                if e.get("log_namespace") == "cmdserver.audit" and e["event"] == "login"]

    # -- the gate ---------------------------------------------------------------

    def test_commands_before_login_are_refused(self) -> None:
        conn = self.connect()
        self.assertEqual(self.send(conn, "ls"), ["Error: login required"])
        self.assertEqual(self.send(conn, "hunter2 x y"), ["Error: login required"])
        self.assertEqual(self.send(conn, "ping"), ["pong"])
        self.assertEqual(self.send(conn, "whoami"), ["anonymous (not logged in)"])
        self.assertEqual(self.send(conn, "help ls")[0], "Usage: ls [PATH]")
        refused = self.audit()[0]
        self.assertEqual((refused["command"], refused["outcome"], refused["args"]),
                         ("ls", "refused", {}))
        self.assertEqual(self.audit()[1]["command"], "?")
        self.assertNotIn("hunter2", flatten_events(self.events))
        self.assertEqual(self.send(conn, "quit"), ["bye !"])
        self.assertTrue(conn[1].disconnecting)

    def test_login_then_user_and_roots_apply(self) -> None:
        conn = self.connect()
        self.assertEqual(self.send(conn, f'login ops "{PASSWORD}"'), ["Logged in as ops"])
        self.assertEqual(self.send(conn, "whoami"), ["ops"])
        self.assertEqual(self.send(conn, "ls"), ["own.txt"])
        self.assertEqual(self.send(conn, "ls ../shared"), ["Error: path outside allowed roots"])
        self.assertEqual([e["user"] for e in self.audit()], ["ops"] * 4)
        self.assertEqual(self.audit()[0]["args"], {"user": "ops"})
        self.assertEqual(self.penalties.strikes("10.0.0.7"), 0)

    def test_user_without_own_roots_gets_the_default(self) -> None:
        conn = self.connect()
        self.send(conn, "login dev 'dev pw'")
        self.assertEqual(self.send(conn, "ls"), ["shared.txt"])

    def test_already_logged_in(self) -> None:
        conn = self.connect()
        self.send(conn, f'login ops "{PASSWORD}"')
        self.assertEqual(self.send(conn, "login dev 'dev pw'"),
                         ["Error: already logged in as ops"])

    def test_login_usage_error_does_not_log_words(self) -> None:
        conn = self.connect()
        self.assertEqual(self.send(conn, "login onlyapassword"),
                         ["Error: usage: login USER PASSWORD"])
        self.assertEqual(self.send(conn, "login a b c"), ["Error: usage: login USER PASSWORD"])
        self.assertEqual([e["args"] for e in self.audit()], [{"words": 1}, {"words": 3}])
        self.assertNotIn("onlyapassword", flatten_events(self.events))

    # -- failures ---------------------------------------------------------------

    def test_wrong_password_and_unknown_user_same_answer_after_delay(self) -> None:
        conn = self.connect()
        self.assertEqual(self.send(conn, "login ops wrong"), [])  # not answered yet
        self.clock.advance(1)
        self.assertEqual(conn[1].value().decode().splitlines(), ["Error: login failed"])
        self.assertEqual(self.send(conn, "login ghost wrong", advance=2),
                         ["Error: login failed"])
        self.assertEqual(self.send(conn, "whoami"), ["anonymous (not logged in)"])
        failed = [e for e in self.audit() if e["command"] == "login"]
        self.assertEqual([(e["outcome"], e["error"], e["args"]) for e in failed],
                         [("error", "login failed", {"user": "ops"}),
                          ("error", "login failed", {"user": "ghost"})])
        # Besides the command, each attempt is a login record of the connection's session.
        self.assertEqual([(e["user"], e["args"], e["outcome"], e["door"], e["session"])
                          for e in self.logins()],
                         [("ops", {"method": "password"}, "failed", "line",
                           conn[0].ctx.session_id),
                          ("ghost", {"method": "password"}, "failed", "line",
                           conn[0].ctx.session_id)])
        self.assertEqual(self.core.stats.login_failures, 2)

    def test_login_records_and_the_session_around_them(self) -> None:
        conn = self.connect()
        other = self.connect(host="10.0.0.8")
        self.send(conn, "login ops 'not it'", advance=1)
        self.send(conn, f"login ops '{PASSWORD}'", advance=2)
        self.send(conn, "ls")
        self.send(other, "ping")
        conn[0].connectionLost()
        other[0].connectionLost()
        audit = [e for e in self.events if e.get("log_namespace") == "cmdserver.audit"]
        mine = [e for e in audit if e["session"] == conn[0].ctx.session_id]
        self.assertEqual([(e["event"], e["user"], e["outcome"]) for e in mine], [
            ("session-start", "anonymous", "ok"),
            ("penalty", "ops", "penalised"),  # when the check failed
            ("login", "ops", "failed"),  # when it was answered, once the penalty was over
            ("command", "anonymous", "error"),  # the login command, answered after a delay
            ("login", "ops", "ok"),
            ("command", "ops", "ok"),  # the login command
            ("command", "ops", "ok"),  # ls
            ("session-end", "ops", "ok"),
        ])
        self.assertEqual(mine[-1]["result"], {"commands": 3, "file_operations": 0,
                                              "login_failures": 1})
        theirs = [e["event"] for e in audit if e["session"] == other[0].ctx.session_id]
        self.assertEqual(theirs, ["session-start", "command", "session-end"])
        self.assertNotEqual(conn[0].ctx.session_id, other[0].ctx.session_id)
        self.assertNotIn("not it", flatten_events(self.events))

    def test_overlong_password_is_a_plain_failure(self) -> None:
        conn = self.connect()
        for user in ("ops", "ghost"):
            self.assertEqual(self.send(conn, f"login {user} {'x' * 100}", advance=5),
                             ["Error: login failed"])

    def test_delay_doubles_per_address(self) -> None:
        delays = []
        for _ in range(4):
            conn = self.connect()
            self.send(conn, "login ops wrong")
            waited = 0.0
            while not conn[1].value():
                self.clock.advance(0.25)
                waited += 0.25
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0])
        # Another address is not slowed down by this one's failures.
        other = self.connect(host="10.0.0.8")
        self.assertEqual(self.send(other, "login ops wrong", advance=1),
                         ["Error: login failed"])

    def test_attempt_from_a_penalised_address_is_refused_unchecked(self) -> None:
        first, second = self.connect(), self.connect()
        self.send(first, "login ops wrong")  # failure 1: the address is penalised 1 s
        checks = self.count_checks()
        self.assertEqual(self.send(second, f"login ops {PASSWORD!r}"), [
            "Error: login refused: too many failed logins from your address; "
            "try again in 1 s"])
        self.assertEqual(checks, [])  # not checked at all
        self.assertEqual(self.logins()[-1]["outcome"], "refused")
        self.clock.advance(1)
        self.assertEqual(first[1].value().decode().splitlines(), ["Error: login failed"])
        self.assertEqual(self.send(second, f"login ops {PASSWORD!r}"), ["Logged in as ops"])
        self.assertEqual(self.penalties.strikes("10.0.0.7"), 1)  # a success forgives nothing
        self.assertEqual((self.core.stats.login_failures, self.core.stats.logins_refused,
                          self.core.stats.penalties), (1, 1, 1))

    def test_pipelined_logins_are_checked_one_at_a_time(self) -> None:
        conn = self.connect(login="optional")  # no login deadline: 1+2+4+8+16 s > 30 s
        checks = self.count_checks()
        conn[0].dataReceived(b"login ops wrong\r\n" * 400)
        self.clock.advance(0)
        self.assertEqual(len(checks), 1)  # the others wait their turn on the connection
        for _ in range(40):
            self.clock.advance(1)
        self.assertEqual(len(checks), 5)  # the fifth failure closes the connection
        self.assertTrue(conn[1].disconnecting)
        self.assertEqual(conn[1].value().decode().splitlines()[-1],
                         "Error: login failed; too many failures, closing")

    def test_fifth_failure_disconnects(self) -> None:
        conn = self.connect(login="optional")  # no login deadline: 1+2+4+8+16 s > 30 s
        for n in range(1, 5):
            self.assertEqual(self.send(conn, "login ops wrong", advance=16),
                             ["Error: login failed"])
            self.assertFalse(conn[1].disconnecting, n)
        self.assertEqual(self.send(conn, "login ops wrong", advance=16),
                         ["Error: login failed; too many failures, closing"])
        self.assertTrue(conn[1].disconnecting)

    def test_disconnect_during_delay_cancels(self) -> None:
        conn = self.connect()
        self.send(conn, "login ops wrong")
        self.assertTrue(self.clock.getDelayedCalls())  # the throttle delay, the deadline
        conn[0].connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.audit()[-1]["outcome"], "cancelled")

    def test_peer_host(self) -> None:
        self.assertEqual(peer_host("10.0.0.1:5"), "10.0.0.1")
        self.assertEqual(peer_host("[::1]:5"), "::1")
        self.assertEqual(peer_host("local"), "local")

    def test_reload_keeps_open_sessions(self) -> None:
        conn = self.connect()
        self.send(conn, f"login ops '{PASSWORD}'")
        with self.store.locked() as users:
            del users["ops"]
            users["new"] = UserRecord("new", hash_password("new pw", TEST_COST))
        self.successResultOf(self.credentials.reload())
        self.assertEqual(self.send(conn, "whoami"), ["ops"])  # still logged in
        self.assertEqual(self.send(conn, "ls"), ["own.txt"])
        other = self.connect(host="10.0.0.9")
        self.assertEqual(self.send(other, f"login ops '{PASSWORD}'", advance=1),
                         ["Error: login failed"])
        self.assertEqual(self.send(other, "login new 'new pw'", advance=2),
                         ["Logged in as new"])

    # -- modes ------------------------------------------------------------------

    def test_optional_door_runs_commands_and_allows_login(self) -> None:
        conn = self.connect(login="optional")
        self.assertEqual(self.send(conn, "ls"), ["shared.txt"])
        self.assertEqual(self.send(conn, f"login ops '{PASSWORD}'"), ["Logged in as ops"])
        self.assertEqual(self.send(conn, "ls"), ["own.txt"])

    def test_off_door_has_no_login(self) -> None:
        conn = self.connect(login="off")
        self.assertEqual(self.send(conn, "ls"), ["shared.txt"])
        self.assertEqual(self.send(conn, f"login ops '{PASSWORD}'"),
                         ["Error: login is off on this door"])

    # -- secrets ---------------------------------------------------------------

    def test_no_password_or_hash_in_any_log(self) -> None:
        conn = self.connect()
        self.send(conn, "login ops 'wrong secret'", advance=1)
        self.send(conn, "login ghost 'other secret'", advance=2)
        self.send(conn, "login dev", advance=0)
        self.send(conn, f"login ops '{PASSWORD}'", advance=4)
        self.assertEqual(self.send(conn, "whoami"), ["ops"])
        text = flatten_events(self.events)
        self.assertIn("failed login as ghost", text)
        for secret in (PASSWORD, "wrong secret", "other secret", *self.hashes):
            self.assertNotIn(secret, text)
