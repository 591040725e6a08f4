"""The portal's checkers, the realm's accounts, and reloading the store."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys
from twisted.cred.credentials import SSHPrivateKey, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.trial import unittest
from zope.interface import Interface

from cmdserver.auth.credentials import Credentials, ReloadService, build_checkers
from cmdserver.auth.portal import Account, IAccount, Realm, build_portal
from cmdserver.auth.users import UserRecord, UserStore, hash_password
from tests.helpers import capture_log
from tests.helpers.creds import TEST_COST, flatten_events, run_now, temp_dir


def new_key() -> keys.Key:
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def key_credentials(name: bytes, key: keys.Key, signed: bool = True) -> SSHPrivateKey:
    data = b"session data to sign"
    blob = key.public().blob()
    return SSHPrivateKey(name, b"ssh-ed25519", blob, data, key.sign(data) if signed else None)


class IOther(Interface):
    """Another door's avatar interface."""


class PortalTests(unittest.TestCase):
    def setUp(self) -> None:
        self.store = UserStore(temp_dir(self))
        self.ops_key = new_key()
        with self.store.locked() as users:
            users["ops"] = UserRecord("ops", hash_password("right pw", TEST_COST), ("/srv",))
            users["dev"] = UserRecord("dev", hash_password("dev pw", TEST_COST))
        self.store.add_keys("ops", self.ops_key.public().toString("OPENSSH").decode())
        self.credentials = Credentials(self.store, run_now, TEST_COST)
        self.credentials.load_now()
        self.realm = Realm(self.credentials.account)
        self.portal = build_portal(self.realm, build_checkers(self.credentials, run_now))

    def login(self, credentials, interface=IAccount):
        return self.portal.login(credentials, None, interface)

    def test_password_login_returns_account_with_roots(self) -> None:
        interface, avatar, logout = self.successResultOf(
            self.login(UsernamePassword(b"ops", b"right pw")))
        self.assertIs(interface, IAccount)
        self.assertEqual(avatar, Account("ops", ("/srv",)))
        logout()

    def test_wrong_password_and_unknown_user_fail_alike(self) -> None:
        wrong = self.failureResultOf(self.login(UsernamePassword(b"ops", b"wrong")),
                                     UnauthorizedLogin)
        unknown = self.failureResultOf(self.login(UsernamePassword(b"ghost", b"right pw")),
                                       UnauthorizedLogin)
        self.assertEqual(str(wrong.value), str(unknown.value))

    def test_odd_usernames_fail_cleanly(self) -> None:
        for name in (b"\xff\xfe", b"", b"anonymous", b"../ops"):
            self.failureResultOf(self.login(UsernamePassword(name, b"x")), UnauthorizedLogin)

    def test_public_key_login(self) -> None:
        _, avatar, _ = self.successResultOf(self.login(key_credentials(b"ops", self.ops_key)))
        self.assertEqual(avatar.name, "ops")

    def test_key_not_on_file(self) -> None:
        self.failureResultOf(self.login(key_credentials(b"ops", new_key())), UnauthorizedLogin)
        self.failureResultOf(self.login(key_credentials(b"dev", self.ops_key)),
                             UnauthorizedLogin)

    def test_other_doors_register_their_avatar(self) -> None:
        built: list[object] = []

        def factory(account, mind):
            built.append((account, mind))
            return f"avatar of {account.name}", lambda: built.append("logout")

        self.realm.register(IOther, factory)
        interface, avatar, logout = self.successResultOf(
            self.portal.login(UsernamePassword(b"dev", b"dev pw"), "mind", IOther))
        self.assertEqual((interface, avatar), (IOther, "avatar of dev"))
        logout()
        self.assertEqual(built, [(Account("dev", None), "mind"), "logout"])

    def test_no_password_or_hash_in_log(self) -> None:
        events = capture_log(self)
        self.successResultOf(self.login(UsernamePassword(b"ops", b"right pw")))
        self.failureResultOf(self.login(UsernamePassword(b"ops", b"wrong pw")))
        text = flatten_events(events)
        for secret in ("right pw", "wrong pw", self.credentials.users["ops"].hash):
            self.assertNotIn(secret, text)

    def test_cancelled_check_keeps_its_slot_until_bcrypt_is_done(self) -> None:
        from twisted.internet.defer import CancelledError, Deferred

        from cmdserver.auth.credentials import BcryptChecker

        pending: list[tuple[Deferred, Callable[[], object]]] = []

        def later(f):
            d: Deferred = Deferred()
            pending.append((d, f))
            return d

        checker = BcryptChecker(self.credentials, later, concurrency=1)
        first = checker.requestAvatarId(UsernamePassword(b"ops", b"right pw"))
        second = checker.requestAvatarId(UsernamePassword(b"dev", b"dev pw"))
        third = checker.requestAvatarId(UsernamePassword(b"dev", b"dev pw"))
        self.assertEqual(len(pending), 1)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertEqual(len(pending), 1)  # the slot is still taken by the running check
        third.cancel()  # cancelled while waiting: its check never runs
        self.failureResultOf(third, CancelledError)
        d, f = pending.pop()
        d.callback(f())
        self.assertEqual(len(pending), 1)
        d, f = pending.pop()
        d.callback(f())
        self.assertEqual(self.successResultOf(second), "dev")
        self.assertEqual(pending, [])

    def test_a_cancelled_check_that_waits_leaves_the_queue(self) -> None:
        from twisted.internet.defer import CancelledError, Deferred

        from cmdserver.auth.credentials import BcryptChecker

        pending: list[tuple[Deferred, Any]] = []

        def later(f: Any) -> Deferred:
            d: Deferred = Deferred()
            pending.append((d, f))
            return d

        checker = BcryptChecker(self.credentials, later, concurrency=1)
        first = checker.requestAvatarId(UsernamePassword(b"ops", b"right pw"))
        waiting = [checker.requestAvatarId(UsernamePassword(b"dev", b"x")) for _ in range(50)]
        for d in waiting:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual(len(checker._semaphore.waiting), 0)  # out of the queue at once
        d, f = pending.pop()
        d.callback(f())
        self.assertEqual(self.successResultOf(first), "ops")
        self.assertEqual(pending, [])  # none of the cancelled ones ran

    # -- equal time for unknown names -----------------------------------------

    def checked_costs(self, names: list[str]) -> list[int]:
        """The bcrypt cost each name's password is checked at."""
        from cmdserver.auth import credentials as module

        costs: list[int] = []

        def recording(password: Any, hashed: str) -> bool:
            cost = module.hash_cost(hashed)
            assert cost is not None
            costs.append(cost)
            return False

        self.patch(module, "verify_password", recording)
        for name in names:
            self.failureResultOf(self.login(UsernamePassword(name.encode(), b"x")))
        return costs

    def test_unknown_names_cost_what_the_users_cost_not_the_daemon_cost(self) -> None:
        # Users hashed at cost 5 and 6, the daemon's --bcrypt-cost 12: the decoy of
        # an unknown name used to be cost 12, twice as slow per step as a user's.
        with self.store.locked() as users:
            users["ops"] = UserRecord("ops", hash_password("right pw", 5))
            users["dev"] = UserRecord("dev", hash_password("dev pw", 6))
        credentials = Credentials(self.store, run_now, 12)
        credentials.load_now()
        self.credentials = credentials
        self.portal = build_portal(self.realm, build_checkers(credentials, run_now))
        names = [f"ghost{i}" for i in range(200)]
        costs = self.checked_costs(names)
        self.assertEqual(set(costs), {5, 6})  # the users' costs, in their mix
        self.assertTrue(60 < costs.count(5) < 140, costs.count(5))
        self.assertEqual(self.checked_costs(names), costs)  # a name always costs the same
        self.assertEqual(self.checked_costs(["ops", "dev"]), [5, 6])

    def test_with_no_users_the_daemon_cost(self) -> None:
        with self.store.locked() as users:
            users.clear()
        credentials = Credentials(self.store, run_now, 7)
        credentials.load_now()
        self.assertEqual(credentials.decoy_cost("ghost"), 7)

    def test_the_decoy_hash_matches_nothing_and_has_its_cost(self) -> None:
        from cmdserver.auth.credentials import decoy_hash, hash_cost
        from cmdserver.auth.users import verify_password

        decoy = decoy_hash(TEST_COST)
        self.assertEqual(hash_cost(decoy), TEST_COST)
        self.assertEqual(len(decoy), 60)
        self.assertFalse(verify_password(b"decoy password", decoy))
        self.assertFalse(verify_password(b"", decoy))
        self.assertIsNone(hash_cost("garbage"))

    # -- reloading ------------------------------------------------------------

    def reload_service(self, **kwargs):
        clock = task.Clock()
        service = ReloadService(self.credentials, 2.0, clock=clock, **kwargs)
        service.startService()
        self.addCleanup(service.stopService)
        return clock, service

    def test_poll_picks_up_a_new_user_and_a_removed_one(self) -> None:
        clock, _ = self.reload_service()
        with self.store.locked() as users:
            users["new"] = UserRecord("new", hash_password("new pw", TEST_COST))
            del users["dev"]
        self.failureResultOf(self.login(UsernamePassword(b"new", b"new pw")))
        clock.advance(2)
        self.successResultOf(self.login(UsernamePassword(b"new", b"new pw")))
        self.failureResultOf(self.login(UsernamePassword(b"dev", b"dev pw")))

    def test_poll_picks_up_keys(self) -> None:
        clock, _ = self.reload_service()
        other = new_key()
        self.store.add_keys("dev", other.public().toString("OPENSSH").decode())
        clock.advance(2)
        self.successResultOf(self.login(key_credentials(b"dev", other)))

    def test_unchanged_files_are_not_reparsed(self) -> None:
        clock, _ = self.reload_service()
        before = self.credentials.users
        clock.advance(2)
        self.assertIs(self.credentials.users, before)

    def test_broken_file_keeps_previous_credentials(self) -> None:
        events = capture_log(self)
        clock, _ = self.reload_service()
        secret_hash = self.credentials.users["ops"].hash
        with open(self.store.users_path, "a") as f:
            f.write('{"name": "x", "hash": "' + secret_hash + '"\n')
        clock.advance(2)
        self.successResultOf(self.login(UsernamePassword(b"ops", b"right pw")))
        errors = [e for e in events if "not reloaded" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertIn("line 3: not a JSON object", errors[0]["error"])
        self.assertNotIn(secret_hash, flatten_events(events))

    def test_a_broken_file_is_reported_once_per_change(self) -> None:
        events = capture_log(self)
        clock, _ = self.reload_service()

        def errors() -> list[dict]:
            return [e for e in events if "not reloaded" in e.get("log_format", "")]

        with open(self.store.users_path, "a") as f:
            f.write("garbage\n")
        for _ in range(5):  # five polls of one broken file: one line
            clock.advance(2)
        self.assertEqual(len(errors()), 1)
        self.successResultOf(self.login(UsernamePassword(b"ops", b"right pw")))
        with open(self.store.users_path, "w") as f:  # changed, still broken: one more
            f.write('{"name": 1}\n')
        for _ in range(5):
            clock.advance(2)
        self.assertEqual(len(errors()), 2)
        self.assertIn("line 1: no user name", errors()[1]["error"])
        # Repaired: read at the next poll.
        self.store.save({"new": UserRecord("new", hash_password("new pw", TEST_COST))})
        clock.advance(2)
        self.successResultOf(self.login(UsernamePassword(b"new", b"new pw")))
        self.assertEqual(len(errors()), 2)

    def test_sighup_reloads_through_the_services_hook(self) -> None:
        from cmdserver.service import Hangup

        clock = task.Clock()
        called = []
        clock.callFromThread = lambda f, *a: called.append(f(*a))  # type: ignore[attr-defined]
        service = ReloadService(self.credentials, 0, clock=clock)
        hangup = Hangup(clock)
        hangup.add(service.on_sighup)
        previous = signal.getsignal(signal.SIGHUP)
        service.startService()
        hangup.install()
        try:
            self.assertNotEqual(signal.getsignal(signal.SIGHUP), previous)
            with self.store.locked() as users:
                users["new"] = UserRecord("new", hash_password("new pw", TEST_COST))
            os.kill(os.getpid(), signal.SIGHUP)
            self.assertEqual(len(called), 1)
        finally:
            hangup.uninstall()
            service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), previous)
        self.successResultOf(self.login(UsernamePassword(b"new", b"new pw")))

    def test_overlapping_reloads_run_again_after(self) -> None:
        from twisted.internet.defer import Deferred

        pending: list[tuple[Deferred, Callable[..., object], tuple]] = []

        def later(f, *args):
            d: Deferred = Deferred()
            pending.append((d, f, args))
            return d

        self.credentials._run = later
        first = self.credentials.reload()
        second = self.credentials.reload()
        self.assertIs(first, second)
        with self.store.locked() as users:
            users["new"] = UserRecord("new", hash_password("new pw", TEST_COST))
        d, f, args = pending.pop(0)
        d.callback(f(*args))
        self.assertEqual(len(pending), 1)  # asked twice while busy: runs once more
        d, f, args = pending.pop(0)
        d.callback(f(*args))
        self.assertIn("new", self.credentials.users)


class HashPoolTests(unittest.TestCase):
    """bcrypt's own threads, on the real reactor."""

    def setUp(self) -> None:
        from cmdserver.auth.credentials import HashPool

        self.pool = HashPool(2)
        self.addCleanup(self.pool.stopService)

    def test_checks_run_in_its_own_threads(self):
        import threading

        d = self.pool.run(lambda: threading.current_thread())
        d.addCallback(lambda thread: self.assertEqual(
            ("cmdserver-bcrypt" in thread.name, thread.daemon), (True, True)))
        return d

    def test_file_work_does_not_hold_up_logins(self):
        import threading

        from twisted.internet import defer, reactor, threads

        # Every thread of the reactor's pool (file work) busy and waiting...
        release = threading.Event()
        busy = [threads.deferToThread(release.wait, 30)
                for _ in range(reactor.getThreadPool().max)]  # type: ignore[attr-defined]
        # ...and a password check still runs at once.
        d = self.pool.run(lambda: "checked")

        def done(result):
            release.set()
            self.assertEqual(result, "checked")
            return defer.DeferredList(busy)

        return d.addBoth(done)
