"""The small commands: help, ping, stats, exit."""

from __future__ import annotations

import json as _json
from typing import Any

from twisted.internet import defer

from cmdserver.commands.base import Command, Context
from cmdserver.commands.params import SWITCH, Param
from cmdserver.errors import CommandError

TEXT_DOORS = frozenset({"line", "ssh"})  # doors where a person types commands


class Help(Command):
    name = "help"
    summary = "List the commands, or show how to use one."
    params = (Param("command", default=None, help="the command to describe"),)
    open_before_login = True

    def run(self, ctx: Context, command: str | None = None) -> dict[str, Any]:
        """``{name: summary}`` of every command this door serves, or one command's
        description (:meth:`Command.describe`)."""
        registry = ctx.core.registry
        if command is None:
            return {c.name: c.summary for c in registry.commands(ctx.door)}
        found = registry.get(command)
        if found is None or not found.serves(ctx.door):
            raise CommandError(f"no such command: {command}")
        return found.describe()

    def text(self, result: Any) -> list[str]:
        if "usage" in result and isinstance(result.get("params"), list):
            lines = [f"Usage: {result['usage']}", f"  {result['summary']}"]
            for param in result["params"]:
                if param["help"] or param.get("values"):
                    detail = param["help"]
                    if param.get("values"):
                        detail = f"{detail} ({param['values']})" if detail else param["values"]
                    lines.append(f"    {param['name']}: {detail}")
            return lines
        width = max(map(len, result))
        lines = ["Commands:"]
        lines += [f"  {name:<{width}}  {summary}" for name, summary in result.items()]
        lines.append("Type 'help COMMAND' for its usage.")
        return lines


class Ping(Command):
    name = "ping"
    summary = "Answer pong: a cheap liveness probe."
    open_before_login = True

    def run(self, ctx: Context) -> str:
        return "pong"


class StatsCommand(Command):
    name = "stats"
    summary = "Show uptime, connections, command, file operation and login counters."
    params = (Param("json", SWITCH, default=False, flag=True,
                    help="the counters as one line of JSON"),)

    def run(self, ctx: Context, json: bool = False) -> defer.Deferred:
        """The counters (:meth:`Stats.snapshot`); with ``json``, that dict as one line
        of JSON text, which the text doors print as is."""
        snapshot = ctx.core.stats.snapshot(ctx.reactor.seconds())
        return defer.succeed(_json.dumps(snapshot, sort_keys=True) if json else snapshot)

    def text(self, result: Any) -> list[str]:
        if isinstance(result, str):  # stats --json
            return [result]
        doors = ", ".join(f"{k} {v}" for k, v in result["connections_by_door"].items())
        commands = ", ".join(f"{k} {v}" for k, v in result["commands"].items()) or "none"
        files = ", ".join(f"{k} {v}" for k, v in result["file_operations"].items()) or "none"
        return [
            f"uptime: {format_duration(result['uptime'])}",
            f"connections: {result['connections']} open"
            + (f" ({doors})" if doors else "")
            + f", {result['connections_total']} since start, {result['refused']} refused"
            + (f" ({result['refused_penalised']} for login penalties)"
               if result["refused_penalised"] else ""),
            f"commands in flight: {result['in_flight']}",
            f"commands run: {commands}",
            f"command errors: {result['errors']}",
            f"commands not found: {result['not_found']}",
            f"file operations: {files}",
            f"logins: {result['logins']} ok, {result['login_failures']} failed, "
            f"{result['logins_refused']} refused; {result['penalties']} penalties",
        ]


class Exit(Command):
    name = "exit"
    summary = "Close this connection."
    open_before_login = True
    doors = TEXT_DOORS  # a program closes its connection itself

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
