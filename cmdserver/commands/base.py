"""The command contract: a command is declared once and served by every door.

A command parses its argument vector into keyword arguments, runs as a
Deferred-returning handler that may stream text lines to ``ctx.out``, and
renders its final result as text for the text doors.  PB calls the handler
with keyword arguments directly and gets the result value back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from cmdserver.commands.params import Param
from cmdserver.errors import MissingArgument, UsageError

if TYPE_CHECKING:
    from cmdserver.auth.gate import LoginGate
    from cmdserver.policy import Policy
    from cmdserver.sessions import Session as CoreSession
    from cmdserver.stats import Stats


class CoreServices(Protocol):
    """What a command may use of the core (``ctx.core``): commands see the core
    through this, never the core's class, so no command imports it."""

    registry: Registry
    policy: Policy
    stats: Stats
    reactor: Any
    gate: LoginGate

    def in_thread(self, f: Callable[..., Any], *args: Any, ctx: Context | None = None,
                  **kwargs: Any) -> Deferred: ...

    def in_thread_cancellable(self, f: Callable[..., Any], *args: Any,
                              ctx: Context | None = None) -> Deferred: ...

    def session_for(self, ctx: Context) -> CoreSession: ...

    def login(self, session: CoreSession, user: Any, method: str, outcome: str,
              reason: str | None = None, token: str | None = None) -> None: ...


class OutputSink(Protocol):
    """Where a command streams its text output, one line at a time.

    A sink that knows when its client stops reading (the line door, an SSH
    channel, a PB observer) also has ``registerProducer(producer, streaming)``
    and ``unregisterProducer()``, as a Twisted consumer does: it pauses the
    producer while output cannot be delivered and resumes it after.  Commands
    register through :func:`register_producer`, which works on any sink.
    """

    def line(self, text: str) -> None: ...


class ConsumerSink(OutputSink, Protocol):
    """A sink with back-pressure (see :class:`OutputSink`)."""

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...


def register_producer(out: OutputSink, producer: IPushProducer) -> Callable[[], None]:
    """Let ``out`` pause ``producer`` (a child's stdout, say) while the client is
    not reading; returns the function that unregisters it.  A sink that cannot
    tell (``NullSink``, ``ListSink``) ignores it."""
    if not hasattr(out, "registerProducer"):
        return _nothing
    sink = cast(ConsumerSink, out)
    sink.registerProducer(producer, True)
    return sink.unregisterProducer


def _nothing() -> None:
    pass


@implementer(IPushProducer)
class ChildOutput:
    """A child process's output pipes as a producer for :func:`register_producer`:
    while paused the daemon stops reading them, so the child blocks on its full
    pipe instead of the daemon buffering what the client does not read."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport  # the IProcessTransport of spawnProcess

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass  # the client went away: the command is cancelled, which kills the child


class Session(Protocol):
    """What a command may ask of the connection that runs it."""

    def end_session(self) -> None:
        """Close the connection cleanly once the current output is sent."""


class NullSink:
    """A sink that drops output: for callers that only want the result."""

    def line(self, text: str) -> None:
        pass


class ListSink:
    """A sink that keeps every line (for tests and collecting callers)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)


@dataclass(slots=True)
class Context:
    """Everything a handler may use: who runs it, from where, and the core's services."""

    core: CoreServices
    user: str
    peer: str
    door: str
    out: OutputSink = field(default_factory=NullSink)
    session: Session | None = None
    policy: Policy = None  # type: ignore[assignment]  # the core's unless the user has own roots
    login: str = "off"  # the door's login mode: "required", "optional" or "off"
    login_failures: int = 0  # failed logins on this connection
    session_id: str = ""  # the connection's session in the core ("": none, a core used directly)

    def __post_init__(self) -> None:
        if self.policy is None:
            self.policy = self.core.policy

    @property
    def reactor(self) -> Any:
        return self.core.reactor


