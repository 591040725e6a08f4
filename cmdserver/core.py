"""The command core: parse, run, audit and count commands for every door.

The core knows nothing of transports.  Text doors call :meth:`CommandCore.run_line`
and print the :class:`TextReply` it returns; PB calls :meth:`CommandCore.call`
and gets the command's result value (or a failure) back.

It is also the one gate of the audit trail: every door opens a session here
when a connection starts and closes it when it ends, reports each login
(:meth:`CommandCore.login`) and each file operation
(:meth:`CommandCore.audit_operation`); no door writes audit records of its own.
Every door logs in through the core's :class:`LoginGate` (``core.gate``):
login penalties per address, checks in flight, the login deadline.
"""

from __future__ import annotations

import shlex
import threading
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeGuard, cast, final

from twisted.internet import defer, threads
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cmdserver.audit import (
    COMMAND,
    FILE,
    LOGIN,
    PENALTY,
    REFUSED,
    SESSION_END,
    SESSION_START,
    audit_publisher,
)
from cmdserver.auth.gate import GateSettings, LoginGate
from cmdserver.auth.portal import ANONYMOUS
from cmdserver.commands.base import Command, Context, Registry, register_producer
from cmdserver.errors import (
    CommandError,
    DeadlineExceeded,
    NotFound,
    OutputLimitExceeded,
    TooManyCalls,
    UsageError,
)
from cmdserver.policy import Policy
from cmdserver.sessions import Session, SessionIds
from cmdserver.sources import LOCAL, source_of
from cmdserver.stats import DURATION_BUCKETS, Stats
from cmdserver.text import escape
from cmdserver.workers import DEFAULT_PER_ADDRESS, DEFAULT_THREADS, FairPool

log = Logger()

NOT_FOUND_TEXT = "Command not found."
DEFAULT_TIMEOUT = 3600.0  # seconds a command may run, unless configured otherwise
DEFAULT_MAX_OUTPUT = 16 << 20  # bytes of output one command may write
LOGIN_REQUIRED = "login required"
INTERNAL_ERROR = "internal error (see the server log)"
DEFAULT_MAX_CALLS_PER_ADDRESS = 32  # commands running at once from one client address
DEFAULT_MAX_CALLS_PER_SESSION = 16  # and on one connection (PB pipelines calls)


@final  # so that ``type(reply) is TextReply`` narrows run_text's result
@dataclass(slots=True)
class TextReply:
    """What a text door prints after a command's streamed output.

    (A slotted dataclass, not frozen: it is built on the path of every ``ping``;
    docs/benchmarks.md, "Line door hot path", has what each form costs.)"""

    lines: list[str]
    ok: bool
    status: int | None = None  # a special exit status for ``ssh HOST CMD`` (124: deadline)


def split_line(line: str) -> list[str]:
    """Split a command line into words; quotes group words as in a shell."""
    if '"' not in line and "'" not in line and "\\" not in line:
        return line.split()
    try:
        return shlex.split(line)
    except ValueError as e:  # "No closing quotation", "No escaped character"
        raise UsageError(str(e).lower()) from None


def error_text(failure: Failure) -> str:
    """The one line a user sees for a failed command."""
    if failure.check(CommandError):
        return cast(CommandError, failure.value).text
    if failure.check(CancelledError):
        return "Error: cancelled"
    return f"Error: {INTERNAL_ERROR}"


