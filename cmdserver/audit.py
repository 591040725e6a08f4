"""The audit log: every command, login, session and file operation, as JSON lines.

The core reports each event through ``AuditPublisher.record`` (:data:`audit_publisher`):
a command a door ran or refused, a login (ok or failed), the start and the end of a
session (one per connection), an SFTP file operation.  Every record names its
session, so the records of one connection can be told from another's.

When an :class:`AuditFile` is the only observer, ``record`` is
:meth:`AuditFile.record` itself, which queues the fields and writes the same line
as for the event without building the event: on a cheap command such as ``ping``
the event dict and its publication cost more than the command.  The fields become
JSON when their batch is written.  Lines are gathered for at most
:data:`FLUSH_DELAY` seconds (or :data:`FLUSH_LINES` lines) and written together
(and on close), so a stream of commands costs one ``write`` call per batch while
an event still reaches the disk a moment after its command ran.  (Writing once per
reactor turn instead cost a clock event and a ``write`` on every call of a client
that calls one at a time: docs/benchmarks.md, "PB door", has the figure.)

Other observers of :data:`audit_publisher` get each record as a ``twisted.logger``
event in the namespace ``cmdserver.audit``; audit events never go to the daemon's
main log.  With no observer at all (``--audit-log none``) ``record`` is
:func:`discard`, which returns at once: no record is made anywhere.
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from zope.interface import implementer

NAMESPACE = "cmdserver.audit"
FORMAT = "{event} [{session}] {user}@{peer} via {door}: {command} -> {outcome}"
FIELDS = ("session", "event", "user", "peer", "door", "command", "args", "outcome",
          "duration", "error", "result")
# What a record is about (its "event" field).
COMMAND = "command"  # a command a door ran, refused or did not know
FILE = "file"  # an SFTP file operation
LOGIN = "login"  # a login, successful or failed
SESSION_START = "session-start"  # a connection began
SESSION_END = "session-end"  # it ended
PENALTY = "penalty"  # failed logins penalised a source address
REFUSED = "refused"  # connections refused before any work (a penalised address)
FLUSH_DELAY = 0.01  # seconds a line may wait for its batch
FLUSH_LINES = 512  # a batch this long is written at once
CHECK_INTERVAL = 1.0  # seconds between checks that the path still names the open file
STRING_CACHE = 512  # encoded short strings and record heads kept (a few per busy session)
STRING_CACHED_LEN = 128  # longer strings (odd input) are encoded every time

_encode = json.JSONEncoder(default=str).encode
_encode_str = json.encoder.encode_basestring_ascii
_log = Logger()


def round_duration(value: Any) -> Any:
    """A duration as the audit log records it: seconds, to the microsecond."""
    if type(value) is float and math.isfinite(value):
        return round(value, 6)
    return value


_durations: dict[int, str] = {}  # microseconds -> the JSON of that many seconds


def encode_duration(value: Any) -> str:
    """``encode_value(round_duration(value))``, fast for the durations of most commands.

    ``round`` and ``repr`` of a float cost as much as the rest of the line
    (docs/benchmarks.md): a duration under a second is taken as whole microseconds,
    and the text of each count is kept (``us / 1e6`` is the same float as
    ``round(value, 6)``)."""
    if (type(value) is float and 0.0 <= value < 1.0
            and (value or math.copysign(1.0, value) > 0)):  # not -0.0: JSON keeps its sign
        us = int(value * 1e6 + 0.5)
        text = _durations.get(us)
        if text is None:
            if len(_durations) >= STRING_CACHE:
                _durations.clear()
            text = _durations[us] = repr(us / 1e6)
        return text
    return encode_value(round_duration(value))


def encode_value(value: Any) -> str:
    """``json.dumps(value, default=str)``, with the usual types encoded directly."""
    if type(value) is str:
        return _encode_str(value)
    if value is None:
        return "null"
    if type(value) is float and math.isfinite(value):
        return repr(value)
    return "{}" if value == {} else _encode(value)


def discard(session: str, event: str, user: str, peer: str, door: str, command: str | None,
            args: dict[str, Any], outcome: str, duration: float, error: str | None,
            result: Any = None) -> None:
    """``record`` with no audit observer (``--audit-log none``): nothing is recorded."""


class AuditPublisher(LogPublisher):
    """Sends audit records to the audit observers (the audit file) if there are any.

    Without one (``--audit-log none``, or a core used on its own) there is no
    audit trail: :attr:`record` is :func:`discard`, and events published
    otherwise are dropped too.  They never go to the global log publisher.
    """

    def __init__(self) -> None:
        super().__init__()
        self._listening: list[ILogObserver] = []
        self.logger = Logger(namespace=NAMESPACE, observer=self)
        # How the core reports an event (see publish): the audit file's own
        # record when that file is the only observer, so that no event is built;
        # nothing at all when there is no observer.
        self.record: Callable[..., None] = discard

    def addObserver(self, observer: ILogObserver) -> None:
        super().addObserver(observer)
        if observer not in self._listening:
            self._listening.append(observer)
        self._update_record()

    def removeObserver(self, observer: ILogObserver) -> None:
        super().removeObserver(observer)
        if observer in self._listening:
            self._listening.remove(observer)
        self._update_record()

    def _update_record(self) -> None:
        only = self._listening[0] if len(self._listening) == 1 else None
        if not self._listening:
            self.record = discard
        elif isinstance(only, AuditFile):
            self.record = only.record
        else:
            self.record = self.publish

    def __call__(self, event: dict[str, Any]) -> None:
        if self._listening:
            super().__call__(event)

    def publish(self, session: str, event: str, user: str, peer: str, door: str,
                command: str | None, args: dict[str, Any], outcome: str, duration: float,
                error: str | None, result: Any = None) -> None:
        """Publish one audit event (``result`` None: no result field).

        ``session`` is the session's id ("" outside any: the field is then null),
        ``event`` what the record is about (:data:`COMMAND`, :data:`LOGIN` …),
        ``command`` the command or file operation (None for a login or a
        session's start and end).  ``duration`` is in seconds, as measured: the
        record rounds it.  The core calls :attr:`record`, which takes the same
        arguments."""
        now = time.time()
        # The event Logger.info() would emit, built directly: Logger.emit checks the
        # level on every call.
        fields = {
            "log_logger": self.logger, "log_level": LogLevel.info,
            "log_namespace": NAMESPACE, "log_source": None, "log_format": FORMAT,
            "log_time": now, "session": session or None, "event": event, "user": user,
            "peer": peer, "door": door, "command": command,
            "args": args, "outcome": outcome, "duration": round_duration(duration),
            "error": error,
        }
        if result is not None:
            fields["result"] = result
        self(fields)


audit_publisher = AuditPublisher()


@implementer(ILogObserver)
class AuditFile:
    """Appends audit events to ``path`` (created 0600) as JSON lines.

    ``reactor`` schedules the write of each batch; without one every event is
    written at once.

    The file follows its path: :meth:`reopen` (on SIGHUP) opens it again, and
    before a batch is written, at most once every :data:`CHECK_INTERVAL`
    seconds of ``clock``, the path is compared with the open file (device and
    inode): a file renamed away (logrotate's ``create`` mode) or deleted is
    left and the path opened (created) anew.

    A record is written whole or not at all: when a batch cannot be written in
    full (the disk is full), the part of a line that did get written is cut
    off again (``ftruncate``), so the next batch starts on a line of its own,
    and the main log gets one line with the number of records lost.
    """

    def __init__(self, path: str, reactor: Any = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.reactor = reactor
        self.clock = clock  # the time of a record(), and of the path checks
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._checked = 0.0  # when the path was last compared with the open file
        self._reopen_failed = False  # said once in the main log, until it works again
        self._torn = False  # a partial line could not be cut off: start on a new line
        self._pending: list[str | tuple] = []  # lines, and record() fields not yet formatted
        self._flush_call: Any = None
        self._last_ms = -1
        self._last_time = ""
        self._last_second = -1
        self._second_text = ""
        self._strings: dict[str, str] = {}  # str -> its JSON encoding
        self._heads: dict[tuple[str, str, str, str, str, str | None], str] = {}  # see _head
        self.write_errors = 0  # batches that could not be written (counted for /metrics)
        self.lines_lost = 0  # the records they held

    def open(self) -> None:
        """Open (create) the file; OSError if that cannot be done."""
        self._fd, self._identity = self._open_path()
        self._checked = self.clock()

    def _open_path(self) -> tuple[int, tuple[int, int]]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        return fd, (st.st_dev, st.st_ino)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None

    def reopen(self) -> None:
        """Open the path again (SIGHUP): the next batch goes to the file now there."""
        if self._fd is not None:
            self._reopen("SIGHUP")

    def _reopen(self, why: str) -> None:
        try:
            fd, identity = self._open_path()
        except OSError as e:
            if not self._reopen_failed:
                self._reopen_failed = True
                _log.error("audit log {path}: cannot reopen ({why}): {error}; still writing "
                           "to the file already open", path=self.path, why=why,
                           error=e.strerror or str(e))
            return
        old, self._fd, self._identity = self._fd, fd, identity
        self._torn = False  # a new file, a new line
        self._reopen_failed = False
        if old is not None:
            os.close(old)
        _log.info("audit log {path} reopened ({why})", path=self.path, why=why)

    def _follow_path(self) -> None:
        """Reopen if the path no longer names the open file (renamed away, deleted)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._reopen("the file was moved or deleted")
            return
        except OSError:
            return  # cannot tell: keep writing where we are
        if (st.st_dev, st.st_ino) != self._identity:
            self._reopen("the file was replaced")

    def flush(self) -> None:
        """Write every pending line now."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        pending = self._pending
        if not pending or self._fd is None:
            return
        now = self.clock()
        if not self._checked <= now < self._checked + CHECK_INTERVAL:
            self._checked = now
            self._follow_path()
        parts: list[str] = []
        line_parts = self._parts
        lines = 0
        for entry in pending:
            if type(entry) is str:
                parts.append(entry)
                lines += 1
                continue
            try:
                parts.extend(line_parts(*entry))
                lines += 1
            except Exception:  # one odd value must not cost the batch
                _log.failure("audit record of {command} failed", command=entry[6])
        pending.clear()
        if lines:
            self._write_batch("".join(parts).encode("utf-8"), lines)

    def _write_batch(self, data: bytes, lines: int) -> None:
        """Write ``data`` (``lines`` whole lines); on a failure keep only whole lines."""
        fd = self._fd
        assert fd is not None
        start = 0
        if self._torn:  # the last batch left part of a line: end it first
            data = b"\n" + data
            start = 1
        written = 0
        try:
            view = memoryview(data)
            while written < len(data):
                n = self._write(fd, view[written:])
                if n <= 0:
                    raise OSError(errno.EIO, "the write took no bytes")
                written += n
        except OSError as e:
            self._lost(fd, data, start, written, lines, e)
            return
        self._torn = False

    def _write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)  # tests put a failing writer here

    def _lost(self, fd: int, data: bytes, start: int, written: int, lines: int,
              error: OSError) -> None:
        if written > start:
            self._torn = False
        whole = data.count(b"\n", start, written)  # records that did get written
        partial = written - (data.rfind(b"\n", 0, written) + 1)
        if partial:
            try:  # cut off the partial line: we are the only writer, at the file's end
                os.ftruncate(fd, os.fstat(fd).st_size - partial)
            except OSError:  # not a regular file, say: the next batch starts a new line
                self._torn = True
        self.write_errors += 1
        self.lines_lost += lines - whole
        _log.error("audit log {path}: {lost} record(s) lost, {written} of this batch's "
                   "{lines} written: {error}", path=self.path, lost=lines - whole,
                   written=whole, lines=lines, error=error.strerror or str(error))

    def _timestamp(self, when: float) -> str:
        """ISO 8601 in UTC to the millisecond, as ``datetime.isoformat`` writes it.

        Bursts share one formatted millisecond, and the date and time of day are
        formatted once a second: a client calling one command at a time has a
        new millisecond on nearly every call."""
        ms = int(when * 1000)
        if ms != self._last_ms:
            self._last_ms = ms
            second, milli = divmod(ms, 1000)
            if second != self._last_second:
                self._last_second = second
                self._second_text = datetime.fromtimestamp(second, UTC).strftime(
                    "%Y-%m-%dT%H:%M:%S")
            self._last_time = f"{self._second_text}.{milli:03d}+00:00"
        return self._last_time

    def __call__(self, event: dict[str, Any]) -> None:
        if self._fd is None or event.get("log_namespace") != NAMESPACE:
            return
        # What json.dumps(record) gives, field by field.
        parts = [f'{{"time": "{self._timestamp(event["log_time"])}"']
        for name in FIELDS:
            if name in event:
                parts.append(f'"{name}": {encode_value(event[name])}')
        self._append(", ".join(parts) + "}\n")

    def record(self, session: str, event: str, user: str, peer: str, door: str,
               command: str | None, args: dict[str, Any], outcome: str, duration: float,
               error: str | None, result: Any = None) -> None:
        """Queue the line :meth:`__call__` would write for the core's event with
        these fields (``result`` None: none), without the event: what
        :meth:`AuditPublisher.publish` would send, taken now.

        The fields are kept as they are and turned into JSON when the batch is
        written (:meth:`_parts`): a stream of commands then costs a tuple each
        here, and the formatting runs in one loop.  The values are the core's
        own (strings, and dicts it built for the record), not changed after."""
        if self._fd is None:
            return
        pending = self._pending
        pending.append((self.clock(), session, event, user, peer, door, command, args, outcome,
                        duration, error, result))
        if self._flush_call is None and self.reactor is not None:
            self._flush_call = self.reactor.callLater(FLUSH_DELAY, self.flush)
        elif self.reactor is None or len(pending) >= FLUSH_LINES:
            self.flush()

    def _parts(self, when: float, session: str, event: str, user: str, peer: str, door: str,
               command: str | None, args: dict[str, Any], outcome: str, duration: float,
               error: str | None, result: Any) -> tuple[str, ...]:
        """The JSON line of one :meth:`record`, in pieces: the batch is joined
        once, which costs half as much as building each line first.  The fields
        every command of a connection repeats (session, event, user, peer, door,
        command) are encoded once, as are the outcome, each millisecond's
        timestamp and short durations."""
        head = self._heads.get((session, event, user, peer, door, command))
        if head is None:
            head = self._head(session, event, user, peer, door, command)
        ms = int(when * 1000)
        return (
            '{"time": "', self._last_time if ms == self._last_ms else self._timestamp(when),
            '", ', head,
            ', "args": ', "{}" if not args and type(args) is dict else encode_value(args),
            ', "outcome": ', self._strings.get(outcome) or self._string(outcome),
            ', "duration": ', encode_duration(duration),
            ', "error": ', "null" if error is None else encode_value(error),
            "}\n" if result is None else f', "result": {encode_value(result)}}}\n')

    def _head(self, session: str, event: str, user: str, peer: str, door: str,
              command: str | None) -> str:
        """The session, event, user, peer, door and command fields, kept for next
        time when short."""
        head = (f'"session": {self._string(session) if session else "null"}, '
                f'"event": {self._string(event)}, "user": {self._string(user)}, '
                f'"peer": {self._string(peer)}, "door": {self._string(door)}, '
                f'"command": {self._string(command)}')
        if len(head) <= 6 * STRING_CACHED_LEN:
            if len(self._heads) >= STRING_CACHE:
                self._heads.clear()
            self._heads[session, event, user, peer, door, command] = head
        return head

    def _string(self, value: Any) -> str:
        """The JSON of a string field, kept for next time when it is short."""
        text = encode_value(value)
        if type(value) is str and len(value) <= STRING_CACHED_LEN:
            if len(self._strings) >= STRING_CACHE:
                self._strings.clear()
            self._strings[value] = text
        return text

    def _append(self, line: str) -> None:
        pending = self._pending
        pending.append(line)
        if self._flush_call is None and self.reactor is not None:
            self._flush_call = self.reactor.callLater(FLUSH_DELAY, self.flush)
        elif self.reactor is None or len(pending) >= FLUSH_LINES:
            self.flush()
