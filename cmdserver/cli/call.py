"""``cmdserver call``: run one command through the PB door and print its value."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, task

from cmdserver.client import RemoteError, Session, connect, connect_endpoint


class CallUsageError(Exception):
    """The command's arguments are wrong (exit status 2)."""


def _none(args: list[str]) -> tuple:
    if args:
        raise CallUsageError("takes no arguments")
    return ()


def _optional(convert: Callable[[str], Any]) -> Callable[[list[str]], tuple]:
    def parse(args: list[str]) -> tuple:
        if len(args) > 1:
            raise CallUsageError("takes at most one argument")
        try:
            return tuple(convert(a) for a in args)
        except ValueError:
            raise CallUsageError(f"not a number: {args[0]}") from None
    return parse


def _comphash(args: list[str]) -> tuple:
    parser = argparse.ArgumentParser(prog="cmdserver call comphash", add_help=False,
                                     exit_on_error=False)
    parser.add_argument("--algo", default="sha256")
    parser.add_argument("path")
    try:
        parsed = parser.parse_args(args)
    except (argparse.ArgumentError, SystemExit):
        raise CallUsageError("usage: comphash [--algo NAME] PATH") from None
    return parsed.path, parsed.algo


def _portscan(args: list[str]) -> tuple:
    if not 1 <= len(args) <= 2:
        raise CallUsageError("usage: portscan HOST [PORTS]")
    return tuple(args)


# Command name -> how its words become the remote method's arguments.
COMMANDS: dict[str, Callable[[list[str]], tuple]] = {
    "ping": _none,
    "stats": _none,
    "whoami": _none,
    "help": _optional(str),
    "lastlog": _optional(int),
    "ls": _optional(str),
    "comphash": _comphash,
    "portscan": _portscan,
}


def add_call_parser(subparsers: Any) -> None:
    """Register ``cmdserver call`` on the console script's subparsers."""
    p = subparsers.add_parser(
        "call", help="run one command through the PB door and print the result",
        description="Log in to cmdserver's Perspective Broker door, run one command and "
        "print its result (JSON with --json). Commands: " + ", ".join(sorted(COMMANDS)))
    p.add_argument("--host", default="127.0.0.1", help="server address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=9876, help="PB door port (default: 9876)")
    p.add_argument("--connect", metavar="ENDPOINT",
                   help="client endpoint string instead of --host/--port, "
                   "e.g. tls:host=example.org:port=9876")
    p.add_argument("--user", default="admin", help="user to log in as (default: admin)")
    p.add_argument("--password-env", metavar="VAR", default="CMDSERVER_PASSWORD",
                   help="environment variable with the password (default: "
                   "CMDSERVER_PASSWORD; else a prompt on a terminal)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND",
                   help="one of: " + ", ".join(sorted(COMMANDS)))
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the command's arguments, as on the line door")
    p.set_defaults(func=run_call)


def render(result: Any) -> list[str]:
    """Plain text for a result: lists one item a line, dicts ``key: value``."""
    if isinstance(result, list):
        return [str(x) for x in result]
    if isinstance(result, dict):
        return [f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}"
                for k, v in result.items()]
    return [str(result)]


def run_call(args: argparse.Namespace) -> int:
    try:
        call_args = COMMANDS[args.command](list(args.args))
    except CallUsageError as e:
        print(f"cmdserver call {args.command}: {e}", file=sys.stderr)
        return 2
    password = os.environ.get(args.password_env)
    if password is None:
        if not sys.stdin.isatty():
            print(f"Error: no password: set {args.password_env} (no terminal to ask on)",
                  file=sys.stderr)
            return 2
        password = getpass.getpass(f"Password for {args.user}: ")
    outcome: list[int] = []

    @defer.inlineCallbacks
    def main(reactor: Any) -> Any:
        try:
            if args.connect:
                session = yield connect_endpoint(args.connect, args.user, password, reactor)
            else:
                session = yield connect(args.host, args.port, args.user, password, reactor)
        except RemoteError as e:
            return fail(f"Error: {e}")
        except Exception as e:
            where = args.connect or f"{args.host}:{args.port}"
            return fail(f"Error: cannot connect to {where}: {e}")
        try:
            result = yield call(session, args.command, call_args)
        except RemoteError as e:
            return fail(f"Error: {e}")
        finally:
            yield session.close()
        if args.json:
            print(json.dumps(result))
        else:
            print("\n".join(render(result)))
        outcome.append(0)

    def fail(message: str) -> None:
        print(message, file=sys.stderr)
        outcome.append(1)

    try:
        task.react(main)
    except SystemExit:
        pass
    return outcome[0] if outcome else 1


def call(session: Session, command: str, args: Sequence[Any]) -> defer.Deferred:
    """Run ``command`` through the session's method of the same name."""
    methods: dict[str, Callable[..., defer.Deferred]] = {
        "ping": session.ping, "stats": session.stats, "whoami": session.whoami,
        "help": session.help,
        "lastlog": session.lastlog, "ls": session.ls, "comphash": session.comphash,
        "portscan": session.portscan,
    }
    return methods[command](*args)
