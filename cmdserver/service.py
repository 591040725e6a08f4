"""The one service: the command core, the connection limits and every door.

Start-up either opens everything it was asked for or stops the daemon: the
data directory's lock (:class:`DataDirLock`), the audit log and every door's
endpoint.  If one of them fails, what was already open is closed again, the
main log gets one line naming what failed and why (no traceback), and the
process exits with status 1 (:class:`StartupError`, :class:`StartupExit`).

:class:`Hangup` is the daemon's one SIGHUP handler: the credentials reload and
the audit log reopens from it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from cmdserver.audit import AuditFile, audit_publisher
from cmdserver.auth.portal import Realm, build_portal
from cmdserver.core import CommandCore
from cmdserver.doors.limits import ConnectionLimits, LimitedFactory, Refusal

log = Logger()

SHUTDOWN = "the server is shutting down"
LOCK_FILE = "cmdserver.lock"  # in the data directory: held by the running daemon


class StartupError(Exception):
    """Something the daemon must have cannot be opened; the message is one line."""


class StartupExit(SystemExit, Exception):
    """Ends the process with status 1 once a start-up failure has been logged.

    A SystemExit, so Python exits with status 1 and prints nothing (no
    traceback); an Exception too, so that twistd, started without ``-n``,
    passes the line to its waiting parent process (which prints it and exits
    1) and removes its pidfile.  A plain SystemExit would leave that parent
    waiting for ever.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.code = 1


def reason(error: BaseException) -> str:
    """The why of an OS-level failure, as a person reads it (``Address already in use``)."""
    if isinstance(error, CannotListenError) and isinstance(error.socketError, BaseException):
        error = error.socketError
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


class DataDirLock:
    """An exclusive ``flock`` on ``DATA-DIR/cmdserver.lock``, held while the daemon runs.

    The file holds the pid of the daemon that has the lock, so a second daemon
    on the same directory can say whose it is.  ``flock`` locks go with the
    open file, not the process: a daemon that forks keeps it, and the kernel
    drops it when the process ends however it ends (the file stays).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (or, if held, write our pid again); StartupError if another has it."""
        if self._fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:
                raise StartupError(f"data directory {self.directory}: cannot open "
                                   f"{LOCK_FILE}: {reason(e)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise StartupError(f"data directory {self.directory}: cannot lock "
                                       f"{LOCK_FILE}: {reason(e)}") from None
                raise StartupError(
                    f"data directory {self.directory} is in use by another cmdserver"
                    + (f" (pid {holder})" if holder else "")) from None
            self._fd = fd
        # The pid of the process that serves (twistd forks after makeService).
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode("ascii"), 0)

    @staticmethod
    def _holder(fd: int) -> int | None:
        try:
            text = os.pread(fd, 32, 0).decode("ascii").strip()
            return int(text) if text.isdigit() else None
        except (OSError, UnicodeDecodeError):
            return None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # the file stays: removing it would race the next daemon's lock

    def check(self) -> None:
        """Fail now if another daemon holds the directory (the lock is not kept)."""
        held = self.held
        self.acquire()
        if not held:
            self.release()


class Hangup:
    """The daemon's one SIGHUP handler; every listener runs on the reactor thread.

    Installed while the service runs.  A handler that was there before (a
    Python one) still runs first, so nothing that relied on it loses it.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.listeners: list[Callable[[], Any]] = []
        self._previous: Any = None
        self._installed = False

    def add(self, listener: Callable[[], Any]) -> None:
        self.listeners.append(listener)

    def install(self) -> None:
        if self._installed or not hasattr(signal, "SIGHUP"):
            return
        try:
            self._previous = signal.signal(signal.SIGHUP, self._signal)
        except ValueError:  # not the main thread: no signals to install
            return
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            previous, self._previous = self._previous, None
            signal.signal(signal.SIGHUP, signal.SIG_DFL if previous is None else previous)
            self._installed = False

    def _signal(self, signum: int, frame: Any) -> None:
        if callable(self._previous):
            self._previous(signum, frame)
        self.reactor.callFromThread(self.fire)

    def fire(self) -> None:
        """What SIGHUP does: each listener in turn, one's failure not stopping the next."""
        for listener in list(self.listeners):
            maybeDeferred(listener).addErrback(self._failed, listener)

    @staticmethod
    def _failed(failure: Failure, listener: Callable[[], Any]) -> None:
        log.failure("SIGHUP: {listener} failed", failure, listener=listener)