class Command:
    """Base class for commands: declare the class attributes, write ``run``.

    ``params`` is the one declaration of the arguments: the text doors parse
    words with it (:meth:`parse`), doors that pass named values check them with
    it (:meth:`bind`), and ``help`` and API descriptions show it.  ``doors``
    names the doors that serve the command (None: every door).
    """

    name: str = ""
    summary: str = ""
    usage: str = ""  # generated from params unless a subclass says more
    params: tuple[Param, ...] = ()
    doors: frozenset[str] | None = None
    open_before_login: bool = False  # may run before login on a door that requires it
    reads_input: bool = False  # takes raw bytes from the client (ctx.session.receive_raw)
    streams: bool = False  # writes output lines to ctx.out as it runs (capped by the core)
    timeout: float | None = None  # its deadline, if not the daemon's default (0: none)
    max_output: int | None = None  # its output cap in bytes, if not the daemon's default

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "usage" not in cls.__dict__ and cls.name:
            cls.usage = " ".join([cls.name, *(p.shown for p in cls.params)])

    def serves(self, door: str) -> bool:
        return self.doors is None or door in self.doors

    def parse(self, argv: Sequence[str]) -> dict[str, Any]:
        """Turn a text door's words into keyword arguments for ``run``.

        Positional parameters take the words in order; flag parameters take
        ``--name VALUE`` or ``--name=VALUE`` anywhere before ``--``.
        """
        params = self.params
        if not params:
            if argv:
                raise self.usage_error()
            return {}
        flags = {p.name: p for p in params if p.flag}
        values: dict[str, Any] = {}
        words: list[str] = []
        rest = iter(argv)
        for word in rest:
            if flags and word.startswith("--"):
                if word == "--":
                    words.extend(rest)
                    break
                name, equals, value = word[2:].partition("=")
                param = flags.get(name)
                if param is None:
                    raise self.usage_error(f"unknown option {word}")
                if not equals and not param.type.takes_value:
                    values[name] = True  # a switch: --name alone
                    continue
                if not equals:
                    following = next(rest, None)
                    if following is None:
                        raise self.usage_error(f"{word} needs a value")
                    value = following
                values[name] = self._from_text(param, value)
            else:
                words.append(word)
        positional = [p for p in params if not p.flag]
        if len(words) > len(positional):
            raise self.usage_error()
        for param, word in zip(positional, words, strict=False):
            values[param.name] = self._from_text(param, word)
        return self._complete(values)

    def _from_text(self, param: Param, word: str) -> Any:
        try:
            return param.from_text(word)
        except MissingArgument:
            raise
        except UsageError as e:  # a word of the wrong form: say how the command is used
            raise self.usage_error(e.message) from None

    def bind(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Check named values (PB, JSON) against the parameters, as :meth:`parse`
        checks words; None for an optional parameter means its default."""
        known = {p.name: p for p in self.params}
        for key in kwargs:
            if key not in known:
                raise self.usage_error(f"unknown argument {str(key)[:64]}")
        values = {}
        for name, value in kwargs.items():
            param = known[name]
            if value is None and not param.required:
                continue
            values[name] = param.from_value(value)
        return self._complete(values)

    def _complete(self, values: dict[str, Any]) -> dict[str, Any]:
        """Fill in defaults; refuse a missing required value."""
        for param in self.params:
            if param.name not in values:
                if param.required:
                    if param.missing:
                        raise MissingArgument(param.missing)
                    raise self.usage_error()
                if param.default is not None:
                    values[param.name] = param.default
        return values

    def run(self, ctx: Context, *args: Any, **kwargs: Any) -> Deferred | Any:
        """Run the command: a Deferred that fires with the result, or the result
        itself when it is there at once (no Deferred for a cheap command)."""
        raise NotImplementedError

    def text(self, result: Any) -> list[str]:
        """The lines a text door prints after the streamed output."""
        return [] if result is None else [str(result)]

    def audit_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments as the audit log records them (override to hide secrets)."""
        return kwargs

    def audit_argv(self, argv: Sequence[str]) -> dict[str, Any]:
        """The words of a refused command line as the audit log records them."""
        return {"argv": list(argv)}

    def audit_result(self, result: Any) -> dict[str, Any] | None:
        """What the audit log records of a successful result (None: nothing)."""
        return None

    def describe(self) -> dict[str, Any]:
        """The command as data: name, summary, usage and parameters."""
        return {"name": self.name, "summary": self.summary, "usage": self.usage,
                "params": [p.describe() for p in self.params]}

    def usage_error(self, detail: str | None = None) -> UsageError:
        prefix = f"{detail}; " if detail else ""
        return UsageError(f"{prefix}usage: {self.usage}")


class Registry:
    """The explicit table of commands; user input only ever indexes it."""

    def __init__(self, commands: Sequence[Command] = ()) -> None:
        self._commands: dict[str, Command] = {}
        # get(name): the command or None; the table's own lookup, no Python call
        # on the path of every command line.
        self.get: Callable[[str], Command | None] = self._commands.get
        for command in commands:
            self.add(command)

    def add(self, command: Command, *aliases: str) -> None:
        for name in (command.name, *aliases):
            if name in self._commands:
                raise ValueError(f"command {name!r} declared twice")
            self._commands[name] = command

    def commands(self, door: str | None = None) -> list[Command]:
        """Each command once, sorted by name (aliases are left out); with ``door``,
        only those that door serves."""
        unique = {c.name: c for c in self._commands.values()
                  if door is None or c.serves(door)}
        return [unique[n] for n in sorted(unique)]

    def __contains__(self, name: str) -> bool:
        return name in self._commands
