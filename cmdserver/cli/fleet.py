"""``cmdserver fleet``: run one command on many daemons at once and tabulate the answers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from twisted.internet import task

from cmdserver.cli.login import NoPassword, add_password_argument, read_password
from cmdserver.fanout.inventory import Inventory, InventoryError, from_list, load
from cmdserver.fanout.run import OK, UNREACHABLE, HostResult, exit_status, run_on
from cmdserver.text import escaped


def add_fleet_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "fleet", help="run one command on many daemons at once",
        description="Log in to each host's Perspective Broker door, run one command (the "
        "words as on the line door) and print a table of the answers (host, status, "
        "summary), or one JSON object per host with --json. Exit status: 0 when every "
        "host succeeded, 1 when the command failed somewhere, 2 when a host was "
        "unreachable.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-i", "--inventory", metavar="FILE",
                       help="an Ansible inventory, INI or YAML (ansible_host, "
                       "cmdserver_pb_port, cmdserver_user per host or group)")
    where.add_argument("--hosts", metavar="HOST[:PORT],...", action="append",
                       help="hosts to reach (repeatable); the PB port defaults to 9876")
    p.add_argument("-l", "--limit", metavar="PATTERN", default="all",
                   help="Ansible host pattern: groups, names, globs, a:b, &a, !a "
                   "(default: all)")
    p.add_argument("-f", "--forks", type=int, default=50, metavar="N",
                   help="hosts worked on at once (default: 50)")
    p.add_argument("-t", "--timeout", type=float, default=30.0, metavar="S",
                   help="seconds per host for connect, login and command (default: 30)")
    p.add_argument("--user", default="admin", help="user to log in as, unless the "
                   "inventory says cmdserver_user (default: admin)")
    add_password_argument(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object per host, as each answers")
    p.add_argument("--list-hosts", action="store_true",
                   help="print the hosts the pattern selects, and do nothing")
    p.add_argument("command", metavar="COMMAND", nargs="?",
                   help="a command the daemons serve")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="the command's words, as on the line door")
    p.set_defaults(func=run_fleet)


def run_fleet(args: argparse.Namespace) -> int:
    try:
        inventory: Inventory = load(args.inventory) if args.inventory else from_list(args.hosts)
        hosts = inventory.select(args.limit)
    except InventoryError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    if args.list_hosts:
        for host in hosts:
            print(f"{host.name}\t{host.address}:{host.port}")
        return 0
    if not args.command:
        print("Error: no command given", file=sys.stderr)
        return 2
    if args.forks < 1 or not args.timeout > 0:
        print("Error: --forks and --timeout must be positive", file=sys.stderr)
        return 2
    try:
        password = read_password(args, args.user)
    except NoPassword as e:
        print(e, file=sys.stderr)
        return 2
    words = list(args.args)
    if words[:1] == ["--"]:
        words = words[1:]
    progress = Progress(len(hosts), sys.stderr) if sys.stderr.isatty() and not args.json \
        else None
    outcome: list[int] = []

    def answered(result: HostResult) -> None:
        if args.json:
            print(json.dumps(result.as_json(), default=str), flush=True)
        if progress is not None:
            progress.add(result)

    def main(reactor: Any) -> Any:
        d = run_on(hosts, args.command, words, args.user, password, forks=args.forks,
                   timeout=args.timeout, reactor=reactor, on_result=answered)

        def done(results: list[HostResult]) -> None:
            if progress is not None:
                progress.finish()
            if not args.json:
                print_table(results, sys.stdout)
            outcome.append(exit_status(results))

        return d.addCallback(done)

    try:
        task.react(main)
    except SystemExit:
        pass
    return outcome[0] if outcome else 1


def print_table(results: list[HostResult], out: TextIO) -> None:
    """HOST, STATUS, SUMMARY columns, one line per host, in inventory order."""
    rows = [(escaped(r.host), r.status, escaped(r.summary)) for r in results]
    width = max([len("HOST"), *(len(r[0]) for r in rows)])
    out.write(f"{'HOST':<{width}}  {'STATUS':<11}  SUMMARY\n")
    for host, status, summary in rows:
        out.write(f"{host:<{width}}  {status:<11}  {summary}\n")
    counts = {s: sum(r.status == s for r in results) for s in (OK, "failed", UNREACHABLE)}
    out.write(f"{len(results)} hosts: {counts[OK]} ok, {counts['failed']} failed, "
              f"{counts[UNREACHABLE]} unreachable\n")


class Progress:
    """A one-line progress bar on a terminal (stderr), redrawn as hosts answer."""

    def __init__(self, total: int, out: TextIO, width: int = 30) -> None:
        self.total = total
        self.out = out
        self.width = width
        self.counts = {OK: 0, "failed": 0, UNREACHABLE: 0}

    def add(self, result: HostResult) -> None:
        self.counts[result.status] = self.counts.get(result.status, 0) + 1
        self.out.write("\r" + self.render())
        self.out.flush()

    def render(self) -> str:
        done = sum(self.counts.values())
        filled = self.width * done // max(1, self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        return (f"[{bar}] {done}/{self.total}  ok {self.counts[OK]}  "
                f"failed {self.counts['failed']}  unreachable {self.counts[UNREACHABLE]}")

    def finish(self) -> None:
        self.out.write("\n")
        self.out.flush()
