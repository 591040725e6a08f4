"""Faults around a real daemon: missing or killed ``tail``, a deleted log source,
a file truncated while hashed, the jail removed, SIGTERM in the middle of work.
Each gives a clean one-line error (or a clean shutdown), and the daemon carries on."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

from conftest import Session, wait_for

BIG = 512 << 20  # sparse: hashing it takes a while, writing it takes nothing


def sparse(path: Path, size: int = BIG) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def has_open(pid: int, path: Path) -> bool:
    target = str(path)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                return True
        except FileNotFoundError:
            pass
    return False


def send(port: int, command: str) -> socket.socket:
    """Start a command on a new connection without waiting for its reply."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(command.encode() + b"\n")
    return sock


def reply_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def still_serving(daemon) -> None:
    session = Session(daemon.port)
    assert session.run("help ping") == ["Usage: ping", "  Answer pong: a cheap liveness probe."]
    session.close()


def test_tail_missing(start_daemon, jail: Path, syslog: Path) -> None:
    env = dict(os.environ, PATH="/nonexistent-bin")
    daemon = start_daemon(["--root", str(jail), "--log-source", str(syslog)], env=env)
    session = Session(daemon.port)
    assert session.run("lastlog 3") == ["Error: lastlog failed: tail not found"]
    still_serving(daemon)
    assert daemon.log_errors() == []
    assert daemon.terminate() < 5


def test_tail_killed_mid_run(start_daemon, jail: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)  # tail blocks opening it: a lastlog that does not end by itself
    daemon = start_daemon(["--root", str(jail), "--log-source", str(fifo)])
    sock = send(daemon.port, "lastlog 3")
    wait_for(lambda: len(daemon.children()) == 1, what="tail to start")
    [tail] = daemon.children()
    os.kill(tail, 9)
    assert reply_line(sock).startswith("Error: lastlog failed: ")
    wait_for(lambda: not daemon.children(), what="tail to be reaped")
    still_serving(daemon)
    assert daemon.log_errors() == []
    assert daemon.terminate() < 5


def test_log_source_deleted(start_daemon, jail: Path, syslog: Path) -> None:
    daemon = start_daemon(["--root", str(jail), "--log-source", str(syslog)])
    session = Session(daemon.port)
    assert session.run("lastlog 2")[0] == "Begin lastlog"
    syslog.unlink()
    [error] = session.run("lastlog 2")
    assert error.startswith("Error: lastlog failed: ") and "No such file" in error
    still_serving(daemon)
    assert daemon.log_errors() == []
    assert daemon.terminate() < 5


def test_file_truncated_while_hashed(start_daemon, jail: Path) -> None:
    daemon = start_daemon(["--root", str(jail)])
    big = jail / "big.bin"
    outcomes = []
    for _ in range(3):  # the truncation races the hash; one clean refusal is required
        sparse(big)
        sock = send(daemon.port, "comphash big.bin")
        wait_for(lambda: has_open(daemon.pid, big), timeout=10, what="the hash to start")
        os.truncate(big, BIG // 3)
        outcomes.append(reply_line(sock))
        sock.close()
        if outcomes[-1].startswith("Error"):
            break
    full = hashlib.sha256(b"\0" * BIG).hexdigest()
    for outcome in outcomes:  # a hash can only be of the whole, unchanged file
        assert outcome in ("Error: file changed while it was being hashed: big.bin",
                           f"File hash is : {full}"), outcome
    assert outcomes[-1].startswith("Error")
    still_serving(daemon)
    assert daemon.log_errors() == []
    assert daemon.terminate() < 5


def test_jail_removed(start_daemon, tmp_path: Path) -> None:
    jail = tmp_path / "gone"
    jail.mkdir()
    (jail / "f.txt").write_text("x")
    daemon = start_daemon(["--root", str(jail)])
    session = Session(daemon.port)
    assert session.run("ls") == ["f.txt"]
    shutil.rmtree(jail)
    assert session.run("ls") == ["Error: no such file or directory: ."]
    assert session.run("comphash f.txt") == ["Error: no such file or directory: f.txt"]
    jail.mkdir()
    assert session.run("ls") == []
    still_serving(daemon)
    assert daemon.log_errors() == []
    assert daemon.terminate() < 5


def test_sigterm_during_active_work(start_daemon, jail: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "never-written"
    os.mkfifo(fifo)
    sparse(jail / "big.bin", 4 * BIG)
    daemon = start_daemon(["--root", str(jail), "--log-source", str(fifo)])
    socks = [send(daemon.port, "comphash big.bin") for _ in range(4)]
    socks += [send(daemon.port, "lastlog 5") for _ in range(4)]
    socks += [send(daemon.port, "ping") for _ in range(20)]
    wait_for(lambda: len(daemon.children()) == 4, what="the tails to start")
    wait_for(lambda: has_open(daemon.pid, jail / "big.bin"), what="a hash to start")
    tails = daemon.children()
    assert daemon.terminate() < 5
    for pid in tails:  # killed with their commands, not orphaned
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}") or
                 "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
                 timeout=5, what=f"tail {pid} to die")
    assert "Server Shut Down." in daemon.log()
    assert daemon.log_errors() == []
    for sock in socks:
        sock.settimeout(5)
        rest = b""
        try:
            while chunk := sock.recv(65536):
                rest += chunk
        except ConnectionResetError:
            pass
        sock.close()
        assert b"Traceback" not in rest and b"internal error" not in rest
