"""Start-up of the one service: all of it (lock, audit log, every door) or exit 1
with one line; the data directory's lock; the one SIGHUP hook."""

from __future__ import annotations

import errno
import gc
import os
import signal
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, ServerFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent
from twisted.trial import unittest

from cmdserver.audit import audit_publisher
from cmdserver.service import (
    LOCK_FILE,
    CmdServerService,
    DataDirLock,
    Hangup,
    Limits,
    StartupError,
)
from tests.helpers import capture_log, make_core
from tests.helpers.creds import temp_dir

IN_USE = CannotListenError("127.0.0.1", 9999, OSError(errno.EADDRINUSE,
                                                      "Address already in use"))


class FakePort:
    def __init__(self, port: int) -> None:
        self.port = port
        self.stopped = False

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def stopListening(self) -> None:
        self.stopped = True


class Endpoint:
    """Listens at once (a port), fails at once (``error``), or when the test says."""

    def __init__(self, port: int = 0, error: Exception | None = None,
                 later: bool = False) -> None:
        self.port, self.error, self.later = port, error, later
        self.ports: list[FakePort] = []
        self.pending: defer.Deferred | None = None

    def listen(self, factory: Any) -> defer.Deferred:
        if self.later:
            self.pending = defer.Deferred()
            return self.pending
        if self.error is not None:
            return defer.fail(self.error)
        self.ports.append(FakePort(self.port))
        return defer.succeed(self.ports[-1])


def lines(events: list[dict], level: str) -> list[str]:
    return [formatEvent(e) for e in events if getattr(e.get("log_level"), "name", "") == level]


class StartTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = temp_dir(self)
        self.reactor = MemoryReactorClock()
        self.events = capture_log(self)

    def service(self, audit: str | None = "audit.log") -> CmdServerService:
        core = make_core(self.dir, self.reactor)
        service = CmdServerService(core, Limits(), os.path.join(self.dir, audit)
                                   if audit else None, lock=DataDirLock(self.dir))
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def assert_stopped_with(self, service: CmdServerService, line: str) -> None:
        with self.assertRaises(SystemExit) as e:
            service.privilegedStartService()
        self.assertEqual(e.exception.code, 1)
        self.assertEqual(lines(self.events, "critical"), [f"cannot start: {line}"])
        self.assertFalse([e for e in self.events if e.get("log_failure")])  # no traceback
        # Nothing stays open: the lock is free again and the audit log closed.
        other = DataDirLock(self.dir)
        other.acquire()
        other.release()
        if service.audit is not None:
            self.assertFalse(service.audit.is_open)
            self.assertNotIn(service.audit, audit_publisher._listening)

    def test_a_door_that_cannot_listen_stops_the_start_and_closes_the_others(self) -> None:
        service = self.service()
        first, second, third = Endpoint(4001), Endpoint(error=IN_USE), Endpoint(4003)
        service.add_door("line", "tcp:4001", Factory(), endpoint=first)
        service.add_door("line", "tcp:9999:interface=127.0.0.1", Factory(), endpoint=second)
        service.add_door("pb", "tcp:4003", Factory(), endpoint=third)
        self.assert_stopped_with(
            service, "line door tcp:9999:interface=127.0.0.1: cannot listen: "
                     "Address already in use")
        self.assertTrue(first.ports[0].stopped)
        self.assertTrue(third.ports[0].stopped)
        self.assertEqual([door.port for door in service.doors], [None, None, None])
        # The failure was reported once: it is no unhandled error in a Deferred either.
        del service
        gc.collect()
        self.assertFalse([e for e in self.events if "Unhandled" in formatEvent(e)])

    def test_the_start_without_privileges_stops_alike(self) -> None:
        service = self.service(audit=None)
        service.add_door("line", "unix:/nonexistent/s", Factory(), endpoint=Endpoint(
            error=CannotListenError(None, "/nonexistent/s",
                                    OSError(errno.ENOENT, "No such file or directory"))))
        with self.assertRaises(SystemExit):
            service.startService()
        self.assertEqual(lines(self.events, "critical"),
                         ["cannot start: line door unix:/nonexistent/s: cannot listen: "
                          "No such file or directory"])
        self.assertFalse(service.running)

    def test_a_real_endpoint_in_use(self) -> None:
        from twisted.internet import reactor

        taken = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        port = cast(IPv4Address, taken.getHost()).port
        core = make_core(self.dir, reactor)
        service = CmdServerService(core, Limits())
        service.add_door("line", f"tcp:{port}:interface=127.0.0.1", Factory())
        with self.assertRaises(SystemExit):
            service.privilegedStartService()
        [line] = lines(self.events, "critical")
        self.assertEqual(line, f"cannot start: line door tcp:{port}:interface=127.0.0.1: "
                               "cannot listen: Address already in use")

    def test_a_door_failing_after_the_start_stops_the_reactor_with_one_line(self) -> None:
        service = self.service()
        late = Endpoint(later=True)
        service.add_door("line", "tcp:9999", Factory(), endpoint=late)
        service.privilegedStartService()
        service.startService()
        self.reactor.running = True
        assert late.pending is not None
        late.pending.errback(IN_USE)
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(lines(self.events, "critical"),
                         ["line door tcp:9999: cannot listen: Address already in use; stopping"])
        self.assertFalse([e for e in self.events if e.get("log_failure")])

    def test_an_audit_log_that_cannot_be_opened(self) -> None:
        service = self.service(audit="no/such/dir/audit.log")
        service.add_door("line", "tcp:4001", Factory(), endpoint=Endpoint(4001))
        path = os.path.join(self.dir, "no/such/dir/audit.log")
        self.assert_stopped_with(service, f"audit log {path}: No such file or directory")
        self.assertEqual(service.doors[0].port, None)

    def test_a_data_directory_in_use(self) -> None:
        holder = DataDirLock(self.dir)
        holder.acquire()
        self.addCleanup(holder.release)
        service = self.service()
        endpoint = Endpoint(4001)
        service.add_door("line", "tcp:4001", Factory(), endpoint=endpoint)
        with self.assertRaises(SystemExit):
            service.privilegedStartService()
        self.assertEqual(lines(self.events, "critical"),
                         [f"cannot start: data directory {self.dir} is in use by another "
                          f"cmdserver (pid {os.getpid()})"])
        self.assertEqual(endpoint.ports, [])  # refused before any door listened
        self.assertFalse(os.path.exists(os.path.join(self.dir, "audit.log")))

    def test_the_lock_is_held_while_running_and_released_at_stop(self) -> None:
        service = self.service()
        service.add_door("line", "tcp:4001", Factory(), endpoint=Endpoint(4001))
        service.privilegedStartService()
        service.startService()
        with open(os.path.join(self.dir, LOCK_FILE)) as f:
            self.assertEqual(f.read(), f"{os.getpid()}\n")
        with self.assertRaises(StartupError):
            DataDirLock(self.dir).acquire()
        self.successResultOf(service.stopService())
        DataDirLock(self.dir).check()


class DataDirLockTests(unittest.TestCase):
    def test_second_lock_names_the_directory_and_the_holder(self) -> None:
        directory = temp_dir(self)
        first = DataDirLock(directory)
        first.acquire()
        with self.assertRaises(StartupError) as e:
            DataDirLock(directory).check()
        self.assertEqual(str(e.exception), f"data directory {directory} is in use by "
                                           f"another cmdserver (pid {os.getpid()})")
        first.release()
        second = DataDirLock(directory)
        second.check()
        self.assertFalse(second.held)  # a check does not keep it
        second.acquire()
        self.assertTrue(second.held)
        second.release()
        self.assertEqual(os.stat(second.path).st_mode & 0o777, 0o600)

    def test_a_holder_that_wrote_no_pid_yet(self) -> None:
        directory = temp_dir(self)
        first = DataDirLock(directory)
        first.acquire()
        self.addCleanup(first.release)
        os.truncate(first.path, 0)
        with self.assertRaises(StartupError) as e:
            DataDirLock(directory).acquire()
        self.assertEqual(str(e.exception),
                         f"data directory {directory} is in use by another cmdserver")

    def test_a_directory_that_cannot_hold_the_lock(self) -> None:
        missing = os.path.join(temp_dir(self), "missing")
        with self.assertRaises(StartupError) as e:
            DataDirLock(missing).acquire()
        self.assertEqual(str(e.exception), f"data directory {missing}: cannot open "
                                           f"{LOCK_FILE}: No such file or directory")


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