class CommandCore:
    """Runs commands from the registry under the policy, with audit and stats."""

    def __init__(
        self,
        registry: Registry,
        policy: Policy,
        reactor: Any = None,
        run_in_thread: Callable[..., Deferred] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_calls_per_address: int = DEFAULT_MAX_CALLS_PER_ADDRESS,
        max_calls_per_session: int = DEFAULT_MAX_CALLS_PER_SESSION,
        worker_threads: int = DEFAULT_THREADS,
        worker_threads_per_address: int = DEFAULT_PER_ADDRESS,
        workers: FairPool | None = None,
        gate: GateSettings | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.registry = registry
        self.policy = policy
        self.reactor = reactor
        self.stats = Stats(reactor.seconds())
        self._seconds = reactor.seconds
        self._run_in_thread = run_in_thread
        self.timeout = timeout  # 0: no deadline
        self.max_output = max_output  # 0: no cap
        self.max_calls_per_address = max_calls_per_address  # 0: no limit
        self.max_calls_per_session = max_calls_per_session  # per connection
        self._held: dict[str, int] = {}  # commands still running, per client address
        self._held_total = 0
        self._workers = workers
        self._worker_sizes = (worker_threads, worker_threads_per_address)
        self.sessions: dict[str, Session] = {}  # the open ones, by id
        self._session_ids = SessionIds()
        self.gate = LoginGate(self, gate)  # every door's logins pass here

    # -- sessions: what the doors report --------------------------------------

    def open_session(self, door: str, peer: str, transport: Any = None) -> Session:
        """A connection started on ``door`` from ``peer``: its session, audited
        (``session-start``, as ``anonymous``: no one has logged in yet).
        ``transport`` is the connection's: the core closes it (``loseConnection``)
        when it must end the session (its API token was revoked)."""
        session = Session(self._session_ids(), door, peer, self._seconds(),
                          transport=transport)
        self.sessions[session.id] = session
        audit_publisher.record(session.id, SESSION_START, ANONYMOUS, peer, door, None, {},
                               "ok", 0.0, None)
        return session

    def close_session(self, session: Session, reason: str | None = None) -> None:
        """The connection ended: audit the end of its session (``session-end``) with
        its duration and what ran in it (``reason``: why the server ended it, if it
        did).  Closing twice records it once."""
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.id, None)
        self.gate.session_closed(session)  # its login deadline, a check still queued
        audit_publisher.record(
            session.id, SESSION_END, session.user, session.peer, session.door, None, {}, "ok",
            self._seconds() - session.started, reason,
            {"commands": session.commands, "file_operations": session.file_operations,
             "login_failures": session.login_failures})

    def close_sessions(self, reason: str) -> None:
        """Close every session still open (the daemon is stopping: their connections
        are closing, but the audit log closes first)."""
        for session in list(self.sessions.values()):
            self.close_session(session, reason)

    def session_for(self, ctx: Context) -> Session:
        """The open session ``ctx`` belongs to; for a context outside any (a core
        used directly), a session of its own that nothing tracks."""
        session = self.sessions.get(ctx.session_id)
        if session is None:
            session = Session("", ctx.door, ctx.peer, self._seconds())
        return session

    def login(self, session: Session, user: Any, method: str, outcome: str,
              reason: str | None = None, token: str | None = None) -> None:
        """A login on ``session``: ``outcome`` ``ok``, ``failed`` or ``refused``
        (not checked: see :class:`LoginGate`), by ``method`` (``password``,
        ``key``, ``certificate``, ``token``) as ``user``, the name as the client
        gave it (control characters are escaped, a long name is cut).

        Audited as a ``login`` record and written to the main log; counted in
        ``stats``.  A password never comes here; for a login by API token,
        ``token`` is the token's id (never the token)."""
        name = escape(user)
        method = escape(method, 64)
        if outcome == "ok":
            session.user = name
            session.method = method
            session.token = token
            self.stats.logins += 1
            log.info("{door}: {user} logged in from {peer} by {method} (session {session})",
                     door=session.door, user=name, peer=session.peer, method=method,
                     session=session.id)
        else:
            session.login_failures += 1
            if outcome == "refused":
                self.stats.logins_refused += 1
            else:
                self.stats.login_failures += 1
            log.info("{door}: {outcome} login as {user} from {peer} by {method} ({count} on "
                     "this connection; session {session}){why}", door=session.door,
                     outcome=outcome, user=name, peer=session.peer, method=method,
                     count=session.login_failures, session=session.id,
                     why=f": {reason}" if outcome == "refused" and reason else "")
        args = {"method": method} if token is None else {"method": method, "token": token}
        audit_publisher.record(session.id, LOGIN, name, session.peer, session.door, None,
                               args, outcome, 0.0, reason)

    def end_token_sessions(self, token_ids: set[str]) -> None:
        """API tokens were revoked: end every session that logged in with one."""
        for session in list(self.sessions.values()):
            if session.token in token_ids and session.transport is not None:
                log.info("{door}: ending session {session} of {user}: its token was revoked",
                         door=session.door, session=session.id, user=session.user)
                self.close_session(session, "token revoked")
                session.transport.loseConnection()

    def audit_refusal(self, door: str, peer: str, reason: str,
                      result: dict[str, Any] | None = None) -> None:
        """Connections refused before any work (their address is penalised): a
        ``refused`` record with no session (``result`` counts them), and a line
        in the main log."""
        log.info("{door}: refused {peer}: {reason}", door=door, peer=peer, reason=reason)
        audit_publisher.record(None, REFUSED, ANONYMOUS, peer, door, None, {}, "refused",
                               0.0, reason, result)

    def audit_penalty(self, session: Session, user: Any, source: str, seconds: float,
                      failures: int) -> None:
        """A failed login on ``session`` penalised its ``source`` for ``seconds``:
        a ``penalty`` record, a line in the main log, counted in ``stats``."""
        self.stats.penalties += 1
        name = escape(user)
        seconds = round(seconds, 3)
        log.info("{door}: {source} penalised for {seconds:g} s after {failures} failed "
                 "login(s) (the last as {user} from {peer}; session {session})",
                 door=session.door, source=source, seconds=seconds, failures=failures,
                 user=name, peer=session.peer, session=session.id)
        audit_publisher.record(session.id, PENALTY, name, session.peer, session.door, None,
                               {"source": source}, "penalised", 0.0, None,
                               {"seconds": seconds, "failures": failures})

    def audit_operation(self, ctx: Context, name: str, args: dict[str, Any], outcome: str,
                        duration: float, error: str | None = None, result: Any = None) -> None:
        """A file operation a door carried out itself (SFTP ``get``, ``put`` …):
        audited like a command (a ``file`` record) and counted in ``stats``.

        ``args`` name paths as the jail sees them, never as the server's
        absolute paths; ``outcome`` is ``ok``, ``error`` or ``refused``."""
        self.stats.file_operations[name] += 1
        session = self.sessions.get(ctx.session_id)
        if session is not None:
            session.file_operations += 1
        audit_publisher.record(ctx.session_id, FILE, ctx.user, ctx.peer, ctx.door, name, args,
                               outcome, duration, error, result)

    # -- commands ----------------------------------------------------------------

    @property
    def workers(self) -> FairPool:
        """The threads for commands' file work, shared fairly between addresses
        (:mod:`cmdserver.workers`); made on first use."""
        if self._workers is None:
            size, per_address = self._worker_sizes
            self._workers = FairPool(self.reactor, size, per_address)
        return self._workers

    def in_thread(self, f: Callable[..., Any], *args: Any, ctx: Context | None = None,
                  **kwargs: Any) -> Deferred:
        """Run blocking work (file I/O, hashing) off the reactor thread.

        With ``ctx`` (what every command and door passes) the work runs in the
        file-work threads, within the share of ``ctx``'s client address
        (:class:`FairPool`): an address that keeps them busy makes only its own
        work wait.  Without it, in the reactor's own pool.  Cancelling the
        Deferred before the work started means it never starts.
        """
        if self._run_in_thread is not None:
            return self._run_in_thread(f, *args, **kwargs)
        if ctx is not None:
            return self.workers.submit(source_of(ctx.peer), f, *args, **kwargs)
        pool = self.reactor.getThreadPool()
        return threads.deferToThreadPool(self.reactor, pool, f, *args, **kwargs)

    def in_thread_cancellable(self, f: Callable[..., Any], *args: Any,
                              ctx: Context | None = None) -> Deferred:
        """Run ``f(*args, cancelled=event)`` off the reactor thread, cancellably
        (``ctx``: as for :meth:`in_thread`).

        Cancelling the returned Deferred fails it at once with ``CancelledError``
        and sets ``event``; ``f`` checks it between chunks of work and gives up.
        Work still waiting for a thread is dropped.
        """
        cancelled = threading.Event()

        def cancel(_: Deferred) -> None:
            cancelled.set()
            inner.cancel()

        outer: Deferred = Deferred(cancel)
        inner = self.in_thread(f, *args, ctx=ctx, cancelled=cancelled)

        def relay(result: Any) -> None:
            # After a cancel nobody waits for the result, so it is dropped.
            if not outer.called:
                outer.callback(result)  # a Failure here goes down the errback chain

        inner.addBoth(relay)
        return outer

    def run_line(self, ctx: Context, line: str) -> Deferred:
        """Run one text command line; fires with a :class:`TextReply`, never fails.

        Cancelling the returned Deferred cancels the running command.
        """
        reply = self.run_text(ctx, line)
        return reply if isinstance(reply, Deferred) else defer.succeed(reply)

    def run_text(self, ctx: Context, line: str) -> TextReply | Deferred:
        """:meth:`run_line` without a Deferred for a command that finished at once.

        Text doors call this on their hot path: ``ping``, ``help``, ``stats`` and
        every refusal then cost no Deferred chain.  A command still running gives
        a Deferred that fires with the :class:`TextReply`.
        """
        try:
            argv = split_line(line)
        except UsageError as e:
            return TextReply([e.text], False)
        if not argv:
            return TextReply([], True)
        name, args = argv[0], argv[1:]
        command = self.registry.get(name)
        if command is not None and command.doors is not None and ctx.door not in command.doors:
            command = None  # not served on this door: as unknown as a typo
        if (ctx.login == "required" and ctx.user == ANONYMOUS
                and (command is None or not command.open_before_login)):
            # Input before login may be a password typed at the wrong prompt: only the
            # name of a known command is kept, never the words.
            self._audit(ctx, name if command else "?", {}, "refused", LOGIN_REQUIRED)
            if command is not None:
                self.stats.refused_commands[(name, ctx.door)] += 1
            return TextReply([f"Error: {LOGIN_REQUIRED}"], False)
        if command is None:
            self.stats.not_found += 1
            self._audit(ctx, name, {"argv": args}, "not-found", None)
            return TextReply([NOT_FOUND_TEXT], False)
        try:
            kwargs = command.parse(args)
        except CommandError as e:
            self._audit(ctx, name, command.audit_argv(args), "refused", str(e))
            self.stats.errors += 1
            self.stats.refused_commands[(command.name, ctx.door)] += 1
            return TextReply([e.text], False)
        result = self.invoke(ctx, command, kwargs)
        if is_deferred(result):
            return result.addCallbacks(self._text_success, self._text_failure,
                                       callbackArgs=(command,))
        if isinstance(result, Failure):
            return self._text_failure(result)
        lines = command.text(result)  # _text_success inline: this is every ping's path
        if len(lines) > 8:
            return self._text_success(result, command, lines)
        return TextReply(lines, True)

    def _text_success(self, value: Any, command: Command,
                      lines: list[str] | None = None) -> TextReply:
        if lines is None:
            lines = command.text(value)
        cap = command.max_output if command.max_output is not None else self.max_output
        if cap and sum(map(len, lines)) + len(lines) > cap:
            # A value too large to print (a huge listing): one error line instead.
            return TextReply([OutputLimitExceeded(cap).text], False)
        return TextReply(lines, True)

    def lookup(self, ctx: Context, name: str) -> Command:
        """The command ``name`` as served on ``ctx``'s door, or :class:`NotFound`."""
        command = self.registry.get(name)
        if command is None or not command.serves(ctx.door):
            self.stats.not_found += 1
            self._audit(ctx, str(name)[:64], {}, "not-found", None)
            raise NotFound(NOT_FOUND_TEXT)
        return command

    def bind(self, ctx: Context, command: Command, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Check named arguments against the command's parameters; a refusal is
        audited and counted as on the text doors, then raised."""
        try:
            return command.bind(kwargs)
        except CommandError as e:
            self._audit(ctx, command.name, {"args": sorted(map(str, kwargs))}, "refused",
                        str(e))
            self.stats.errors += 1
            self.stats.refused_commands[(command.name, ctx.door)] += 1
            raise

    def call(self, ctx: Context, name: str, /, **kwargs: Any) -> Deferred:
        """Run a command with named arguments, checked as :meth:`bind` does; fires
        with its result value."""
        try:
            command = self.lookup(ctx, name)
            kwargs = self.bind(ctx, command, kwargs)
        except CommandError as e:
            return defer.fail(e)
        return self.run_command(ctx, command, **kwargs)

    def parse_words(self, ctx: Context, name: str, words: list[str]) -> tuple[Command, dict]:
        """The command and its arguments from words typed as on a text door
        (``cmdserver call NAME WORDS…``); a refusal is audited, then raised."""
        command = self.lookup(ctx, name)
        try:
            return command, command.parse(words)
        except CommandError as e:
            self._audit(ctx, command.name, command.audit_argv(words), "refused", str(e))
            self.stats.errors += 1
            self.stats.refused_commands[(command.name, ctx.door)] += 1
            raise

    def run_command(self, ctx: Context, command: Command, /, **kwargs: Any) -> Deferred:
        """Run a command object with audit and stats; fires with its result value.

        Doors use it for their own command objects that are not in the registry
        (PB's upload writer)."""
        result = self.invoke(ctx, command, kwargs)
        if isinstance(result, Deferred):
            return result
        if isinstance(result, Failure):
            return defer.fail(result)
        return defer.succeed(result)

    def _text_failure(self, failure: Failure) -> TextReply:
        return TextReply([error_text(failure)], False,
                         124 if failure.check(DeadlineExceeded) else None)

    def invoke(self, ctx: Context, command: Command,
               kwargs: dict[str, Any]) -> Deferred | Failure | Any:
        """Run, count and audit a command object.

        Gives the result (or a Failure) itself when the command finished at once,
        else a Deferred for it: most commands answer synchronously, and a
        Deferred chain per command would cost more than the command.  Doors that
        can hand a plain value on (PB) call this; :func:`is_deferred` tells the
        cases apart.
        """
        session = self.sessions.get(ctx.session_id)
        if session is not None and session.running >= self.max_calls_per_session or (
                self.max_calls_per_address and self._held_total >= self.max_calls_per_address):
            # Else neither this connection nor any address is at its limit.
            refusal = self._over_limit(ctx, session, command, kwargs)
            if refusal is not None:
                return refusal
        stats = self.stats
        stats.commands[command.name] += 1
        stats.in_flight += 1
        if session is not None:
            session.commands += 1
        started = self._seconds()
        sink = None
        if command.streams:
            cap = command.max_output if command.max_output is not None else self.max_output
            if cap:
                sink = CappedSink(ctx.out, cap, self.reactor)
                ctx = replace(ctx, out=sink)
        try:
            result: Any = command.run(ctx, **kwargs)  # a Deferred, or the result itself
        except Exception:  # KeyboardInterrupt, SystemExit: not a command failure
            return self._done(Failure(), ctx, command, kwargs, started)
        kind = type(result)
        if kind in _PLAIN:  # it finished at once, well: the common case, done here
            # What _done does for a success, without the call (5% of a ping).
            stats.in_flight -= 1
            elapsed = self._seconds() - started
            times = stats.durations[ctx.door][command.name]
            times[0 if elapsed <= _FIRST_BUCKET else bisect_left(DURATION_BUCKETS, elapsed)] += 1
            times[-1] += elapsed
            audit_publisher.record(ctx.session_id, COMMAND, ctx.user, ctx.peer, ctx.door,
                                   command.name, command.audit_args(kwargs), "ok",
                                   elapsed, None, command.audit_result(result))
            return result
        if kind is Deferred or isinstance(result, Deferred):
            if not result.called or result.paused or is_deferred(result.result):
                address = source_of(ctx.peer)
                self._held[address] = self._held.get(address, 0) + 1
                self._held_total += 1
                if session is not None:
                    session.running += 1
                result.addBoth(self._release, address, session)
                timeout = command.timeout if command.timeout is not None else self.timeout
                if timeout:
                    result.addTimeout(timeout, self.reactor, _deadline)
                if sink is not None:
                    sink.running = result
                    result.addErrback(sink.check_failure)
                return result.addBoth(self._done, ctx, command, kwargs, started)
            # Already fired: nothing to wait for.  A Failure taken out is handled
            # here, so the spent Deferred must not report it as unhandled.
            fired = result.result
            if isinstance(fired, Failure):
                result.addErrback(lambda _: None)
            result = fired
        return self._done(result, ctx, command, kwargs, started)

    def _over_limit(self, ctx: Context, session: Session | None, command: Command,
                    kwargs: dict[str, Any]) -> Failure | None:
        """The refusal of a command on a connection or from an address that has as
        many commands running as it may, or None."""
        limit = self.max_calls_per_session
        if session is not None and session.running >= limit:
            error = TooManyCalls("on this connection", limit)
        else:
            limit = self.max_calls_per_address
            address = source_of(ctx.peer)
            if not limit or address == LOCAL or self._held.get(address, 0) < limit:
                return None
            error = TooManyCalls("from this address", limit)
        self._audit(ctx, command.name, command.audit_args(kwargs), "refused", str(error))
        self.stats.errors += 1
        return Failure(error)

    def _release(self, result: Any, address: str, session: Session | None) -> Any:
        """A command that was still running ended: its connection and its address
        hold one less."""
        self._held_total -= 1
        count = self._held[address] - 1
        if count:
            self._held[address] = count
        else:
            del self._held[address]
        if session is not None:
            session.running -= 1
        return result

    def _done(self, result: Any, ctx: Context, command: Command, kwargs: dict[str, Any],
              started: float) -> Any:
        """Count and audit a command that ended; gives its result (or Failure) back."""
        stats = self.stats
        stats.in_flight -= 1
        elapsed = self._seconds() - started
        times = stats.durations[ctx.door][command.name]
        times[bisect_left(DURATION_BUCKETS, elapsed)] += 1
        times[-1] += elapsed
        if not isinstance(result, Failure):
            audit_publisher.record(ctx.session_id, COMMAND, ctx.user, ctx.peer, ctx.door,
                                   command.name, command.audit_args(kwargs), "ok", elapsed, None,
                                   command.audit_result(result))
            return result
        stats.errors += 1
        outcome, reason = _outcome(result)
        stats.failed[(command.name, ctx.door, outcome)] += 1
        if outcome == "internal-error":
            log.failure("command {command} failed", result, command=command.name,
                        user=ctx.user, peer=ctx.peer)
        audit_publisher.record(ctx.session_id, COMMAND, ctx.user, ctx.peer, ctx.door,
                               command.name, command.audit_args(kwargs), outcome, elapsed, reason)
        return result

    def _audit(self, ctx: Context, command: str, args: dict[str, Any], outcome: str,
               error: str | None) -> None:
        """Audit a command line refused before it ran."""
        audit_publisher.record(ctx.session_id, COMMAND, ctx.user, ctx.peer, ctx.door, command,
                               args, outcome, 0.0, error)


def is_deferred(value: object) -> TypeGuard[Deferred[Any]]:
    """``isinstance(value, Deferred)``, fast for plain values too.

    Deferred is an ABC (Awaitable), so ``isinstance`` with anything else walks
    the ABC machinery on every synchronous result (docs/benchmarks.md)."""
    kind = type(value)
    return kind is Deferred or (kind not in _PLAIN and isinstance(value, Deferred))


_FIRST_BUCKET = DURATION_BUCKETS[0]
_PLAIN = frozenset({str, bytes, int, float, bool, list, tuple, dict, type(None)})


class CappedSink:
    """The output sink of a command that streams, up to ``cap`` bytes: past it the
    lines are dropped and the command is cancelled, failing with
    :class:`OutputLimitExceeded`."""

    def __init__(self, out: Any, cap: int, reactor: Any) -> None:
        self.out = out
        self.cap = cap
        self.left = cap
        self.reactor = reactor
        self.running: Deferred | None = None
        self.exceeded = False
        self._unregister: Callable[[], None] | None = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Back-pressure passes through to the door's sink."""
        self._unregister = register_producer(self.out, producer)

    def unregisterProducer(self) -> None:
        if self._unregister is not None:
            unregister, self._unregister = self._unregister, None
            unregister()

    def line(self, text: str) -> None:
        if self.exceeded:
            return
        self.left -= (len(text) if text.isascii() else len(text.encode("utf-8", "replace"))) + 1
        if self.left < 0:
            self.exceeded = True
            # Not from inside the command's own call into its sink.
            self.reactor.callLater(0, self._stop)
            return
        self.out.line(text)

    def _stop(self) -> None:
        if self.running is not None and not self.running.called:
            self.running.cancel()

    def check_failure(self, failure: Failure) -> Failure:
        if self.exceeded and failure.check(CancelledError):
            return Failure(OutputLimitExceeded(self.cap))
        return failure


def _deadline(result: Any, timeout: float) -> Any:
    """``addTimeout``'s hook: the cancelled command failed with its deadline."""
    if isinstance(result, Failure) and result.check(CancelledError):
        return Failure(DeadlineExceeded(timeout))
    return result


def _outcome(failure: Failure) -> tuple[str, str | None]:
    if failure.check(CancelledError):
        return "cancelled", None
    if failure.check(DeadlineExceeded):
        return "deadline", str(failure.value)
    if failure.check(OutputLimitExceeded):
        return "output-limit", str(failure.value)
    if failure.check(CommandError):
        return "error", str(failure.value)
    return "internal-error", failure.getErrorMessage()
