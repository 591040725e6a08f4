#!/usr/bin/env python3
"""bench/line_costs: what one ``ping`` costs in the line door, in-process, no network.

Feeds chunks of pipelined lines straight into the protocols' ``dataReceived``
(a transport that drops the output) and reports microseconds per line for: a
bare Twisted ``LineReceiver`` echo; cmdserver's door and core with the audit
events built but dropped; with the JSON audit file (written in batches of
``FLUSH_LINES`` at this rate, as in the daemon); and with ``--audit-log none``, where
no record is made at all (``AuditPublisher.record`` returns at once).  The
differences are what each part adds per command; bench/line.py measures the
whole with sockets.  ``--steps`` also times each step of a ``ping`` on its own
(the steps overlap a little: a step's own call is counted in the one above it).

    .venv/bin/python bench/line_costs.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
import timeit
from collections.abc import Callable

from _common import machine  # noqa: E402  (bench/ is the script's directory)
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineReceiver

from cmdserver.audit import AuditFile, audit_publisher
from cmdserver.commands import default_registry
from cmdserver.commands.base import Context
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore, TextReply, split_line
from cmdserver.doors.line.protocol import LineFactory, LineProtocol, LineSettings
from cmdserver.policy import Policy


class DropTransport(StringTransport):
    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, seq: list[bytes]) -> None:
        pass


class Echo(LineReceiver):
    delimiter = b"\n"

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(line)


def per_line(proto, chunk: bytes, lines: int, rounds: int, after: Callable[[], None]) -> float:
    proto.makeConnection(DropTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)))
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(rounds):
            proto.dataReceived(chunk)
            after()
        best = min(best, time.perf_counter() - started)
    return best / (rounds * lines) * 1e6


def steps(core: CommandCore, audit: AuditFile, proto: LineProtocol) -> None:
    """Time the steps of one ``ping`` in isolation, in microseconds."""
    ctx = Context(core, user="anonymous", peer="127.0.0.1:40000", door="line",
                  session_id=core.open_session("line", "127.0.0.1:40000").id)
    ping = core.registry.get("ping")
    raw = b"ping"
    rows = [
        ("door: decode and check the line", lambda: raw.decode("utf-8").isprintable()),
        ("core: split the line into words", lambda: split_line("ping")),
        ("core: look the command up", lambda: core.registry.get("ping")),
        ("core: parse the arguments", lambda: ping.parse([])),
        ("command: ping.run (the value itself)", lambda: ping.run(ctx)),
        ("core.invoke: count, run, time, audit record", lambda: core.invoke(ctx, ping, {})),
        ("audit: AuditFile.record (batches written)",
         lambda: audit.record(ctx.session_id, "command", "anonymous", "127.0.0.1:40000",
                              "line", "ping", {}, "ok", 1e-06, None)),
        ("audit: the JSON line of a record (at flush)",
         lambda: audit._parts(1e9, ctx.session_id, "command", "anonymous", "127.0.0.1:40000",
                              "line", "ping", {}, "ok", 1e-06, None, None)),
        ("core: render the reply (text, TextReply)", lambda: TextReply(ping.text("pong"), True)),
        ("door: encode and queue the reply line", lambda: proto.line("pong")),
        ("core.run_text, all of the core (audit file)", lambda: core.run_text(ctx, "ping")),
    ]
    print("one ping, step by step (best of 5, microseconds):")
    for name, f in rows:
        n = 200_000
        audit_publisher.addObserver(audit)  # as deployed: the audit file alone
        per = min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6
        audit_publisher.removeObserver(audit)
        print(f"  {name:<46} {per:5.2f}")
        if name.startswith("door: encode"):
            proto._flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--chunk", type=int, default=8, help="lines per dataReceived")
    p.add_argument("--rounds", type=int, default=20000)
    p.add_argument("--steps", action="store_true", help="also time each step of a ping")
    args = p.parse_args()
    print(machine(), flush=True)
    chunk = b"ping\n" * args.chunk
    clock = Clock()
    core = CommandCore(default_registry(LogSource("")), Policy(["/"]), clock)
    door = LineFactory(core, LineSettings(greeting=""))  # idle timer on, as deployed

    def nothing() -> None:
        pass

    bare = per_line(Echo(), chunk, args.chunk, args.rounds, nothing)

    def dropped(event: dict) -> None:
        pass

    audit_publisher.addObserver(dropped)  # events are built, then dropped
    no_audit = per_line(door.buildProtocol(None), chunk, args.chunk, args.rounds, nothing)
    audit_publisher.removeObserver(dropped)
    with tempfile.TemporaryDirectory() as d:
        audit = AuditFile(f"{d}/audit.log", clock)
        audit.open()
        audit_publisher.addObserver(audit)
        with_audit = per_line(door.buildProtocol(None), chunk, args.chunk, args.rounds,
                              nothing)
        audit_publisher.removeObserver(audit)
        audit.close()
    # --audit-log none: no audit observer, so no record at all.
    unaudited = per_line(door.buildProtocol(None), chunk, args.chunk, args.rounds, nothing)
    print(f"{args.chunk} lines per chunk, microseconds per line (best of 3)")
    print(f"bare LineReceiver echo                 {bare:6.2f}")
    print(f"cmdserver, audit events dropped        {no_audit:6.2f}   door+core add "
          f"{no_audit - bare:.2f}")
    print(f"cmdserver, JSON audit file (default)   {with_audit:6.2f}   the audit file adds "
          f"{with_audit - no_audit:.2f}")
    print(f"cmdserver, --audit-log none (no record){unaudited:6.2f}   saves "
          f"{with_audit - unaudited:.2f} against the audit file")
    if args.steps:
        with tempfile.TemporaryDirectory() as d:
            audit = AuditFile(f"{d}/audit.log", clock)
            audit.open()
            proto = door.buildProtocol(None)
            proto.makeConnection(DropTransport(
                peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)))
            proto._batch = []  # replies gathered as during a read
            steps(core, audit, proto)
            audit.close()
    print(f"ratio bare echo / cmdserver with the audit file, per line: {bare / with_audit:.2f}")


if __name__ == "__main__":
    main()
