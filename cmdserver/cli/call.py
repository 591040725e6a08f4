"""``cmdserver call``: run one command through the PB door and print its value."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twisted.internet import defer, task

from cmdserver.cli.login import NoPassword, add_password_argument, read_password
from cmdserver.client import CommandTimedOut, RemoteError, connect, connect_endpoint
from cmdserver.text import escaped


def add_call_parser(subparsers: Any) -> None:
    """Register ``cmdserver call`` on the console script's subparsers."""
    p = subparsers.add_parser(
        "call", help="run one command through the PB door and print the result",
        description="Log in to cmdserver's Perspective Broker door, run one command and "
        "print what the line door prints for it (its value as JSON with --json). The "
        "server parses the words as the line door does, so every command it serves "
        "works, declared ones included.")
    p.add_argument("--host", default="127.0.0.1", help="server address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=9876, help="PB door port (default: 9876)")
    p.add_argument("--connect", metavar="ENDPOINT",
                   help="client endpoint string instead of --host/--port, "
                   "e.g. tls:host=example.org:port=9876")
    p.add_argument("--user", default="admin", help="user to log in as (default: admin)")
    add_password_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("command", metavar="COMMAND",
                   help="a command the server serves ('help' lists them)")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the command's arguments, as on the line door")
    p.set_defaults(func=run_call)


def run_call(args: argparse.Namespace) -> int:
    try:
        password = read_password(args, args.user)
    except NoPassword as e:
        print(e, file=sys.stderr)
        return 2
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
        words = list(args.args)
        if words[:1] == ["--"]:
            words = words[1:]
        try:
            result = yield session.run(args.command, words,
                                       on_line=None if args.json else print_line)
        except CommandTimedOut as e:
            return fail(f"Error: {e}", 124)  # as ssh HOST CMD and timeout(1) exit
        except RemoteError as e:
            return fail(f"Error: {e}")
        finally:
            yield session.close()
        if args.json:
            print(json.dumps(result["value"], default=str))
        else:
            for line in result["text"]:
                print_line(line)
        outcome.append(0)

    def fail(message: str, status: int = 1) -> None:
        print(safe(message), file=sys.stderr)
        outcome.append(status)

    try:
        task.react(main)
    except SystemExit:
        pass
    return outcome[0] if outcome else 1


def safe(text: str) -> str:
    """A line from the server as a terminal may show it: control characters escaped."""
    return escaped(text)


def print_line(text: str) -> None:
    print(safe(text), flush=True)
