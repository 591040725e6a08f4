"""The small commands: help, ping, stats, exit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from cmdserver.commands.base import Command, Context
from cmdserver.errors import CommandError


@dataclass(frozen=True)
class CommandHelp:
    """``help NAME``: one command's usage and summary."""

    name: str
    usage: str
    summary: str


class Help(Command):
    name = "help"
    summary = "List the commands, or show how to use one."
    usage = "help [COMMAND]"
    open_before_login = True

    def parse(self, argv: Sequence[str]) -> dict[str, Any]:
        if len(argv) > 1:
            raise self.usage_error()
        return {"command": argv[0]} if argv else {}

    def run(self, ctx: Context, command: str | None = None) -> defer.Deferred:
        registry = ctx.core.registry
        if command is None:
            return defer.succeed({c.name: c.summary for c in registry.commands()})
        found = registry.get(command)
        if found is None:
            raise CommandError(f"no such command: {command}")
        return defer.succeed(CommandHelp(found.name, found.usage, found.summary))

    def text(self, result: Any) -> list[str]:
        if isinstance(result, CommandHelp):
            return [f"Usage: {result.usage}", f"  {result.summary}"]
        width = max(map(len, result))
        lines = ["Commands:"]
        lines += [f"  {name:<{width}}  {summary}" for name, summary in result.items()]
        lines.append("Type 'help COMMAND' for its usage.")
        return lines


class Ping(Command):
    name = "ping"
    summary = "Answer pong: a cheap liveness probe."
    usage = "ping"
    open_before_login = True

    def run(self, ctx: Context) -> str:
        return "pong"


class StatsCommand(Command):
    name = "stats"
    summary = "Show uptime, connections and command counters."
    usage = "stats"

    def run(self, ctx: Context) -> defer.Deferred:
        return defer.succeed(ctx.core.stats.snapshot(ctx.reactor.seconds()))

    def text(self, result: Any) -> list[str]:
        doors = ", ".join(f"{k} {v}" for k, v in result["connections_by_door"].items())
        commands = ", ".join(f"{k} {v}" for k, v in result["commands"].items()) or "none"
        return [
            f"uptime: {format_duration(result['uptime'])}",
            f"connections: {result['connections']} open"
            + (f" ({doors})" if doors else "")
            + f", {result['connections_total']} since start, {result['refused']} refused",
            f"commands in flight: {result['in_flight']}",
            f"commands run: {commands}",
            f"command errors: {result['errors']}",
        ]


class Exit(Command):
    name = "exit"
    summary = "Close this connection."
    usage = "exit"
    open_before_login = True

    def run(self, ctx: Context) -> defer.Deferred:
        if ctx.session is not None:
            ctx.session.end_session()
        return defer.succeed("bye !")


def format_duration(seconds: float) -> str:
    """``3d 04:05:06`` style uptime."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock
