"""Attacks on the work and memory one client may cost, against a real daemon.

Each attack comes from 127.0.0.1 while a watcher on another loopback address
(127.0.0.2) pings the line door every 50 ms and samples the daemon's RSS,
descriptors, threads and children; each test asserts bounds on those and on
the slowest ping.  Every attack is bounded in count and in time (each test well
under a minute); only processes the tests start are stopped, by pid.

- PB: a 24 MB message before login (four connections at once), and lists nested
  200,000 deep;
- PB: 300 pipelined ``lastlog`` calls on one connection, then on three;
- ten ``comphash`` of a big file from one address while ``ls`` and an SSH login
  come from another;
- clients that never read: ``lastlog`` on the line door and over SSH exec, and
  ``ssh -T`` fed a flood of command lines;
- a client that sends a FIN (Ctrl-C in ``nc``) while its hash runs, and one that
  half-closes and reads on (``nc -N``).

Run with ``.venv/bin/python -m pytest tests/load/test_attacks_work.py -s`` to
see the figures (docs/security.md quotes them).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko
from conftest import PASSWORD, USER, Session, add_user, ssh_connect, wait_for

OTHER = "127.0.0.2"  # the address of the clients that must not notice the attack
PING_BOUND = 1.0  # seconds: the slowest ping from OTHER during any attack
MIB = 1024
PB_PIPELINE = Path(__file__).with_name("pb_pipeline.py")
PB_DIALECT = b"\x02\x82pb"


class Watch:
    """Pings the line door from OTHER every 50 ms (a new connection each time), and
    samples the daemon meanwhile; keeps the peaks."""

    def __init__(self, daemon: Any) -> None:
        self.daemon = daemon
        self.pings: list[float] = []
        self.rss = self.fds = self.threads = self.children = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            sock = socket.socket()
            sock.settimeout(30)
            sock.bind((OTHER, 0))
            sock.connect(("127.0.0.1", self.daemon.port))
            data = b""
            sock.sendall(b"ping\n")
            while b"pong\r\n" not in data:
                chunk = sock.recv(4096)
                assert chunk, data
                data += chunk
            self.pings.append(time.monotonic() - started)
            sock.close()
            self.sample()
            self._stop.wait(0.05)

    def sample(self) -> None:
        d = self.daemon
        self.rss = max(self.rss, d.rss_kib())
        self.fds = max(self.fds, d.fds())
        self.threads = max(self.threads, d.threads())
        self.children = max(self.children, len(d.children()))

    @property
    def slowest(self) -> float:
        return max(self.pings)

    def report(self, what: str, base: dict[str, int]) -> None:
        print(f"{what}: RSS {base['rss'] // MIB} -> peak {self.rss // MIB} MiB, "
              f"fds {base['fds']} -> {self.fds}, threads {base['threads']} -> {self.threads}, "
              f"children {self.children}, slowest ping from {OTHER} {self.slowest * 1000:.0f} ms "
              f"({len(self.pings)} pings)")
        assert self.slowest < PING_BOUND, self.slowest


def figures(daemon: Any) -> dict[str, int]:
    return {"rss": daemon.rss_kib(), "fds": daemon.fds(), "threads": daemon.threads()}


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def line_client(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.settimeout(30)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def ask(sock: socket.socket, line: str, end: bytes = b"\r\n") -> bytes:
    sock.sendall(line.encode() + b"\n")
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def pb_raw(port: int) -> socket.socket:
    """A PB connection at the banana level: the dialect chosen, nothing else."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.recv(4096)  # the server's dialects
    sock.sendall(PB_DIALECT)
    return sock


def send_until_closed(sock: socket.socket, chunks: Callable[[], Any]) -> int:
    """Send everything (or until the server cuts the connection), then wait for the
    server to close it: closing first would reset it, and the server would drop
    what it had not read yet."""
    sent = 0
    try:
        for chunk in chunks():
            sock.sendall(chunk)
            sent += len(chunk)
        sock.settimeout(5)
        while sock.recv(65536):
            pass
    except OSError:  # the server aborted the connection, or took its time
        pass
    finally:
        sock.close()
    return sent


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def in_flight(daemon: Any) -> int:
    """Commands running in the daemon (asked from OTHER: the attack may use up the
    connections 127.0.0.1 may open)."""
    session = Session(daemon.port, OTHER)
    try:
        return session.stats()["in_flight"] - 1  # not counting its own stats
    finally:
        session.close()


