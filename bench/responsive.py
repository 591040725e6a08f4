#!/usr/bin/env python3
"""bench/responsive: ``ping`` round trips stay fast while the daemon works hard.

One connection sends ``ping`` and waits for ``pong``, over and over, first on an
idle daemon (the reference) and then while background loads run on other
connections: ``comphash`` of a 1 GiB file (repeated), a client that floods
``help`` and never reads its socket, ``cmdserver upload`` of the same 1 GiB
file (repeated, a process of its own: the client's hashing must not share
this process's interpreter lock with the pings) and ``portscan`` of every
port of 127.0.0.1 when that command is registered and the bench runs in a
private network namespace (``--netns`` re-runs it under ``unshare -n``).  A load whose
command the daemon does not have is skipped with a note.  Three phases in one
run: the upload alone, every load but the upload, every load at once.  Last
line: ping p50 and p99 with every load at once, in ms (targets: under 2 and
under 20).

    .venv/bin/python bench/responsive.py [--netns]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from _common import machine  # noqa: E402  (bench/ is the script's directory)
from comphash import daemon_with_big_file


def read_reply(sock: socket.socket, until: bytes) -> bytes:
    data = b""
    while until not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError(f"connection closed; got {data[-200:]!r}")
        data += chunk
    return data


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port))


def ping_latencies(port: int, stop: threading.Event, minimum: int) -> list[float]:
    sock = connect(port)
    times: list[float] = []
    while not stop.is_set() or len(times) < minimum:
        started = time.perf_counter()
        sock.sendall(b"ping\n")
        if read_reply(sock, b"\n") != b"pong\r\n":
            raise RuntimeError("bad pong")
        times.append(time.perf_counter() - started)
        time.sleep(0.001)
    sock.close()
    return times


def summary(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return at(0.5), at(0.99), ordered[-1] * 1000


class Load(threading.Thread):
    """A background load on its own connection, until ``stop`` is set."""

    def __init__(self, name: str, command: str, body: Callable[[int, threading.Event], int],
                 port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True, name=name)
        self.command = command
        self.body = body
        self.port = port
        self.stop_event = stop
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.count = self.body(self.port, self.stop_event)
        except BaseException as e:  # reported in the table
            self.error = e


def comphash_load(name: str) -> Callable[[int, threading.Event], int]:
    def body(port: int, stop: threading.Event) -> int:
        sock, done = connect(port), 0
        while not stop.is_set():
            sock.sendall(f"comphash {name}\n".encode())
            if not read_reply(sock, b"\n").startswith(b"File hash is : "):
                raise RuntimeError("comphash failed")
            done += 1
        sock.close()
        return done
    return body


def never_reads(port: int, stop: threading.Event) -> int:
    """Floods ``help`` and never reads: the server must stop reading it, not stall."""
    sock = connect(port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(0.2)
    sent, burst = 0, b"help\n" * 1000
    while not stop.is_set():
        try:
            sent += sock.send(burst)
        except TimeoutError:
            pass
    sock.close()
    return sent // 5


def portscan_load(spec: str) -> Callable[[int, threading.Event], int]:
    def body(port: int, stop: threading.Event) -> int:
        sock, done = connect(port), 0
        while not stop.is_set():
            # Commands on one connection run in order: the pong marks the scan's end,
            # whatever its output looks like.
            sock.sendall(f"portscan {spec}\nping\n".encode())
            read_reply(sock, b"pong\r\n")
            done += 1
        sock.close()
        return done
    return body


def upload_load(path: Path, key_file: Path) -> Callable[[int, threading.Event], int]:
    """``cmdserver upload`` of ``path`` again and again (the daemon runs with --overwrite)."""
    cli = str(Path(sys.executable).with_name("cmdserver"))

    def body(port: int, stop: threading.Event) -> int:
        done = 0
        while not stop.is_set():
            subprocess.run([cli, "upload", str(path), "--as", "uploaded.bin", "--port", str(port),
                            "--key-file", str(key_file)], check=True, capture_output=True)
            done += 1
        return done
    return body


def run_phase(port: int, wanted: list[tuple[str, str, Callable[[int, threading.Event], int]]],
              seconds: float) -> tuple[list[Load], list[float]]:
    """Start the loads, time pings for ``seconds`` once they run, stop them."""
    stop = threading.Event()
    loads = [Load(name, cmd, body, port, stop) for name, cmd, body in wanted]
    for load in loads:
        load.start()
    # The upload client hashes its file before it sends: let it reach the sending part.
    time.sleep(1.5 if any(cmd == "upload" for _, cmd, _ in wanted) else 0.5)
    timer = threading.Timer(seconds, stop.set)
    timer.start()
    busy = ping_latencies(port, stop, 500)
    for load in loads:
        load.join(120)
    return loads, busy


def registered(port: int) -> set[str]:
    sock = connect(port)
    sock.sendall(b"help\n")
    text = read_reply(sock, b"Type 'help COMMAND'").decode()
    sock.close()
    return {row.split()[0] for row in text.splitlines()[1:-1] if row.startswith("  ")}


def private_netns() -> bool:
    """True in a network namespace with loopback only (as ``unshare -n`` makes)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=8.0, help="how long the loads run")
    p.add_argument("--netns", action="store_true", help="re-run inside unshare -n")
    args = p.parse_args()
    if args.netns:
        script = " ".join([sys.executable, str(Path(__file__).resolve()),
                           "--size-mib", str(args.size_mib), "--seconds", str(args.seconds)])
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", f"ip link set lo up && {script}"])
    print(machine(), flush=True)
    daemon, root, big = daemon_with_big_file(args.size_mib)
    daemon.args = ["--root", str(root), "--max-clients", "50", "--max-per-ip", "50",
                   "--overwrite"]
    daemon.start()
    try:
        commands = registered(daemon.port)
        stop = threading.Event()
        stop.set()
        idle = ping_latencies(daemon.port, stop, 500)
        wanted = [("comphash 1 GiB", "comphash", comphash_load(big.name)),
                  ("client never reads", "help", never_reads),
                  (f"upload {args.size_mib} MiB", "upload",
                   upload_load(big, daemon.workdir / "data" / "hmac.key"))]
        notes = []
        if "upload" not in commands:
            notes.append("upload: not registered in this daemon, skipped")
        if "portscan" not in commands:
            notes.append("portscan: not registered in this daemon, skipped")
        elif not private_netns():
            notes.append("portscan: skipped outside a private network namespace (use --netns)")
        else:
            wanted.append(("portscan 1-65535", "portscan", portscan_load("127.0.0.1 1-65535")))
        wanted = [w for w in wanted if w[1] in commands]
        # The same run measures each part beside the whole, so machine noise hits all alike.
        phases = [("upload alone", [w for w in wanted if w[1] == "upload"]),
                  ("all but upload", [w for w in wanted if w[1] != "upload"]),
                  ("all loads", wanted)]
        results = [(name, *run_phase(daemon.port, chosen, args.seconds))
                   for name, chosen in phases if chosen]
    finally:
        daemon.stop()
        big.unlink()
        (root / "uploaded.bin").unlink(missing_ok=True)
    for note in notes:
        print(f"note: {note}")
    for phase, loads, _ in results:
        for load in loads:
            unit = "lines sent" if load.body is never_reads else "runs"
            state = f"error: {load.error!r}" if load.error else f"{load.count} {unit}"
            print(f"{phase:<16} load {load.name:<22}{state}")
    print(f"{'ping round trip':<22}{'count':>7}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for name, times in [("idle daemon", idle), *((p, t) for p, _, t in results)]:
        p50, p99, worst = summary(times)
        print(f"{name:<22}{len(times):>7}{p50:>9.2f}{p99:>9.2f}{worst:>9.2f}")
    busy = results[-1][2]
    p50, p99 = summary(busy)[:2]
    print(f"ping under every load at once: p50 {p50:.2f} ms (target < 2), "
          f"p99 {p99:.2f} ms (target < 20)")


if __name__ == "__main__":
    main()
