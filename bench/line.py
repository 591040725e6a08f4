#!/usr/bin/env python3
"""bench/line: ``ping`` throughput and latency through the line door, against bare Twisted.

Side by side in one run, each server in its own process and the load generator
(bench/_loadgen.py) in another: a bare Twisted ``LineReceiver`` echo server;
the floor, a ``LineReceiver`` that does only what auditing a command needs
(bench/_floor_server.py: check, split, look up, count, time, run, write the
audit line), and the same without the audit line; cmdserver with its JSON
audit file (the default); and cmdserver with ``--audit-log none`` (no audit
record at all).  Every connection keeps ``--window``
lines in flight, sent ``--chunk`` at a time, with 1, 10, 100 and 1000
connections.  The servers run at once and the runs alternate between them,
``--repeat`` times per point, so a change in the machine's load hits all
alike; the median run counts, and the spread of the ratio over the runs is
printed beside it.
The last line is the ratio cmdserver/floor at 100 connections with the audit
log on: throughput (the median of the runs' ratios) and server CPU per line.

    .venv/bin/python bench/line.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

from _common import HERE, PYTHON, Daemon, cpu_seconds, greeting_lines, machine, raise_nofile

CONNECTIONS = (1, 10, 100, 1000)


class PeerServer:
    """A reference server (a script in bench/ that prints ``listening PORT``), in its
    own process."""

    def __init__(self, script: str, *args: str) -> None:
        self.argv = [PYTHON, str(HERE / script), *args]

    def __enter__(self) -> PeerServer:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=raise_nofile)
        self.port = int(self.proc.stdout.readline().split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def load(port: int, connections: int, args: argparse.Namespace, greeting: int,
         pid: int) -> dict:
    """One run of the load generator against one server (process ``pid``); adds the
    server's CPU time per line, in microseconds, as ``cpu_us``."""
    per_connection = max(args.chunk, args.total // connections)
    before = cpu_seconds(pid)
    out = subprocess.run(
        [PYTHON, str(HERE / "_loadgen.py"), "--port", str(port), "--connections",
         str(connections), "--lines", str(per_connection), "--window", str(args.window),
         "--chunk", str(args.chunk), "--greeting", str(greeting)],
        capture_output=True, text=True, check=True, timeout=300)
    result = json.loads(out.stdout)
    result["cpu_us"] = (cpu_seconds(pid) - before) / result["lines"] * 1e6
    return result


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower middle one for an even count)."""
    ranked = sorted(runs, key=lambda r: r["lines_per_s"])
    return ranked[(len(ranked) - 1) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--total", type=int, default=200_000, help="ping lines per run")
    p.add_argument("--window", type=int, default=32, help="lines in flight per connection")
    p.add_argument("--chunk", type=int, default=8, help="lines per client write")
    p.add_argument("--repeat", type=int, default=5, help="runs per point; the median counts")
    p.add_argument("--connections", type=int, nargs="*", default=list(CONNECTIONS))
    p.add_argument("--compare", metavar="DIR",
                   help="also run the cmdserver package found in DIR (an older version, "
                        "e.g. from git archive), audit on")
    args = p.parse_args()
    print(machine(), flush=True)
    raise_nofile()
    limit = str(max(args.connections) + 10)
    runs: dict[str, dict[int, list[dict]]] = {}
    variants = [("cmdserver", True, None), ("audit-log none", False, None)]
    if args.compare:
        variants.append(("compared", True, args.compare))
    daemons = {name: Daemon(args=["--max-clients", limit, "--max-per-ip", limit], audit=audit,
                            source=source)
               for name, audit, source in variants}
    with (PeerServer("_echo_server.py") as echo, tempfile.TemporaryDirectory() as tmp,
          PeerServer("_floor_server.py", f"{tmp}/audit.log") as floor,
          PeerServer("_floor_server.py", "none") as unaudited):
        servers = {"bare": (echo.port, 0, echo.proc.pid),
                   "floor": (floor.port, 0, floor.proc.pid),
                   "floor, no audit line": (unaudited.port, 0, unaudited.proc.pid)}
        try:
            for name, daemon in daemons.items():
                daemon.start()
                # None by default; a --compare tree from before --greeting greets.
                servers[name] = (daemon.port, greeting_lines(daemon.port), daemon.pid)
            for c in args.connections:
                for _ in range(args.repeat):
                    for name, (port, greeting, pid) in servers.items():
                        runs.setdefault(name, {}).setdefault(c, []).append(
                            load(port, c, args, greeting, pid))
        finally:
            for daemon in daemons.values():
                daemon.stop()
    results = {name: {c: median_run(r) for c, r in by_conns.items()}
               for name, by_conns in runs.items()}
    print(f"ping, window {args.window} lines, {args.chunk} per write, "
          f"{args.total} lines per run, median of {args.repeat} alternating runs")
    print(f"{'server':<22}{'conns':>6}{'lines/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>7}"
          f"  ratio per run (min-max)")
    for name, by_conns in results.items():
        for c, r in by_conns.items():
            ratio = r["lines_per_s"] / results["bare"][c]["lines_per_s"]
            per_run = [mine["lines_per_s"] / bare["lines_per_s"]
                       for mine, bare in zip(runs[name][c], runs["bare"][c], strict=True)]
            print(f"{name:<22}{c:>6}{r['lines_per_s']:>11,}{r['p50_ms']:>9.2f}"
                  f"{r['p99_ms']:>9.2f}{ratio:>7.2f}  {min(per_run):.2f}-{max(per_run):.2f}"
                  f" (median {statistics.median(per_run):.2f})")
    print("server CPU per line (user+system, all runs; less sensitive to the load of other "
          "work than lines/s):")
    for name, by_conns in runs.items():
        for c, rs in by_conns.items():
            mine = statistics.median(r["cpu_us"] for r in rs)
            bare = statistics.median(r["cpu_us"] for r in runs["bare"][c])
            print(f"  {name:<20}{c:>6}{mine:>8.2f} us  (bare/this {bare / mine:.2f})")
    if 100 in args.connections:
        bare = results["bare"][100]["lines_per_s"]
        floor = results["floor"][100]["lines_per_s"] / bare
        unaudited = results["floor, no audit line"][100]["lines_per_s"] / bare
        print(f"floor (bench/_floor_server.py: a minimal audited ping server, the least "
              f"any Python server pays)/bare at 100 connections: {floor:.2f}; without "
              f"the audit line {unaudited:.2f}")
        off = results["audit-log none"][100]["lines_per_s"] / results["bare"][100][
            "lines_per_s"]
        print(f"--audit-log none (no audit records): cmdserver/bare at 100 "
              f"connections: {off:.2f}")
        on = results["cmdserver"][100]["lines_per_s"] / results["bare"][100]["lines_per_s"]
        print(f"cmdserver/bare throughput at 100 connections, audit on: {on:.2f}")
        per_run = [mine["lines_per_s"] / floor_run["lines_per_s"] for mine, floor_run in
                   zip(runs["cmdserver"][100], runs["floor"][100], strict=True)]

        def cpu(name: str) -> float:
            return statistics.median(r["cpu_us"] for r in runs[name][100])

        print(f"cmdserver/floor at 100 connections, audit on: throughput "
              f"{statistics.median(per_run):.2f} (median of the runs' ratios; target at "
              f"least 0.8), CPU per line {cpu('floor') / cpu('cmdserver'):.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
