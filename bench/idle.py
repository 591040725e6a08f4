#!/usr/bin/env python3
"""bench/idle: daemon memory with 5,000 idle line connections.

Opens ``--connections`` connections (from 127.0.0.1 to 127.0.0.5 in turn, so the
per-address limit is exercised as it would be by several hosts), has each answer
one ``ping`` (so every one is served), and measures the server's resident set
size before and after; the same against a bare Twisted ``LineReceiver`` echo
server, in the same run.  Each server first serves one connection of its own
and is measured after it, as a running daemon would be: CPython shares one
attribute table among a class's instances only for the names its first
instances set, so a server whose very first write comes after thousands of
connections pays a dictionary per transport that a running one does not.
Last line: cmdserver's memory per idle connection in KB (target: at most 2)
and its ratio to the bare server's.

    .venv/bin/python bench/idle.py
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import time

from _common import HERE, PYTHON, Daemon, machine, raise_nofile, rss_kib

SOURCES = [f"127.0.0.{i}" for i in range(1, 6)]


def ping(s: socket.socket) -> None:
    """One line each way: ``pong`` from cmdserver, the line itself from the echo server."""
    s.sendall(b"ping\n")
    if s.recv(100) not in (b"pong\r\n", b"ping\n"):
        raise RuntimeError("no answer")


def open_idle(port: int, count: int, served: bool) -> list[socket.socket]:
    socks = []
    for i in range(count):
        s = socket.socket()
        s.bind((SOURCES[i % len(SOURCES)], 0))
        s.connect(("127.0.0.1", port))
        socks.append(s)
    if served:  # each answers once: accepted and served, not waiting in the backlog
        for s in socks:
            s.settimeout(30)
            ping(s)
    return socks


def settle(pid: int) -> int:
    """RSS once it stops moving (the server may still be accepting)."""
    last, same = -1, 0
    while same < 3:
        time.sleep(0.3)
        now = rss_kib(pid)
        same = same + 1 if now == last else 0
        last = now
    return last


def measure(pid: int, port: int, count: int) -> tuple[int, int]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as first:
        ping(first)  # a server that has served a connection, as a running one has
    before = settle(pid)
    socks = open_idle(port, count, served=True)
    after = settle(pid)
    for s in socks[:: max(1, count // 50)]:  # every connection is still served
        ping(s)
    for s in socks:
        s.close()
    return before, after


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--connections", type=int, default=5000)
    args = p.parse_args()
    raise_nofile(2 * args.connections + 100)
    n = args.connections
    echo = subprocess.Popen([PYTHON, str(HERE / "_echo_server.py")], stdout=subprocess.PIPE,
                            text=True, preexec_fn=raise_nofile)
    try:
        port = int(echo.stdout.readline().split()[1])
        bare = measure(echo.pid, port, n)
    finally:
        echo.terminate()
        echo.wait()
    per_ip = str(n // len(SOURCES) + 10)
    daemon = Daemon(args=["--max-clients", str(n + 10), "--max-per-ip", per_ip]).start()
    try:
        ours = measure(daemon.pid, daemon.port, n)
    finally:
        daemon.stop()
    print(machine())
    print(f"{n} idle connections from {len(SOURCES)} addresses, each served one line")
    print(f"{'server':<12}{'RSS before':>12}{'RSS after':>12}{'per conn':>10}")
    for name, (before, after) in (("bare", bare), ("cmdserver", ours)):
        print(f"{name:<12}{before / 1024:>10.1f}MB{after / 1024:>10.1f}MB"
              f"{(after - before) * 1024 / n / 1024:>8.1f}KB")
    per_conn = {name: (after - before) / n for name, (before, after) in
                (("bare", bare), ("cmdserver", ours))}
    print(f"cmdserver per idle connection: {per_conn['cmdserver']:.2f} KB (target at most 2); "
          f"bare {per_conn['bare']:.2f} KB; ratio {per_conn['cmdserver'] / per_conn['bare']:.2f}")


if __name__ == "__main__":
    main()
