"""What makeService builds for credentials: first run, login modes, options."""

from __future__ import annotations

import os
import stat
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial import unittest

from cmdserver.auth.credentials import ReloadService
from cmdserver.auth.portal import Account, IAccount
from cmdserver.auth.users import INITIAL_PASSWORD_FILE, UserStore
from cmdserver.doors.line.login import default_login_mode
from cmdserver.tap import Options, makeService
from tests.helpers import capture_log
from tests.helpers.creds import flatten_events, temp_dir


class MakeServiceTests(unittest.TestCase):
    def options(self, *argv: str) -> Options:
        self.data = getattr(self, "data", None) or os.path.join(temp_dir(self), "data")
        options = Options()
        options.parseOptions(["--data-dir", self.data, "--bcrypt-cost", "4",
                              "--audit-log", "none", *argv])
        return options

    def test_first_run_creates_admin_and_never_logs_its_password(self) -> Deferred[Any]:
        events = capture_log(self)
        service = makeService(self.options())  # the real reactor: bcrypt runs in a thread
        path = os.path.join(self.data, INITIAL_PASSWORD_FILE)
        password = open(path).read().strip()
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(list(UserStore(self.data).load()), ["admin"])
        self.assertNotIn(password, flatten_events(events))
        [first_run] = [e for e in events if "First run" in e.get("log_format", "")]
        self.assertEqual(first_run["log_level"].name, "warn")
        self.assertEqual(first_run["path"], path)
        self.assertTrue(any(isinstance(s, ReloadService) for s in service))
        self.assertIn("login", service.core.registry)
        self.assertIn("whoami", service.core.registry)
        # The next start keeps the admin and says nothing about a first run.
        events.clear()
        makeService(self.options(), MemoryReactorClock())
        self.assertFalse([e for e in events if "First run" in e.get("log_format", "")])
        # The admin can log in through the service's portal with that password.
        d = service.portal.login(UsernamePassword(b"admin", password.encode()), None,
                                 IAccount)
        d.addCallback(lambda result: self.assertEqual(result[1], Account("admin")))
        return d

    def test_no_admin_once_every_user_is_deleted(self) -> None:
        makeService(self.options(), MemoryReactorClock())
        os.unlink(os.path.join(self.data, INITIAL_PASSWORD_FILE))
        store = UserStore(self.data)
        with store.locked() as users:  # what cmdserver userdel admin does
            users.clear()
        events = capture_log(self)
        makeService(self.options(), MemoryReactorClock())
        self.assertEqual(store.load(), {})
        self.assertFalse(os.path.exists(os.path.join(self.data, INITIAL_PASSWORD_FILE)))
        self.assertFalse([e for e in events if "First run" in e.get("log_format", "")])
        [warning] = [e for e in events if "no users on file" in e.get("log_format", "")]
        self.assertEqual(warning["log_level"].name, "warn")

    def test_no_admin_when_the_users_file_was_removed(self) -> None:
        makeService(self.options(), MemoryReactorClock())
        os.unlink(os.path.join(self.data, INITIAL_PASSWORD_FILE))
        os.unlink(os.path.join(self.data, "users"))
        makeService(self.options(), MemoryReactorClock())
        self.assertEqual(UserStore(self.data).load(), {})
        self.assertFalse(os.path.exists(os.path.join(self.data, INITIAL_PASSWORD_FILE)))

    def test_broken_users_file_stops_with_one_line(self) -> None:
        options = self.options()
        os.makedirs(self.data, exist_ok=True)
        with open(os.path.join(self.data, "users"), "w") as f:
            f.write("garbage\n")
        with self.assertRaises(SystemExit) as e:
            makeService(options, MemoryReactorClock())
        self.assertEqual(str(e.exception),
                         f"cmdserver: {self.data}/users: line 1: not a JSON object")

    def login_modes(self, *argv: str) -> list[str]:
        service = makeService(self.options(*argv), MemoryReactorClock())
        return [door.factory.wrappedFactory.settings.login for door in service.doors
                if door.door == "line"]

    def test_login_mode_defaults_per_endpoint(self) -> None:
        modes = self.login_modes("--line", "tcp:0:interface=127.0.0.1",
                                 "--line", "tcp:0", "--line", r"tcp6:0:interface=\:\:1",
                                 "--line", "tcp:0:interface=0.0.0.0")
        self.assertEqual(modes, ["off", "required", "off", "required"])

    def test_line_auth_option_wins(self) -> None:
        self.assertEqual(self.login_modes("--line", "tcp:0:interface=127.0.0.1",
                                          "--line-auth", "required"), ["required"])
        self.assertEqual(self.login_modes("--line", "tcp:0", "--line-auth", "optional"),
                         ["optional"])

    def test_default_login_mode(self) -> None:
        self.assertEqual(default_login_mode("tcp:9999:interface=127.0.0.1"), "off")
        self.assertEqual(default_login_mode("tcp:9999:interface=127.1.2.3"), "off")
        self.assertEqual(default_login_mode("ssl:9443:privateKey=k:interface=127.0.0.1"),
                         "off")
        self.assertEqual(default_login_mode("tcp:9999"), "required")
        self.assertEqual(default_login_mode("tcp:9999:interface=localhost"), "required")
        self.assertEqual(default_login_mode("tcp:9999:interface=192.168.1.5"), "required")
        self.assertEqual(default_login_mode("unix:/run/x.sock"), "required")

    def test_bad_options(self) -> None:
        for argv in (["--line-auth", "sometimes"], ["--bcrypt-cost", "3"],
                     ["--bcrypt-cost", "32"], ["--users-poll-interval", "-1"],
                     ["--tls-client-ca", "/nonexistent/ca.pem"],
                     ["--line", "tcp:0", "--tls-client-ca", __file__]):
            self.assertRaises(usage.UsageError, self.options, *argv)

    def test_bad_line_auth_in_config_file(self) -> None:
        config = os.path.join(temp_dir(self), "cmdserver.toml")
        with open(config, "w") as f:
            f.write('line-auth = "maybe"\n')
        self.assertRaises(usage.UsageError, self.options, "--config", config)