class DoorService(Service):
    """Listens on one endpoint string for one door; ``listening`` fires with the port.

    A failure to listen is kept in ``failure``; the parent service reports it
    and stops the daemon.  One that comes after the start (an endpoint that
    listens asynchronously) is reported here and stops the reactor.
    """

    def __init__(self, door: str, description: str, factory: LimitedFactory,
                 reactor: Any, endpoint: Any = None) -> None:
        self.endpoint = endpoint  # built by the caller when a string cannot say it all
        self.door = door
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.failure: Failure | None = None
        self.listening: Deferred = Deferred()
        self._listen_called = False
        self._starting = False
        self.setName(f"{door} {description}")

    def privilegedStartService(self) -> None:
        # Listen before twistd drops privileges (ports below 1024).
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()

    def _listen(self) -> None:
        if self._listen_called:
            return
        self._listen_called = True
        self._starting = True  # a failure now is the parent's to report
        try:
            try:
                endpoint = self.endpoint or serverFromString(self.reactor, self.description)
                d = endpoint.listen(self.factory)
            except Exception:
                d = fail()
            d.addCallbacks(self._listening, self._failed)
        finally:
            self._starting = False

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address: Any = port.getHost()  # an IPv4/IPv6 (host, port) or a UNIX (name) address
        where = getattr(address, "name", None) or f"{address.host}:{address.port}"
        log.info("{door} door listening on {where}", door=self.door, where=where)
        self.listening.callback(port)

    @property
    def error(self) -> str:
        """The one line that says why the door could not listen."""
        error = self.failure.value if self.failure is not None else None
        return (f"{self.door} door {self.description}: cannot listen: "
                f"{reason(error) if error is not None else 'unknown'}")

    def _failed(self, failure: Failure) -> None:
        self.failure = failure
        self.listening.errback(failure)
        if self._starting:
            return  # CmdServerService reports it and stops the start
        log.critical("{error}; stopping", error=self.error)
        self.listening.addErrback(lambda _: None)  # reported: not an unhandled error too
        # A daemon that cannot open a door it was asked for must not run half-open.
        if self.reactor.running:
            self.reactor.stop()

    def abandon(self) -> None:
        """Stop listening at once: the start failed (see CmdServerService)."""
        if self.failure is not None:
            self.listening.addErrback(lambda _: None)  # reported by the parent
        if self.port is None:
            return
        port, self.port = self.port, None
        path = getattr(port.getHost(), "name", None)
        port.stopListening()
        if isinstance(path, str | bytes) and path and not getattr(self.reactor, "running", True):
            # The reactor will not run to close the port and remove its socket
            # file, and a stale socket file would keep the next start from listening.
            with contextlib.suppress(OSError):
                os.unlink(path)

    def stopService(self) -> Deferred | None:
        super().stopService()
        self._listen_called = False
        self.factory.disconnect_all()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


@dataclass
class Limits:
    max_clients: int = 100
    max_per_ip: int = 10


class CmdServerService(MultiService):
    """Owns the core, the shared connection limits, the audit log and the doors.

    ``lock`` (makeService gives one) is the data directory's lock, taken first
    at start and released at the end of the stop.
    """

    def __init__(self, core: CommandCore, limits: Limits, audit_log: str | None = None,
                 portal: Portal | None = None, lock: DataDirLock | None = None) -> None:
        super().__init__()
        self.core = core
        self.portal = portal or build_portal(Realm())
        # A portal given here is built on a cmdserver Realm (build_portal).
        self.realm = cast(Realm, self.portal.realm)
        self.limits = ConnectionLimits(limits.max_clients, limits.max_per_ip)
        self.audit = AuditFile(audit_log, core.reactor) if audit_log else None
        self.lock = lock
        self.hangup = Hangup(core.reactor)
        if self.audit is not None:
            self.hangup.add(self.audit.reopen)
        self.doors: list[DoorService] = []

    def add_door(self, door: str, description: str, factory: Factory[Any],
                 refusal: Refusal = None, endpoint: Any = None) -> DoorService:
        """Serve ``factory`` on the endpoint ``description``, under the shared limits
        and the login gate's refusal of penalised addresses.

        ``endpoint``, if given, is used instead of parsing ``description``.
        """
        limited = LimitedFactory(factory, self.limits, self.core.stats, door, refusal,
                                 self.core.gate)
        service = DoorService(door, description, limited, self.core.reactor, endpoint)
        service.setServiceParent(self)
        self.doors.append(service)
        return service

    def privilegedStartService(self) -> None:
        self._start(super().privilegedStartService)

    def startService(self) -> None:
        self._start(super().startService)
        self.hangup.install()

    def _start(self, start_children: Callable[[], None]) -> None:
        """Lock, audit log, then the children (the doors listen): all of it or exit 1."""
        try:
            if self.lock is not None:
                self.lock.acquire()
            self._open_audit()
            start_children()
            failed = [door.error for door in self.doors if door.failure is not None]
            if failed:
                raise StartupError("; ".join(failed))
        except StartupError as e:
            self._abandon()
            log.critical("cannot start: {error}", error=str(e))
            raise StartupExit(f"cannot start: {e}") from None

    def _open_audit(self) -> None:
        if self.audit is not None and not self.audit.is_open:
            try:
                self.audit.open()
            except OSError as e:
                raise StartupError(f"audit log {self.audit.path}: {reason(e)}") from None
            audit_publisher.addObserver(self.audit)

    def _abandon(self) -> None:
        """Undo a start that failed: no door left listening, nothing left open."""
        for door in self.doors:
            door.abandon()
        if self.running:
            super().stopService()
        if self.audit is not None and self.audit.is_open:
            audit_publisher.removeObserver(self.audit)
            self.audit.close()
        if self.lock is not None:
            self.lock.release()

    def stopService(self) -> Deferred:
        self.hangup.uninstall()
        d = super().stopService()

        def close_audit(result: Any) -> Any:
            self.core.close_sessions(SHUTDOWN)  # each session's end, before the log closes
            if self.audit is not None:
                audit_publisher.removeObserver(self.audit)
                self.audit.close()
            if self.lock is not None:
                self.lock.release()
            return result

        return d.addBoth(close_audit)
