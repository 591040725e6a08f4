"""The one SIGHUP hook of the service."""

from __future__ import annotations

import os
import signal
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from cmdserver.service import CmdServerService, Hangup, Limits
from tests.helpers import capture_log, make_core
from tests.helpers.creds import temp_dir


class HangupTests(unittest.TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.queued: list[Any] = []
        self.reactor.callFromThread = lambda f, *a: self.queued.append((f, a))  # type: ignore
        self.previous = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, self.previous)

    def test_every_listener_runs_on_the_reactor_thread(self) -> None:
        calls: list[str] = []
        hangup = Hangup(self.reactor)
        hangup.add(lambda: calls.append("credentials"))
        hangup.add(lambda: calls.append("audit"))
        hangup.install()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(calls, [])  # not in the signal handler
        for f, a in self.queued:
            f(*a)
        self.assertEqual(calls, ["credentials", "audit"])
        hangup.uninstall()
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.previous)

    def test_a_handler_installed_before_still_runs(self) -> None:
        before: list[int] = []
        signal.signal(signal.SIGHUP, lambda signum, frame: before.append(signum))
        hangup = Hangup(self.reactor)
        hangup.install()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(before, [signal.SIGHUP])
        self.assertEqual(len(self.queued), 1)
        hangup.uninstall()
        os.kill(os.getpid(), signal.SIGHUP)
        self.assertEqual(before, [signal.SIGHUP, signal.SIGHUP])

    def test_one_failing_listener_does_not_stop_the_next(self) -> None:
        events = capture_log(self)
        calls: list[str] = []
        hangup = Hangup(self.reactor)
        hangup.add(lambda: 1 / 0)
        hangup.add(lambda: calls.append("next"))
        hangup.fire()
        self.assertEqual(calls, ["next"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertTrue([e for e in events if e.get("log_failure")])

    def test_the_service_owns_one_hook_that_reopens_the_audit_log(self) -> None:
        directory = temp_dir(self)
        core = make_core(directory, self.reactor)
        service = CmdServerService(core, Limits(), os.path.join(directory, "audit.log"))
        assert service.audit is not None
        self.assertEqual(service.hangup.listeners, [service.audit.reopen])
        service.startService()
        self.assertNotEqual(signal.getsignal(signal.SIGHUP), self.previous)
        self.successResultOf(service.stopService())
        self.assertEqual(signal.getsignal(signal.SIGHUP), self.previous)
