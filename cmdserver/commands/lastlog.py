"""``lastlog [N]``: the tail of the system log, streamed from a child process."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from cmdserver.commands.base import (
    ChildOutput,
    Command,
    Context,
    OutputSink,
    register_producer,
)
from cmdserver.commands.params import Int, Param
from cmdserver.errors import CommandError

DEFAULT_LINES = 10
MAX_LINES = 1000
SYSLOG_FILES = ("/var/log/syslog", "/var/log/messages")
JOURNAL = "journal"
STDERR_LIMIT = 4096
CHILD_ENV = {"PATH": os.defpath, "LC_ALL": "C"}


@dataclass(frozen=True)
class LogSource:
    """A log file to ``tail``, or the systemd journal when ``path`` is None."""

    path: str | None

    @property
    def is_journal(self) -> bool:
        return self.path is None

    def describe(self) -> str:
        return JOURNAL if self.path is None else self.path


def journal_works(journalctl: str | None = None) -> bool:
    """True if ``journalctl`` runs and has entries (checked once, at start-up)."""
    journalctl = journalctl or shutil.which("journalctl")
    if not journalctl:
        return False
    try:
        done = subprocess.run(
            [journalctl, "-n", "1", "--no-pager", "-q"], capture_output=True, timeout=5,
            env=CHILD_ENV, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def choose_source(configured: str | None, own_log: str | None) -> LogSource:
    """Pick the log source: the configured one, else the first that exists of
    /var/log/syslog, /var/log/messages, the journal, the daemon's own log."""
    if configured:
        return LogSource(None if configured == JOURNAL else configured)
    for path in SYSLOG_FILES:
        if os.path.exists(path):
            return LogSource(path)
    if journal_works():
        return LogSource(None)
    return LogSource(own_log)


class _TailProtocol(ProcessProtocol):
    """Streams the child's stdout as lines; keeps a little stderr for the error."""

    # Set by spawnProcess; a cancel before that meets None (an AttributeError).
    transport: IProcessTransport

    def __init__(self, out: OutputSink, done: Deferred) -> None:
        self.out = out
        self.done = done
        self.unregister: Callable[[], None] | None = None  # the sink's back-pressure
        self.lines: list[str] = []
        self._partial = b""
        self._stderr = b""
        self._begun = False

    def stop_back_pressure(self) -> None:
        """Leave the sink; read the pipes again (a paused pipe would hide the EOF
        of a killed child, and it would never be reaped)."""
        if self.unregister is not None:
            unregister, self.unregister = self.unregister, None
            unregister()
            ChildOutput(self.transport).resumeProducing()

    def begin(self) -> None:
        if not self._begun:
            self._begun = True
            self.out.line("Begin lastlog")

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            self._stderr = (self._stderr + data)[:STDERR_LIMIT]
            return
        if self.done.called:  # cancelled: the child is being killed
            return
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            self._emit(raw)

    def _emit(self, raw: bytes) -> None:
        self.begin()
        text = raw.decode("utf-8", "replace")
        self.lines.append(text)
        self.out.line(text)

    def processEnded(self, reason: Failure) -> None:
        self.stop_back_pressure()
        if self.done.called:
            return
        if self._partial:
            self._emit(self._partial)
        if reason.check(error.ProcessDone):
            self.begin()
            self.done.callback(self.lines)
            return
        message = self._stderr.decode("utf-8", "replace").strip().splitlines()
        detail = message[0] if message else str(reason.value).strip()
        for prefix in ("tail: ", "journalctl: "):
            detail = detail.removeprefix(prefix)
        self.done.errback(CommandError(f"lastlog failed: {detail}"))


class LastLog(Command):
    name = "lastlog"
    summary = f"Show the last N lines of the system log (default {DEFAULT_LINES})."
    usage = f"lastlog [N]   (1..{MAX_LINES})"
    streams = True
    params = (Param("n", Int(1, MAX_LINES), default=DEFAULT_LINES, metavar="N",
                    help="how many lines"),)

    def __init__(self, source: LogSource, tail: str | None = None,
                 journalctl: str | None = None) -> None:
        self.source = source
        self.tail = tail or shutil.which("tail")
        self.journalctl = journalctl or shutil.which("journalctl")

    def argv(self, n: int) -> tuple[str, list[str]]:
        """The executable and the child's argument list (never a shell)."""
        if self.source.is_journal:
            if not self.journalctl:
                raise CommandError("lastlog failed: journalctl not found")
            return self.journalctl, ["journalctl", "-n", str(n), "--no-pager"]
        if not self.source.path:
            raise CommandError("lastlog failed: no log source is configured")
        if not self.tail:
            raise CommandError("lastlog failed: tail not found")
        return self.tail, ["tail", "-n", str(n), "--", self.source.path]

    def run(self, ctx: Context, n: int = DEFAULT_LINES) -> Deferred:
        executable, argv = self.argv(n)
        protocol: _TailProtocol

        def cancel(_: Deferred) -> None:
            protocol.stop_back_pressure()
            try:
                protocol.transport.signalProcess("KILL")
            except (error.ProcessExitedAlready, AttributeError):
                pass

        done: Deferred = Deferred(cancel)
        protocol = _TailProtocol(ctx.out, done)
        try:
            ctx.reactor.spawnProcess(protocol, executable, argv, env=CHILD_ENV)
        except OSError as e:
            raise CommandError(f"lastlog failed: {e.strerror or e}") from None
        protocol.transport.closeStdin()
        # A client that does not read holds the child at its pipe, not in our memory.
        protocol.unregister = register_producer(ctx.out, ChildOutput(protocol.transport))
        return done

    def text(self, result: Any) -> list[str]:
        return ["End lastlog"]
