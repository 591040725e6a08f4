"""Test doubles shared by the suite: a process-spawning fake reactor and a ready core."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver
from twisted.python.failure import Failure

from cmdserver.audit import AuditFile
from cmdserver.commands import default_registry
from cmdserver.commands.base import Command, Context, ListSink
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore
from cmdserver.policy import Policy


class FakeProcess:
    """The transport a :class:`ProcessReactor` hands to a spawned protocol."""

    def __init__(self, protocol: Any, executable: str, args: list[str], env: Any,
                 path: Any = None, use_pty: Any = 0) -> None:
        self.proto = protocol
        self.executable = executable
        self.args = args
        self.env = env
        self.path = path  # the child's working directory
        self.use_pty = use_pty
        self.signals: list[str] = []
        self.stdin_closed = False
        self.ended = False
        self.paused = False  # reading its pipes stopped (back-pressure)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, signal: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(signal)

    # What the test makes the child do:
    def out(self, data: bytes, fd: int = 1) -> None:
        self.proto.childDataReceived(fd, data)

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        self.ended = True
        if code == 0 and signal is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(code, signal))
        self.proto.processEnded(reason)


class ProcessReactor(MemoryReactorClock):
    """MemoryReactorClock that records spawnProcess calls instead of forking."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.spawn_error: OSError | None = None

    def spawnProcess(self, processProtocol: Any, executable: str, args: Any = (),
                     env: Any = None, path: Any = None, uid: Any = None, gid: Any = None,
                     usePTY: Any = 0, childFDs: Any = None) -> FakeProcess:
        if self.spawn_error is not None:
            raise self.spawn_error
        process = FakeProcess(processProtocol, executable, list(args), env, path, usePTY)
        self.processes.append(process)
        processProtocol.makeConnection(process)
        return process


def synchronous(f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
    """Run 'thread' work inline, so unit tests need no threads and no real reactor."""
    return defer.maybeDeferred(f, *args, **kwargs)


def make_core(root: str, reactor: Any = None, source: LogSource | None = None,
              run_in_thread: Callable[..., defer.Deferred] | None = synchronous,
              roots: list[str] | None = None) -> CommandCore:
    reactor = reactor if reactor is not None else ProcessReactor()
    registry = default_registry(source or LogSource("/var/log/test.log"))
    return CommandCore(registry, Policy(roots or [root]), reactor, run_in_thread=run_in_thread)


def make_context(core: CommandCore, **kwargs: Any) -> Context:
    kwargs.setdefault("user", "tester")
    kwargs.setdefault("peer", "127.0.0.1:5555")
    kwargs.setdefault("door", "line")
    kwargs.setdefault("out", ListSink())
    return Context(core, **kwargs)


class OutsideTreeTempMixin:
    """``mktemp`` under the system temp directory, removed after the test: run by
    pytest, trial's own ``mktemp`` would create its directories below the cwd and
    keep them."""

    addCleanup: Callable[..., None]  # the TestCase's it is mixed into

    def mktemp(self) -> str:
        base = tempfile.mkdtemp(prefix="cmdserver-test-")
        self.addCleanup(shutil.rmtree, base, True)
        return os.path.join(base, "temp")


class Later(Command):
    """A command that answers when the test fires one of its ``pending`` Deferreds."""

    name = "later"
    usage = "later"

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    def run(self, ctx: Context) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return d


def capture_log(test: Any) -> list[dict]:
    """Collect every twisted.logger event until the test ends."""
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return events


def capture_audit(test: Any, events: list[dict] | None = None) -> list[dict]:
    """Collect every audit record (as its ``cmdserver.audit`` event) until the test
    ends, into ``events`` if given: without an observer there are no records."""
    from cmdserver.audit import audit_publisher

    events = [] if events is None else events
    observer = cast(ILogObserver, events.append)
    audit_publisher.addObserver(observer)
    test.addCleanup(audit_publisher.removeObserver, observer)
    return events


def commands_audited(events: list[dict]) -> list[dict]:
    """The audit records of commands among ``events`` (no login, session or file ones)."""
    return [e for e in events
            if e.get("log_namespace") == "cmdserver.audit" and e.get("event") == "command"]


def temp_audit_file(test: Any) -> AuditFile:
    """An open audit file in a temporary directory, its batches timed by a ``Clock``
    (``audit.reactor``); closed and removed when the test ends."""
    tmp = tempfile.TemporaryDirectory()
    test.addCleanup(tmp.cleanup)
    audit = AuditFile(os.path.join(tmp.name, "audit.log"), Clock())
    audit.open()
    test.addCleanup(audit.close)
    return audit
