"""Commands the operator declares in the TOML file (``[commands.NAME]``).

Like NRPE's ``command[...]``, but without a shell::

    [commands.diskfree]
    summary = "Free space of a filesystem inside the roots"
    argv = ["/bin/df", "-P", "{path}"]
    args.path = { type = "path" }
    timeout = 10

A declared command is a :class:`~cmdserver.commands.base.Command` like the
built-in ones, so every door serves it, the core audits, counts, times out and
caps it, and ``help`` shows it.  What keeps it safe:

- ``argv`` is a list.  A placeholder ``{name}`` is a whole element and becomes
  exactly one element of the child's argument list: a value is never split,
  never re-parsed, never seen by a shell.  argv[0] is an absolute path to an
  executable file, checked at start.
- Every value is checked by its declared type (``int``, ``choice``, ``word``,
  ``path``) before anything runs, and may not start with ``-`` (so it cannot
  pass for an option) unless the argument says ``allow_dash = true``.
- A ``path`` is resolved inside the user's jail (:meth:`Jail.real_path
  <cmdserver.jail.Jail.real_path>`, in a thread, never on the reactor) and the
  program gets the resolved real path.  A program can only be given a name, and
  it walks that name again when it opens it: a user who can rename inside the
  jail meanwhile (SFTP) could swap a directory on that path for a symlink that
  leads out.  So a declared program should treat its path as untrusted, or the
  roots it is given should not be writable by the users who may run it
  (docs/security.md, *Declared commands*).
- The child has a minimal environment (``PATH=os.defpath``, ``LC_ALL=C``),
  runs in the first root of the user, and its stdin is closed.

**The process group.**  ``reactor.spawnProcess`` has no hook to run code in the
child before ``exec``, and without one a child cannot be made the leader of a
process group of its own without a race (``setpgid`` from the parent fails once
the child has exec'd) or a helper program (``setsid(1)`` is not everywhere, and
a wrapper is one more thing to trust).  So on a POSIX reactor the child is
started with :class:`SessionProcess`: Twisted's own ``Process`` (exactly what
``spawnProcess(usePTY=False)`` builds), whose forked child calls
``os.setsid()`` just before ``exec``.  (It always forks; Twisted forks too,
rather than ``posix_spawnp``, for a child given its own working directory.)
The child then leads a new session and process group whose id is its pid, and
the whole group is killed with ``SIGKILL`` on a deadline, a cancel (the client
went away) or a shutdown, and when the program itself exits (whatever it left
running in its group dies with it).  A program that puts itself in yet another
session (a daemon) leaves the group; process groups cannot follow it.  A
reactor that is not a POSIX reactor (a test double) gets a plain
``spawnProcess`` call, and the child alone is signalled.

**Output.**  The child's stdout is streamed to ``ctx.out`` one line at a time as
it comes (``streams = True``: the core's output cap applies).  Its stderr is not
streamed: the first 4 KiB are kept, its first line goes into the error when the
program fails, and its lines are in the result value.  The result is
``{"exit_status": N, "output": [stdout lines], "stderr": [stderr lines]}``; an
exit status not in ``ok_status`` (default ``[0]``) is an error on every door
(``Error: NAME exited with status N``), as is death by a signal.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.process import Process
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from cmdserver.commands.base import (
    ChildOutput,
    Command,
    Context,
    OutputSink,
    register_producer,
)
from cmdserver.commands.files import os_error
from cmdserver.commands.params import (
    PATH,
    SAFE_WORD,
    Choice,
    Int,
    Param,
    ParamType,
    PathParam,
    Word,
)
from cmdserver.errors import CommandError
from cmdserver.policy import Policy

log = Logger()

CHILD_ENV = {"PATH": os.defpath, "LC_ALL": "C"}
STDERR_LIMIT = 4096  # bytes of stderr kept for the error and the result
MAX_LINE = 65536  # a longer stdout line is cut into pieces of this size
SHUTDOWN_WAIT = 5.0  # seconds stopService waits for killed children to be reaped
DOORS = frozenset({"line", "ssh", "pb"})

# Names a declared command may not take: the built-in commands (``quit`` is
# ``exit``'s alias; ``login`` and ``upload`` are added by makeService) and the
# PB avatar's own entry points, ``call`` and ``run``.
RESERVED_NAMES = frozenset({
    "help", "ping", "stats", "ls", "comphash", "lastlog", "portscan", "upload", "login",
    "whoami", "exit", "quit", "call", "run",
})
RESERVED_ARGS = frozenset({"observer"})  # PB's streaming argument
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}", re.ASCII)
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")

COMMAND_KEYS = frozenset({"summary", "argv", "args", "order", "timeout", "max_output", "doors",
                          "ok_status"})
COMMON_ARG_KEYS = frozenset({"type", "default", "help", "allow_dash"})
TYPE_KEYS = {
    "int": frozenset({"min", "max"}),
    "choice": frozenset({"values"}),
    "word": frozenset({"pattern"}),
    "path": frozenset(),
}


class ConfigError(ValueError):
    """A ``[commands.NAME]`` table that cannot be served; the message is one line."""


@dataclass(frozen=True)
class Placeholder:
    """An argv element replaced by one argument's value."""

    name: str


