#!/usr/bin/env python3
"""bench/idle: daemon memory with 5,000 idle line connections.

Opens ``--connections`` connections (from 127.0.0.1 to 127.0.0.5 in turn, so the
per-address limit is exercised as it would be by several hosts), has each answer
one ``ping`` (so every one is served), and measures the daemon's resident set
size; the same against a bare Twisted ``LineReceiver`` server for reference.
Last line: cmdserver's total RSS in MB with the connections open (target:
under 100).

    .venv/bin/python bench/idle.py
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import time

from _common import HERE, PYTHON, Daemon, raise_nofile, rss_kib

SOURCES = [f"127.0.0.{i}" for i in range(1, 6)]


def ping(s: socket.socket) -> None:
    s.sendall(b"ping\n")
    if s.recv(100) != b"pong\r\n":
        raise RuntimeError("no pong")


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


def measure(pid: int, port: int, count: int, served: bool) -> tuple[int, int]:
    before = settle(pid)
    socks = open_idle(port, count, served)
    after = settle(pid)
    if served:  # every connection is still served
        for s in socks[:: max(1, count // 50)]:
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
        bare = measure(echo.pid, port, n, served=False)
    finally:
        echo.terminate()
        echo.wait()
    per_ip = str(n // len(SOURCES) + 10)
    daemon = Daemon(args=["--max-clients", str(n + 10), "--max-per-ip", per_ip]).start()
    try:
        ours = measure(daemon.pid, daemon.port, n, served=True)
    finally:
        daemon.stop()
    print(f"{n} idle connections from {len(SOURCES)} addresses")
    print(f"{'server':<12}{'RSS before':>12}{'RSS after':>12}{'per conn':>10}")
    for name, (before, after) in (("bare", bare), ("cmdserver", ours)):
        print(f"{name:<12}{before / 1024:>10.1f}MB{after / 1024:>10.1f}MB"
              f"{(after - before) * 1024 / n / 1024:>8.1f}KB")
    print(f"cmdserver RSS with {n} idle connections: {ours[1] / 1024:.1f} MB (target < 100)")


if __name__ == "__main__":
    main()
