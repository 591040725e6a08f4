"""The login gate: refusals without a check, checks in flight, penalties, the deadline.

bcrypt runs in a fake thread pool here (``Pool``): a check stays "running" until
the test lets it finish, as a real thread would.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh.keys import Key
from twisted.cred.credentials import SSHPrivateKey, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from cmdserver.auth.credentials import Credentials, build_checkers
from cmdserver.auth.gate import BUSY_CONNECTION, BUSY_SOURCE, GateSettings, LoginRefused
from cmdserver.auth.portal import IAccount, Realm, build_portal
from cmdserver.auth.users import UserRecord, UserStore, hash_password
from cmdserver.commands.base import Registry
from cmdserver.core import CommandCore
from cmdserver.policy import Policy
from tests.helpers import capture_audit
from tests.helpers.creds import TEST_COST, temp_dir

PASSWORD = b"right pw"


class Pool:
    """A fake bcrypt pool: each check waits in ``pending`` until ``finish``."""

    def __init__(self) -> None:
        self.pending: list[tuple[Deferred, Any]] = []
        self.started = 0

    def run(self, f: Any, *args: Any) -> Deferred:
        self.started += 1
        d: Deferred = Deferred()
        self.pending.append((d, lambda: f(*args)))
        return d

    def finish(self, n: int = 1) -> None:
        for _ in range(n):
            d, f = self.pending.pop(0)
            d.callback(f())


class GateTestBase(unittest.TestCase):
    settings = GateSettings()

    def setUp(self) -> None:
        store = UserStore(os.path.join(temp_dir(self), "data"))
        self.key = Key(ed25519.Ed25519PrivateKey.generate())
        with store.locked() as users:
            users["ops"] = UserRecord("ops", hash_password(PASSWORD.decode(), TEST_COST))
        os.makedirs(store.keys_dir)
        with open(store.key_path("ops"), "w") as f:
            f.write(self.key.public().toString("OPENSSH").decode() + "\n")
        self.credentials = Credentials(store, cost=TEST_COST)
        self.credentials.load_now()
        self.pool = Pool()
        self.portal = build_portal(Realm(self.credentials.account),
                                   build_checkers(self.credentials, self.pool.run, 2))
        self.clock = MemoryReactorClock()
        self.core = CommandCore(Registry(), Policy(["/"]), self.clock, gate=self.settings)
        self.gate = self.core.gate
        self.audit = capture_audit(self)

    def session(self, host: str = "10.0.0.7", door: str = "line") -> Any:
        return self.core.open_session(door, f"{host}:40000")

    def login(self, session: Any, password: bytes = PASSWORD, user: bytes = b"ops"
              ) -> Deferred:
        return self.gate.login(session, self.portal, UsernamePassword(user, password), None,
                               IAccount)

    def quiet(self, d: Deferred) -> Deferred:
        """A login whose outcome the test does not look at."""
        return d.addErrback(lambda _: None)

    def refused(self, d: Deferred) -> str:
        return self.failureResultOf(d, LoginRefused).value.reason

    def events(self, kind: str) -> list[dict]:
        return [e for e in self.audit if e["event"] == kind]


class PenaltyTests(GateTestBase):
    def test_a_failure_is_answered_when_its_penalty_is_over(self) -> None:
        d = self.login(self.session(), b"wrong")
        self.pool.finish()
        self.assertNoResult(d)  # penalised 1 s: the answer waits for it
        self.clock.advance(1)
        self.failureResultOf(d, UnauthorizedLogin)
        penalty = self.events("penalty")
        self.assertEqual([(e["args"], e["result"], e["user"]) for e in penalty],
                         [({"source": "10.0.0.7"}, {"seconds": 1.0, "failures": 1}, "ops")])
        self.assertEqual(self.core.stats.penalties, 1)

    def test_a_penalised_address_is_refused_without_a_check(self) -> None:
        self.quiet(self.login(self.session(), b"wrong"))
        self.pool.finish()
        other = self.session()  # another connection from the same address
        reason = self.refused(self.login(other))
        self.assertEqual(reason, "too many failed logins from your address; try again in 1 s")
        self.assertEqual(self.pool.started, 1)  # no second check
        # Another address is not affected.
        d = self.login(self.session("10.0.0.8"))
        self.pool.finish()
        self.successResultOf(d)

    def test_the_penalty_doubles_for_each_failure(self) -> None:
        waits = []
        for _ in range(4):
            answered: list[Any] = []
            self.login(self.session(), b"wrong").addErrback(answered.append)
            self.pool.finish()
            waited = 0.0
            while not answered:
                self.clock.advance(0.5)
                waited += 0.5
            waits.append(waited)
        self.assertEqual(waits, [1, 2, 4, 8])

    def test_a_success_does_not_clear_the_penalty(self) -> None:
        d = self.login(self.session(), b"wrong")
        self.pool.finish()
        self.clock.advance(1)
        self.failureResultOf(d)
        d = self.login(self.session())
        self.pool.finish()
        self.successResultOf(d)
        d = self.login(self.session(), b"wrong")
        self.pool.finish()
        self.clock.advance(1)
        self.assertNoResult(d)  # the second failure: 2 s
        self.clock.advance(1)
        self.failureResultOf(d)

    def test_an_unsigned_key_is_a_question_not_a_failure(self) -> None:
        stranger = Key(ed25519.Ed25519PrivateKey.generate()).public()
        query = SSHPrivateKey(b"ops", b"ssh-ed25519", stranger.blob(), None, None)
        self.failureResultOf(self.gate.login(self.session(), self.portal, query, None,
                                             IAccount), UnauthorizedLogin)
        self.assertEqual(self.gate.penalties.strikes("10.0.0.7"), 0)
        signed = SSHPrivateKey(b"ops", b"ssh-ed25519", stranger.blob(), b"data",
                               b"not a signature")
        d = self.gate.login(self.session(), self.portal, signed, None, IAccount)
        self.clock.advance(1)
        self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(self.gate.penalties.strikes("10.0.0.7"), 1)

    def test_a_certificate_failure_penalises(self) -> None:
        session = self.session()
        self.assertEqual(self.gate.failure(session, "ghost"), 1)
        self.assertIsNotNone(self.gate.refusal(session))


class InFlightTests(GateTestBase):
    def test_one_login_at_a_time_per_connection(self) -> None:
        session = self.session()
        first = self.login(session, b"wrong")
        self.assertEqual(self.refused(self.login(session)), BUSY_CONNECTION)
        self.assertEqual(self.pool.started, 1)
        self.pool.finish()
        # Still answering the first (its penalty): the connection is still busy with it.
        self.assertIsNotNone(self.gate.refusal(session))
        self.clock.advance(1)
        self.failureResultOf(first, UnauthorizedLogin)
        self.assertIsNone(self.gate.refusal(session))

    def test_two_checks_per_address(self) -> None:
        a, b = self.login(self.session()), self.login(self.session())
        self.assertEqual(self.refused(self.login(self.session())), BUSY_SOURCE)
        other = self.login(self.session("10.0.0.8"))
        self.assertEqual(self.pool.started, 2)  # the third address waits for a thread
        self.pool.finish(3)
        for d in (a, b, other):
            self.successResultOf(d)
        d = self.login(self.session())  # the slots are free again
        self.pool.finish()
        self.successResultOf(d)

    def test_closing_cancels_a_queued_check(self) -> None:
        sessions = [self.session(f"10.0.0.{i}") for i in range(3)]
        running = [self.login(s) for s in sessions[:2]]
        queued = self.login(sessions[2])
        self.assertEqual(self.pool.started, 2)
        self.core.close_session(sessions[2])
        self.failureResultOf(queued, CancelledError)
        self.pool.finish(2)
        for d in running:
            self.successResultOf(d)
        self.assertEqual(self.pool.started, 2)  # the cancelled one never ran
        self.assertEqual(dict(self.gate._checks), {})

    def test_closing_while_bcrypt_runs_keeps_the_slot_and_counts_a_wrong_password(self
                                                                                  ) -> None:
        first, second = self.session(), self.session()
        self.quiet(self.login(first, b"wrong"))
        self.quiet(self.login(second, b"wrong"))
        self.core.close_session(first)
        self.core.close_session(second)
        # Their threads still run: the address's two slots stay taken until they end.
        self.assertEqual(self.refused(self.login(self.session())), BUSY_SOURCE)
        self.pool.finish(2)
        self.assertEqual(self.gate.penalties.strikes("10.0.0.7"), 2)  # both still count
        self.assertEqual(dict(self.gate._checks), {})

    def test_closing_while_bcrypt_runs_a_right_password_is_no_failure(self) -> None:
        session = self.session()
        self.quiet(self.login(session))
        self.core.close_session(session)
        self.pool.finish()
        self.assertEqual(self.gate.penalties.strikes("10.0.0.7"), 0)

    def test_closing_during_the_answer_delay(self) -> None:
        session = self.session()
        d = self.login(session, b"wrong")
        self.pool.finish()
        self.core.close_session(session)
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ExemptTests(GateTestBase):
    settings = GateSettings(exempt=("10.0.0.0/24",))

    def test_exempt_addresses_are_not_penalised_nor_bounded(self) -> None:
        checks = [self.login(self.session(), b"wrong") for _ in range(4)]
        self.pool.finish(4)
        for d in checks:
            self.failureResultOf(d, UnauthorizedLogin)  # at once: no penalty
        self.assertEqual(len(self.gate.penalties), 0)
        session = self.session()
        self.login(session)
        self.assertEqual(self.refused(self.login(session)), BUSY_CONNECTION)  # still one


class ConnectionRefusalTests(GateTestBase):
    def test_refused_while_penalised_and_audited_once_a_second(self) -> None:
        self.assertIsNone(self.gate.connection_refusal("ssh", "10.0.0.7", "10.0.0.7:1"))
        self.gate.failure(self.session(), "ops")
        self.gate.failure(self.session(), "ops")  # 3 s
        reasons = [self.gate.connection_refusal("ssh", "10.0.0.7", f"10.0.0.7:{i}")
                   for i in range(5)]
        self.assertEqual(set(reasons),
                         {"too many failed logins from your address; try again in 3 s"})
        self.assertIsNone(self.gate.connection_refusal("ssh", "10.0.0.8", "10.0.0.8:1"))
        self.clock.advance(1)
        self.gate.connection_refusal("pb", "10.0.0.7", "10.0.0.7:9")
        self.clock.advance(2)
        self.assertIsNone(self.gate.connection_refusal("ssh", "10.0.0.7", "10.0.0.7:1"))
        refused = self.events("refused")
        self.assertEqual([(e["door"], e["session"], e["outcome"], e["result"])
                          for e in refused],
                         [("ssh", None, "refused", {"source": "10.0.0.7", "connections": 1}),
                          ("pb", None, "refused", {"source": "10.0.0.7", "connections": 5})])
        self.assertEqual(self.core.stats.refused_penalised, 6)


class DeadlineTests(GateTestBase):
    settings = GateSettings(login_grace=30)

    def test_fires_at_the_grace_time(self) -> None:
        expired: list[int] = []
        self.gate.login_deadline(self.session(), lambda: expired.append(1))
        self.clock.advance(29.9)
        self.assertEqual(expired, [])
        self.clock.advance(0.1)
        self.assertEqual(expired, [1])

    def test_a_login_through_the_gate_meets_it(self) -> None:
        expired: list[int] = []
        session = self.session()
        self.gate.login_deadline(session, lambda: expired.append(1))
        d = self.login(session)
        self.pool.finish()
        self.successResultOf(d)
        self.clock.advance(60)
        self.assertEqual(expired, [])

    def test_a_failed_login_does_not(self) -> None:
        expired: list[int] = []
        session = self.session()
        self.gate.login_deadline(session, lambda: expired.append(1))
        self.quiet(self.login(session, b"wrong"))
        self.pool.finish()
        self.clock.advance(30)
        self.assertEqual(expired, [1])

    def test_the_end_of_the_session_cancels_it(self) -> None:
        session = self.session()
        self.gate.login_deadline(session, lambda: None)
        self.core.close_session(session)
        self.assertEqual(self.clock.getDelayedCalls(), [])