def _fail(where: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {problem}")


def _string_list(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, "expected a list of strings")
    return value


def _argv_element(where: str, element: str) -> str | Placeholder:
    """A literal element (``{{`` and ``}}`` stand for braces) or a whole placeholder."""
    whole = PLACEHOLDER.fullmatch(element)
    if whole is not None:
        name = whole.group(1)
        if not NAME.fullmatch(name):
            raise _fail(where, f"{element!r} is not a placeholder of a plain lowercase name")
        return Placeholder(name)
    if "\0" in element:
        raise _fail(where, "NUL bytes are not allowed")
    rest = element.replace("{{", "").replace("}}", "")
    if "{" in rest or "}" in rest:
        raise _fail(where, f"{element!r}: a placeholder must be a whole argv element "
                           "(write {{ and }} for literal braces)")
    return element.replace("{{", "{").replace("}}", "}")


def check_executable(where: str, path: str) -> None:
    """argv[0]: an absolute path to an existing executable file."""
    if not os.path.isabs(path):
        raise _fail(where, f"{path!r} is not an absolute path")
    if not os.path.isfile(path):
        raise _fail(where, f"{path} is not an existing file")
    if not os.access(path, os.X_OK):
        raise _fail(where, f"{path} is not executable")


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(where, f"{value!r} is not a number")
    if not 0 <= value < float("inf"):
        raise _fail(where, f"{value!r} is not a number of seconds >= 0")
    return float(value)


def _integer(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, f"{value!r} is not a whole number")
    return value


def _param(where: str, name: str, table: Any) -> Param:
    """One ``args.NAME`` table as a positional parameter."""
    if not NAME.fullmatch(name):
        raise _fail(where, "an argument name must be a plain lowercase word")
    if name in RESERVED_ARGS:
        raise _fail(where, f"{name!r} is reserved (PB's streaming argument)")
    if not isinstance(table, dict):
        raise _fail(where, "expected a table such as { type = \"path\" }")
    kind = table.get("type")
    if kind is None:
        raise _fail(where, "type is missing (int, choice, word or path)")
    if kind not in TYPE_KEYS:
        raise _fail(where, f"unknown type {kind!r} (int, choice, word or path)")
    unknown = sorted(set(table) - COMMON_ARG_KEYS - TYPE_KEYS[kind])
    if unknown:
        raise _fail(where, f"unknown key(s) for a {kind}: {', '.join(unknown)}")
    dash = table.get("allow_dash", False)
    if not isinstance(dash, bool):
        raise _fail(f"{where}.allow_dash", f"{dash!r} is not true or false")
    help_text = table.get("help", "")
    if not isinstance(help_text, str):
        raise _fail(f"{where}.help", "expected a string")
    ptype: ParamType
    if kind == "int":
        low = table.get("min")
        high = table.get("max")
        if low is not None:
            _integer(f"{where}.min", low)
        if high is not None:
            _integer(f"{where}.max", high)
        if low is not None and high is not None and low > high:
            raise _fail(where, f"min {low} is greater than max {high}")
        if not dash and (low is None or low < 0):
            # Without allow_dash a negative number is refused like any value
            # starting with '-': say so rather than declare an unreachable range.
            low = 0 if low is None else low
            if low < 0:
                raise _fail(where, f"min {low} is negative: negative numbers start with '-'"
                                   " (set allow_dash = true)")
        ptype = Int(low, high)
    elif kind == "choice":
        values = _string_list(f"{where}.values", table.get("values"))
        if not values:
            raise _fail(f"{where}.values", "a choice needs at least one value")
        for value in values:
            if "\0" in value or not value:
                raise _fail(f"{where}.values", "values must be non-empty and without NUL")
            if value.startswith("-") and not dash:
                raise _fail(f"{where}.values", f"{value!r} starts with '-' "
                                               "(set allow_dash = true)")
        ptype = Choice(values)
    elif kind == "word":
        pattern = table.get("pattern", SAFE_WORD)
        if not isinstance(pattern, str):
            raise _fail(f"{where}.pattern", "expected a string (a regular expression)")
        try:
            ptype = Word(pattern)
        except re.error as e:
            raise _fail(f"{where}.pattern", f"bad regular expression: {e}") from None
    else:
        ptype = PATH
    param = Param(name, ptype, help=help_text, metavar=name.upper(), dash=dash)
    if "default" in table:
        default = table["default"]
        try:
            param.from_value(default)
        except CommandError as e:
            raise _fail(f"{where}.default", str(e)) from None
        param = Param(name, ptype, default=default, help=help_text, metavar=name.upper(),
                      dash=dash)
    return param


class DeclaredCommand(Command):
    """A command built from one ``[commands.NAME]`` table of the config file."""

    streams = True

    def __init__(self, name: str, table: Any, check_argv0: bool = True) -> None:
        where = f"commands.{name}"
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise ConfigError(f"{where}: a command name must be a plain lowercase word "
                              "(a-z, 0-9, _; at most 32)")
        if name in RESERVED_NAMES:
            raise ConfigError(f"{where}: {name!r} is a built-in command")
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: expected a table")
        unknown = sorted(set(table) - COMMAND_KEYS)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s): {', '.join(unknown)}")
        self.name = name

        summary = table.get("summary")
        if not isinstance(summary, str) or not summary.strip():
            raise ConfigError(f"{where}.summary: a one-line summary is required")
        if not summary.isprintable():
            raise ConfigError(f"{where}.summary: must be one printable line")
        self.summary = summary

        if "argv" not in table:
            raise ConfigError(f"{where}.argv: missing")
        raw_argv = _string_list(f"{where}.argv", table["argv"])
        if not raw_argv:
            raise ConfigError(f"{where}.argv: empty")
        elements = [_argv_element(f"{where}.argv[{i}]", e) for i, e in enumerate(raw_argv)]
        program = elements[0]
        if isinstance(program, Placeholder):
            raise ConfigError(f"{where}.argv[0]: the program cannot be a placeholder")
        if check_argv0:
            check_executable(f"{where}.argv[0]", program)
        self.executable = program
        self.argv: tuple[str | Placeholder, ...] = tuple(elements)

        args = table.get("args", {})
        if not isinstance(args, dict):
            raise ConfigError(f"{where}.args: expected a table of arguments")
        params = {n: _param(f"{where}.args.{n}", n, t) for n, t in args.items()}
        used = list(dict.fromkeys(e.name for e in elements if isinstance(e, Placeholder)))
        for placeholder in used:
            if placeholder not in params:
                raise ConfigError(f"{where}.argv: placeholder {{{placeholder}}} is not "
                                  f"declared in args")
        for arg in params:
            if arg not in used:
                raise ConfigError(f"{where}.args.{arg}: not used by any {{{arg}}} in argv")
        order = used
        if "order" in table:
            order = _string_list(f"{where}.order", table["order"])
            if sorted(order) != sorted(used):
                raise ConfigError(f"{where}.order: must name every argument once: "
                                  f"{', '.join(sorted(used))}")
        self.params = tuple(params[n] for n in order)
        optional = None  # the first argument with a default, in order
        for param in self.params:
            if not param.required:
                optional = optional or param.name
            elif optional:
                raise ConfigError(f"{where}.args.{param.name}: a required argument after an "
                                  f"optional one ({optional}): set order, or a default")
        self.usage = " ".join([name, *(p.shown for p in self.params)])
        self._paths = frozenset(p.name for p in self.params if isinstance(p.type, PathParam))

        if "timeout" in table:
            self.timeout = _number(f"{where}.timeout", table["timeout"])
        if "max_output" in table:
            from cmdserver.commands.upload.engine import byte_size

            try:
                self.max_output = byte_size(table["max_output"])
            except ValueError as e:
                raise ConfigError(f"{where}.max_output: {e}") from None
        if "doors" in table:
            doors = _string_list(f"{where}.doors", table["doors"])
            wrong = sorted(set(doors) - DOORS)
            if wrong or not doors:
                raise ConfigError(f"{where}.doors: {', '.join(wrong) or 'empty'}: the doors "
                                  f"are {', '.join(sorted(DOORS))}")
            self.doors = frozenset(doors)
        ok_status = table.get("ok_status", [0])
        if not isinstance(ok_status, list) or not ok_status or not all(
                isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 255
                for s in ok_status):
            raise ConfigError(f"{where}.ok_status: expected a list of exit statuses (0..255)")
        self.ok_status = frozenset(ok_status)
        self.running: set[_ChildProtocol] = set()

    # -- running -------------------------------------------------------------

    # ctx is positional-only, so that an argument may be called ``ctx`` too.
    def run(self, ctx: Context, /, **values: Any) -> Deferred:  # type: ignore[override]
        for param in self.params:  # PB may pass an int: the dash rule holds for it too
            value = values.get(param.name)
            if not param.dash and str(value).startswith("-"):
                raise CommandError(f"{param.name}: a value may not start with '-'")
        protocol = _ChildProtocol(self, ctx.out)
        if not self._paths:
            self._spawn(ctx, protocol, values)
            return protocol.done
        paths = {n: values[n] for n in self._paths if n in values}

        def resolved(real: dict[str, str]) -> None:
            if not protocol.done.called:  # not cancelled while resolving
                self._spawn(ctx, protocol, {**values, **real})

        def failed(failure: Failure) -> None:
            if not protocol.done.called:
                protocol.done.errback(failure)

        ctx.core.in_thread(resolve_paths, ctx.policy, paths, ctx=ctx).addCallbacks(
            resolved, failed)
        return protocol.done

    def child_argv(self, values: Mapping[str, Any]) -> list[str]:
        """The child's argument list: one element per literal, one per placeholder."""
        return [e if isinstance(e, str) else str(values[e.name]) for e in self.argv]

    def _spawn(self, ctx: Context, protocol: _ChildProtocol, values: dict[str, Any]) -> None:
        argv = self.child_argv(values)
        try:
            child = spawn_in_session(ctx.reactor, protocol, self.executable, argv, CHILD_ENV,
                                     ctx.policy.roots[0])
        except OSError as e:
            protocol.done.errback(CommandError(f"{self.name} failed: {e.strerror or e}"))
            return
        child.closeStdin()
        # A client that does not read holds the child at its pipe, not in our memory.
        protocol.unregister = register_producer(ctx.out, ChildOutput(child))

    def text(self, result: Any) -> list[str]:
        status = result["exit_status"]
        return [] if status == 0 else [f"{self.name}: exit status {status}"]

    def audit_result(self, result: Any) -> dict[str, Any] | None:
        return {"exit_status": result["exit_status"], "lines": len(result["output"])}

    def stop_all(self) -> list[Deferred]:
        """Kill every running child's group; Deferreds that fire as each is reaped."""
        reaped = []
        for protocol in list(self.running):
            reaped.append(protocol.reaped)
            if protocol.done.called:  # ended already, but its output pipes are still open
                protocol.kill()
            else:
                protocol.done.cancel()  # kills the group
        return reaped