def test_pb_large_messages_before_login(start_daemon, jail: Path) -> None:
    daemon = start_daemon(["--root", str(jail)])
    base = figures(daemon)
    # A list of 40 lists of 150,000 two-byte strings: 24 MB on the wire, millions
    # of objects once decoded (Twisted's decoder keeps them all until the end).
    items = 150_000
    sublist = _b128(items) + b"\x80" + b"\x02\x82ab" * items
    header = _b128(41) + b"\x80" + b"\x07\x82message"

    def message() -> Any:
        yield header
        for _ in range(40):
            yield sublist

    sent: list[int] = []
    with Watch(daemon) as watch:
        attackers = [threading.Thread(target=lambda: sent.append(
            send_until_closed(pb_raw(daemon.ports["pb"]), message))) for _ in range(4)]
        for t in attackers:
            t.start()
        for t in attackers:
            t.join(60)
        wait_for(lambda: daemon.log().count("a message over 64 KiB") == 4, what="refusals")
        time.sleep(0.5)
    watch.report("PB 4 x 24 MB before login", base)
    print(f"  bytes the attackers got in before the abort: {sent}")
    assert watch.rss - base["rss"] < 16 * MIB, (base, watch.rss)
    assert daemon.log_errors() == []


def _b128(n: int) -> bytes:
    out = b""
    while n:
        out += bytes((n & 0x7F,))
        n >>= 7
    return out or b"\0"


def test_pb_nested_data(start_daemon, jail: Path) -> None:
    daemon = start_daemon(["--root", str(jail)])
    base = figures(daemon)
    # A call of authenticate whose argument is a jellied list in a list ... 200,000
    # deep (unjelly recurses once per level): 800 KB.
    depth = 200_000
    nested = b"\x02\x80\x08\x87" * (depth - 1) + b"\x01\x80\x08\x87"  # ["list", [...]]
    call = (b"\x07\x80\x1a\x87\x01\x81\x04\x82root\x0c\x82authenticate\x01\x81" + nested
            + b"\x01\x80\x05\x87")  # [message, 1, root, authenticate, 1, ARGS, {}]
    with Watch(daemon) as watch:
        for _ in range(4):
            send_until_closed(pb_raw(daemon.ports["pb"]), lambda: [call])
        wait_for(lambda: daemon.log().count("lists nested more than 32 deep") == 4,
                 what="refusals")
        time.sleep(0.5)
    watch.report("PB lists nested 200,000 deep", base)
    log = daemon.log()
    print(f"  the daemon's log: {len(log.splitlines())} lines")
    assert "Traceback" not in log and "RecursionError" not in log
    assert len(log.splitlines()) < 100  # one line per refusal, not a frame per list
    assert daemon.log_errors() == []


def test_pb_pipelined_lastlog(start_daemon, jail: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # tail blocks opening it: every call that runs keeps running
    add_user(jail.parent)
    daemon = start_daemon(["--root", str(jail), "--log-source", str(fifo)])
    base = figures(daemon)
    for connections, running in ((1, 16), (3, 32)):
        with Watch(daemon) as watch:
            pipeline = subprocess.Popen(
                [sys.executable, str(PB_PIPELINE), str(daemon.ports["pb"]), USER, PASSWORD,
                 str(connections), "300", "3"], stdout=subprocess.PIPE, text=True)
            assert pipeline.stdout is not None
            seen = json.loads(pipeline.stdout.readline())
            watch.sample()
            pipeline.wait(60)
            wait_for(lambda: not daemon.children(), what="tails killed")
        watch.report(f"PB {connections} x 300 pipelined lastlog", base)
        print(f"  {seen}")
        assert seen["running"] == running, seen
        assert watch.children <= running, watch.children
        refusals = {k: v for k, v in seen.items() if k.startswith("refused")}
        assert sum(refusals.values()) == connections * 300 - running, refusals
        assert all("too many calls in flight" in k for k in refusals), refusals
        assert watch.fds - base["fds"] < running * 4 + 16, (base, watch.fds)
    wait_for(lambda: daemon.fds() <= base["fds"], what="descriptors back")
    assert daemon.log_errors() == []


def test_ten_hashes_from_one_address(start_daemon, jail: Path) -> None:
    sparse(jail / "big.img", 16 << 30)
    add_user(jail.parent)
    daemon = start_daemon(["--root", str(jail)])
    base = figures(daemon)
    with Watch(daemon) as watch:
        attackers = [line_client(daemon.port) for _ in range(10)]
        for sock in attackers:
            sock.sendall(b"comphash big.img\n")
        wait_for(lambda: in_flight(daemon) == 10, what="ten hashes running")
        lists, logins = [], []
        for _ in range(5):
            started = time.monotonic()
            sock = line_client(daemon.port, OTHER)
            assert b"small.txt" in ask(sock, "ls", end=b"sub\r\n")
            lists.append(time.monotonic() - started)
            sock.close()
            started = time.monotonic()
            raw = socket.create_connection(("127.0.0.1", daemon.ports["ssh"]), timeout=30,
                                           source_address=(OTHER, 0))
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            client.connect("127.0.0.1", daemon.ports["ssh"], username=USER, password=PASSWORD,
                           sock=raw, allow_agent=False, look_for_keys=False, timeout=30)
            client.close()
            logins.append(time.monotonic() - started)
        assert in_flight(daemon) == 10  # the hashes are still at it
        for sock in attackers:
            reset(sock)
        wait_for(lambda: in_flight(daemon) == 0, what="hashes cancelled")
    watch.report("10 x comphash 16 GiB from one address", base)
    print(f"  ls from {OTHER}: slowest {max(lists) * 1000:.0f} ms; SSH password login "
          f"from {OTHER}: slowest {max(logins) * 1000:.0f} ms")
    assert max(lists) < PING_BOUND, lists
    assert max(logins) < 5 * PING_BOUND, logins
    assert watch.threads - base["threads"] <= 8 + 4, (base, watch.threads)
    assert daemon.log_errors() == []


def test_clients_that_never_read_lastlog(start_daemon, jail: Path, tmp_path: Path) -> None:
    log = tmp_path / "biglog"
    with open(log, "w") as f:
        for i in range(1000):
            f.write(f"{i:06d} " + "y" * 8000 + "\n")  # 8 MB for `lastlog 1000`
    key = add_user(jail.parent)
    daemon = start_daemon(["--root", str(jail), "--log-source", str(log)])
    base = figures(daemon)
    with Watch(daemon) as watch:
        readers = []
        for _ in range(8):
            sock = line_client(daemon.port)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"lastlog 1000\n" * 50)
            readers.append(sock)
        client = ssh_connect(daemon.ports["ssh"], key)
        channels = []
        for _ in range(5):
            channel = client.get_transport().open_session()  # type: ignore[union-attr]
            channel.exec_command("lastlog 1000")
            channels.append(channel)
        time.sleep(4)
        watch.sample()
        assert in_flight(daemon) == 8 + 5  # each held, none finished, none lost
        for sock in readers:
            reset(sock)
        client.close()
        wait_for(lambda: not daemon.children(), what="tails killed")
    watch.report("8 line + 5 SSH clients never reading lastlog (8 MB each)", base)
    assert watch.rss - base["rss"] < 48 * MIB, (base, watch.rss)
    assert watch.children <= 8 + 5, watch.children
    assert daemon.log_errors() == []


