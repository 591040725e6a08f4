"""The command contract: a command is declared once and served by every door.

A command parses its argument vector into keyword arguments, runs as a
Deferred-returning handler that may stream text lines to ``ctx.out``, and
renders its final result as text for the text doors.  PB calls the handler
with keyword arguments directly and gets the result value back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred

from cmdserver.errors import UsageError

if TYPE_CHECKING:
    from cmdserver.core import CommandCore
    from cmdserver.policy import Policy


class OutputSink(Protocol):
    """Where a command streams its text output, one line at a time."""

    def line(self, text: str) -> None: ...


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


@dataclass
class Context:
    """Everything a handler may use: who runs it, from where, and the core's services."""

    core: CommandCore
    user: str
    peer: str
    door: str
    out: OutputSink = field(default_factory=NullSink)
    session: Session | None = None
    policy: Policy = None  # type: ignore[assignment]  # the core's unless the user has own roots
    login: str = "off"  # the door's login mode: "required", "optional" or "off"
    login_failures: int = 0  # failed logins on this connection

    def __post_init__(self) -> None:
        if self.policy is None:
            self.policy = self.core.policy

    @property
    def reactor(self) -> Any:
        return self.core.reactor


class Command:
    """Base class for commands.  Subclasses set the class attributes and ``run``."""

    name: str = ""
    summary: str = ""
    usage: str = ""
    open_before_login: bool = False  # may run before login on a door that requires it
    reads_input: bool = False  # takes raw bytes from the client (ctx.session.receive_raw)

    def parse(self, argv: Sequence[str]) -> dict[str, Any]:
        """Turn the text door's argument vector into keyword arguments for ``run``."""
        if argv:
            raise self.usage_error()
        return {}

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

    def commands(self) -> list[Command]:
        """Each command once, sorted by name (aliases are left out)."""
        unique = {c.name: c for c in self._commands.values()}
        return [unique[n] for n in sorted(unique)]

    def __contains__(self, name: str) -> bool:
        return name in self._commands