def resolve_paths(policy: Policy, paths: dict[str, str]) -> dict[str, str]:
    """The real path of each value inside the jail (in a thread: it touches the disk)."""
    real = {}
    for name, value in paths.items():
        try:
            real[name] = policy.jail.real_path(value)
        except OSError as e:
            raise os_error(e, value) from None
    return real


class SessionProcess(Process):
    """Twisted's ``Process`` whose child leads a new session (and process group).

    Twisted starts a child with ``posix_spawnp`` when it can, else it forks and
    execs; only the fork path runs Python code in the child, so this class
    always takes it and calls ``os.setsid()`` there, just before ``exec``.
    ``_trySpawnInsteadOfFork`` and ``_execChild`` are Twisted's internal hooks,
    not public API: tests/end_to_end/test_declared_e2e.py checks that the child
    leads its own session and group, so a Twisted that changes them fails there.
    """

    def _trySpawnInsteadOfFork(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def _execChild(self, path: Any, uid: Any, gid: Any, executable: Any, args: Any,
                   environment: Any) -> None:
        os.setsid()
        super()._execChild(path, uid, gid, executable, args, environment)


def spawn_in_session(reactor: Any, protocol: ProcessProtocol, executable: str, args: list[str],
                     env: dict[str, str], path: str) -> Any:
    """``reactor.spawnProcess(protocol, executable, args, env, path, usePTY=False)``, the
    child in a session and process group of its own (see the module's docstring)."""
    if isinstance(reactor, PosixReactorBase):
        return SessionProcess(reactor, executable, args, env, path, protocol)
    return reactor.spawnProcess(protocol, executable, args, env=env, path=path, usePTY=False)


class _ChildProtocol(ProcessProtocol):
    """One run: streams stdout lines, keeps some stderr, kills the group when it ends."""

    def __init__(self, command: DeclaredCommand, out: OutputSink) -> None:
        self.command = command
        self.out = out
        self.done: Deferred = Deferred(self._cancel)
        self.reaped: Deferred = Deferred()
        self.group: int | None = None  # the process group id, while it may have members
        self.lines: list[str] = []
        self._partial = b""
        self._stderr = b""
        self.unregister: Callable[[], None] | None = None  # the sink's back-pressure

    def connectionMade(self) -> None:
        self.command.running.add(self)
        if isinstance(self.transport, SessionProcess):
            self.group = self.transport.pid

    def _cancel(self, _: Deferred) -> None:
        self.kill()

    def kill(self) -> None:
        """SIGKILL the whole group, and the child itself while it has not exited.

        The child is signalled by its pid too: a child killed before it got to
        ``setsid()`` has no group yet (``killpg`` finds none), and a child without
        a group of its own (not a POSIX reactor) can only be reached that way.
        """
        self.stop_back_pressure()
        if self.group is not None:
            try:
                os.killpg(self.group, signal.SIGKILL)
            except ProcessLookupError:
                pass  # no group yet, or no one left in it
            except OSError as e:
                log.warn("{command}: cannot kill process group {group}: {error}",
                         command=self.command.name, group=self.group, error=e)
        if self.transport is not None and not self.reaped.called:
            try:
                self.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == 2:
            if len(self._stderr) < STDERR_LIMIT:
                self._stderr = (self._stderr + data)[:STDERR_LIMIT]
            return
        if self.done.called:  # cancelled: the group is being killed
            return
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            self._emit(raw)
        while len(self._partial) > MAX_LINE:
            self._emit(self._partial[:MAX_LINE])
            self._partial = self._partial[MAX_LINE:]

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace")
        self.lines.append(text)
        self.out.line(text)

    def processExited(self, reason: Failure) -> None:
        # The program is gone; what it left running in its group goes with it.
        if not self.reaped.called:
            self.reaped.callback(None)
        if self.group is not None:
            self.kill()
            self.group = None  # the pid may be reused once the group is empty

    def stop_back_pressure(self) -> None:
        """Leave the sink; read the pipes again, so that the EOF of a killed group
        is seen and the child reaped."""
        if self.unregister is not None:
            unregister, self.unregister = self.unregister, None
            unregister()
            if self.transport is not None:
                ChildOutput(self.transport).resumeProducing()

    def processEnded(self, reason: Failure) -> None:
        self.stop_back_pressure()
        self.command.running.discard(self)
        if not self.reaped.called:
            self.reaped.callback(None)
        if self.done.called:
            return
        if self._partial:
            self._emit(self._partial)
        stderr = self._stderr.decode("utf-8", "replace").splitlines()
        status = reason.value
        code = getattr(status, "exitCode", None)
        if reason.check(error.ProcessDone):
            code = 0
        if code is not None and code in self.command.ok_status:
            self.done.callback({"exit_status": code, "output": self.lines, "stderr": stderr})
            return
        name = self.command.name
        if code is not None:
            message = f"{name} exited with status {code}"
        else:
            number = getattr(status, "signal", None)
            message = f"{name} was killed by signal {number}"
        first = next((line.strip() for line in stderr if line.strip()), "")
        if first:
            message = f"{message}: {first[:200]}"
        self.done.errback(CommandError(message))


def declared_commands(table: Any, check_argv0: bool = True) -> list[DeclaredCommand]:
    """Every command of the config's ``commands`` table, checked; ConfigError if one
    cannot be served."""
    if not isinstance(table, dict):
        raise ConfigError("commands: expected a table of [commands.NAME] tables")
    return [DeclaredCommand(name, t, check_argv0) for name, t in table.items()]


class DeclaredCommandsService(Service):
    """Kills what the declared commands still run when the daemon stops.

    Doors cancel a connection's command as the connection closes, but closing
    is asynchronous: this makes sure no child outlives ``stopService``.
    """

    name = "declared-commands"

    def __init__(self, commands: list[DeclaredCommand], reactor: Any) -> None:
        self.commands = commands
        self.reactor = reactor

    def stopService(self) -> Deferred:
        super().stopService()
        reaped = [d for command in self.commands for d in command.stop_all()]
        if not reaped:
            return defer.succeed(None)
        stopped: Deferred = Deferred()

        def finish(_: Any = None) -> None:
            if not stopped.called:
                stopped.callback(None)

        # Not addTimeout: cancelling the list would cancel the children's own Deferreds.
        timer = self.reactor.callLater(SHUTDOWN_WAIT, finish)
        defer.DeferredList(reaped).addBoth(finish).addBoth(
            lambda _: timer.cancel() if timer.active() else None)
        return stopped