def test_ssh_piped_shell_flood(start_daemon, jail: Path, tmp_path: Path) -> None:
    key = add_user(jail.parent)
    key_file = tmp_path / "id_ecdsa"
    key.write_private_key_file(str(key_file))
    os.chmod(key_file, 0o600)
    flood = tmp_path / "commands"
    with open(flood, "wb") as f:
        f.write(b"ls sub\n" * 4_000_000)  # 28 MB of commands that each take a thread
    daemon = start_daemon(["--root", str(jail)])
    base = figures(daemon)
    ssh = ["ssh", "-T", "-p", str(daemon.ports["ssh"]), "-i", str(key_file),
           "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
           "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", f"{USER}@127.0.0.1"]
    with Watch(daemon) as watch:
        with open(flood, "rb") as stdin:
            reading = subprocess.Popen(ssh, stdin=stdin, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
        with open(flood, "rb") as stdin:
            # Never reads its output: the pipe fills, then ssh stops reading the channel.
            stuck = subprocess.Popen(ssh, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        for _ in range(10):
            time.sleep(1)
            watch.sample()
        for proc in (reading, stuck):
            assert proc.poll() is None  # still flooding: the bound held it, not an error
            proc.kill()
            proc.wait(10)
        wait_for(lambda: in_flight(daemon) == 0, what="the shells to end")
    watch.report("2 x ssh -T < 28 MB of commands (one never reading)", base)
    assert watch.rss - base["rss"] < 32 * MIB, (base, watch.rss)
    assert daemon.log_errors() == []


def test_fin_while_a_hash_runs(start_daemon, jail: Path) -> None:
    sparse(jail / "big.img", 64 << 30)  # minutes of hashing
    daemon = start_daemon(["--root", str(jail)])
    base = figures(daemon)
    with Watch(daemon) as watch:
        # Ctrl-C in nc: a FIN, then the socket is gone.
        sock = line_client(daemon.port)
        sock.sendall(b"comphash big.img\n")
        wait_for(lambda: in_flight(daemon) == 1, what="the hash to run")
        sock.close()
        started = time.monotonic()
        wait_for(lambda: in_flight(daemon) == 0, timeout=10, what="the hash to be cancelled")
        cancelled = time.monotonic() - started
        # printf 'comphash small.txt\nping\n' | nc -N: a FIN, and the answers are read.
        sock = line_client(daemon.port)
        sock.sendall(b"comphash small.txt\nping\n")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        sock.close()
    watch.report("FIN while a 64 GiB hash runs", base)
    print(f"  the hash was cancelled {cancelled * 1000:.0f} ms after the client's FIN")
    assert cancelled < 2.0, cancelled
    assert data == (b"File hash is : "
                    b"5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03\r\n"
                    b"pong\r\n"), data
    assert daemon.log_errors() == []
