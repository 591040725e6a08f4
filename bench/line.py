#!/usr/bin/env python3
"""bench/line: ``ping`` throughput and latency through the line door, against bare Twisted.

Side by side in one run, each server in its own process and the load generator
(bench/_loadgen.py) in a third: a bare Twisted ``LineReceiver`` echo server,
cmdserver with its JSON audit file (the default), and cmdserver with
``--audit-log none`` (the audit events then go to twistd's text log).  Every
connection keeps ``--window`` lines in flight, sent ``--chunk`` at a time,
with 1, 10, 100 and 1000 connections; the best of ``--repeat`` runs counts.
The last line is the throughput ratio cmdserver/bare at 100 connections with
the audit log on.

    .venv/bin/python bench/line.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import HERE, PYTHON, Daemon, raise_nofile

CONNECTIONS = (1, 10, 100, 1000)


class EchoServer:
    """The bare Twisted peer, in its own process."""

    def __enter__(self) -> EchoServer:
        self.proc = subprocess.Popen([PYTHON, str(HERE / "_echo_server.py")],
                                     stdout=subprocess.PIPE, text=True, preexec_fn=raise_nofile)
        self.port = int(self.proc.stdout.readline().split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait()


def load(port: int, connections: int, args: argparse.Namespace, greeting: int) -> dict:
    per_connection = max(args.chunk, args.total // connections)
    best: dict = {}
    for _ in range(args.repeat):
        out = subprocess.run(
            [PYTHON, str(HERE / "_loadgen.py"), "--port", str(port), "--connections",
             str(connections), "--lines", str(per_connection), "--window", str(args.window),
             "--chunk", str(args.chunk), "--greeting", str(greeting)],
            capture_output=True, text=True, check=True, timeout=300)
        result = json.loads(out.stdout)
        if not best or result["lines_per_s"] > best["lines_per_s"]:
            best = result
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--total", type=int, default=200_000, help="ping lines per run")
    p.add_argument("--window", type=int, default=32, help="lines in flight per connection")
    p.add_argument("--chunk", type=int, default=8, help="lines per client write")
    p.add_argument("--repeat", type=int, default=3, help="runs per point; the best counts")
    p.add_argument("--connections", type=int, nargs="*", default=list(CONNECTIONS))
    args = p.parse_args()
    raise_nofile()
    limit = str(max(args.connections) + 10)
    results: dict[str, dict[int, dict]] = {}
    with EchoServer() as echo:
        results["bare"] = {c: load(echo.port, c, args, 0) for c in args.connections}
    for name, audit in (("cmdserver", True), ("audit-log none", False)):
        daemon = Daemon(args=["--max-clients", limit, "--max-per-ip", limit], audit=audit)
        daemon.start()
        try:
            results[name] = {c: load(daemon.port, c, args, 1) for c in args.connections}
        finally:
            daemon.stop()
    print(f"ping, window {args.window} lines, {args.chunk} per write, "
          f"{args.total} lines per run, best of {args.repeat}")
    print(f"{'server':<22}{'conns':>6}{'lines/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'ratio':>7}")
    for name, by_conns in results.items():
        for c, r in by_conns.items():
            ratio = r["lines_per_s"] / results["bare"][c]["lines_per_s"]
            print(f"{name:<22}{c:>6}{r['lines_per_s']:>11,}{r['p50_ms']:>9.2f}"
                  f"{r['p99_ms']:>9.2f}{ratio:>7.2f}")
    if 100 in args.connections:
        off = results["audit-log none"][100]["lines_per_s"] / results["bare"][100][
            "lines_per_s"]
        print(f"--audit-log none (events in the text log): cmdserver/bare at 100 "
              f"connections: {off:.2f}")
        on = results["cmdserver"][100]["lines_per_s"] / results["bare"][100]["lines_per_s"]
        print(f"cmdserver/bare throughput at 100 connections, audit on: {on:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
