#!/usr/bin/env python3
"""bench/comphash: ``comphash`` of a warm 1 GiB file through the line door.

Side by side in one run, on the same file (read once first, so it is in the page
cache): ``sha256sum``, a bare in-process ``hashlib.sha256`` loop (1 MiB
``readinto`` chunks), and ``comphash`` sent to a cmdserver daemon over a
loopback connection, timed from the request to the reply.  The daemon's RSS is
sampled every 5 ms while it hashes.  Last line: comphash throughput as a
fraction of bare hashlib (target: at least 0.9), and the daemon's RSS growth
(target: under 32 MB).

    .venv/bin/python bench/comphash.py [--size-mib 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

from _common import Daemon, machine, rss_kib

MIB = 1 << 20


def make_file(path: Path, size_mib: int) -> None:
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for i in range(size_mib):
            f.write(block[i % 251:] + block[: i % 251])  # not one repeated block


def warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


def daemon_with_big_file(size_mib: int) -> tuple[Daemon, Path, Path]:
    """A daemon (not started yet) whose jail root holds a warm ``big.bin``."""
    daemon = Daemon()
    root = daemon.workdir / "root"
    root.mkdir()
    big = root / "big.bin"
    make_file(big, size_mib)
    warm(big)
    return daemon, root, big


def bare_hashlib(path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    digest = hashlib.sha256()
    buf = bytearray(MIB)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return time.perf_counter() - started, digest.hexdigest()


def sha256sum(path: Path) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run([shutil.which("sha256sum") or "sha256sum", str(path)],
                         capture_output=True, text=True, check=True)
    return time.perf_counter() - started, out.stdout.split()[0]


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = rss_kib(pid)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, rss_kib(self.pid))


def comphash(sock: socket.socket, name: str) -> tuple[float, str]:
    started = time.perf_counter()
    sock.sendall(f"comphash {name}\n".encode())
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed")
        reply += chunk
    elapsed = time.perf_counter() - started
    text = reply.decode().strip()
    if not text.startswith("File hash is : "):
        raise RuntimeError(text)
    return elapsed, text.rsplit(" ", 1)[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    args = p.parse_args()
    print(machine(), flush=True)
    daemon, root, big = daemon_with_big_file(args.size_mib)
    daemon.args = ["--root", str(root)]
    daemon.start()
    best: dict[str, float] = {}
    digests: set[str] = set()
    try:
        sock = socket.create_connection(("127.0.0.1", daemon.port))
        comphash(sock, big.name)  # first run: thread pool start-up, page cache check
        time.sleep(0.5)
        rss_before = rss_kib(daemon.pid)
        sampler = RssSampler(daemon.pid)
        sampler.start()
        for _ in range(args.repeat):
            for name, run in (("sha256sum", lambda: sha256sum(big)),
                              ("hashlib", lambda: bare_hashlib(big)),
                              ("comphash", lambda: comphash(sock, big.name))):
                elapsed, digest = run()
                digests.add(digest)
                best[name] = min(best.get(name, elapsed), elapsed)
        sampler.stop.set()
        sampler.join()
        sock.close()
    finally:
        daemon.stop()
        big.unlink()
    if len(digests) != 1:
        raise RuntimeError(f"digests differ: {digests}")
    size = args.size_mib * MIB
    print(f"sha256 of a warm {args.size_mib} MiB file, best of {args.repeat}")
    for name in ("sha256sum", "hashlib", "comphash"):
        print(f"{name:<10}{best[name]:>8.3f} s{size / best[name] / 1e9:>8.2f} GB/s"
              f"{best['hashlib'] / best[name]:>7.2f} of hashlib")
    growth = (sampler.peak - rss_before) / 1024
    print(f"daemon RSS {rss_before / 1024:.1f} MB before, peak growth while hashing "
          f"{growth:.1f} MB")
    print(f"comphash/hashlib throughput: {best['hashlib'] / best['comphash']:.2f}, "
          f"RSS growth {growth:.1f} MB")


if __name__ == "__main__":
    main()
