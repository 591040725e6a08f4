"""Login attacks against a real daemon, each while a valid user on another loopback
address (127.0.0.2) logs in and pings.

- 400 ``authenticate`` calls pipelined on one PB connection;
- 400 password requests pipelined on one SSH connection;
- ten connections from one address guessing on the line door, SSH and PB at once.

For each: the attacker's address is penalised and its checks refused, so bcrypt
runs only a handful of times (the daemon's CPU time stays far below what 400
checks cost), the valid user's login and ``ping`` stay fast (< 2 s, on every
probe), and memory, descriptors and threads stay bounded.  The user's password
hash has cost 10 (about 50 ms a check): 400 checks would be some 20 s of CPU.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paramiko
import pytest
from conftest import CLI, Daemon, wait_for

USER, PASSWORD = "ops", "attack-password"
COST = 10
VALID = "127.0.0.2"  # the valid user's address; the attacker is 127.0.0.1
ATTACKERS = Path(__file__).with_name("login_attackers.py")
LATENCY = 2.0  # seconds a valid login and a ping may take, at most, during an attack
# Seconds of daemon CPU an attack may cost besides the valid user's own checks
# (400 checks would cost about 20 s); the number of checks is bounded too.
CPU_OVERHEAD = 2.5
TICKS = os.sysconf("SC_CLK_TCK")


def add_user(workdir: Path) -> None:
    subprocess.run([CLI, "useradd", "--data-dir", str(workdir / "data"), "--password-stdin",
                    "--cost", str(COST), USER], input=PASSWORD + "\n", text=True, check=True,
                   capture_output=True)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def source_socket(port: int, source: str = VALID) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(30)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def line_login(port: int) -> float:
    """Log in on the line door from 127.0.0.2 and ping; the seconds it took."""
    started = time.monotonic()
    with source_socket(port) as sock:
        f = sock.makefile("rwb")
        f.write(f"login {USER} {PASSWORD}\nping\n".encode())
        f.flush()
        assert f.readline() == f"Logged in as {USER}\r\n".encode()
        assert f.readline() == b"pong\r\n"
    return time.monotonic() - started


def ssh_login(port: int) -> float:
    """Log in over SSH (password) from 127.0.0.2 and run ping; the seconds it took."""
    started = time.monotonic()
    t = paramiko.Transport(source_socket(port))
    try:
        t.start_client(timeout=30)
        t.auth_password(USER, PASSWORD)
        chan = t.open_session()
        chan.exec_command("ping")
        assert chan.makefile().read() == b"pong\n"
    finally:
        t.close()
    return time.monotonic() - started


class Prober:
    """Probes the valid user's logins in a thread until stopped; keeps each time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.times: dict[str, list[float]] = {"line": [], "ssh": []}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            for door, probe in (("line", line_login), ("ssh", ssh_login)):
                try:
                    self.times[door].append(probe(self.daemon.ports[door]))
                except Exception as e:  # noqa: BLE001  (reported by the test)
                    self.errors.append(f"{door}: {type(e).__name__}: {e}")
            self._stop.wait(0.5)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(60)

    def check(self) -> dict[str, float]:
        assert self.errors == []
        worst = {door: max(times) for door, times in self.times.items()}
        assert all(self.times.values()), self.times
        assert max(worst.values()) < LATENCY, worst
        return worst


def attacker(*args: Any) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ATTACKERS), *map(str, args)],
                            stdout=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, timeout: float = 60) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return json.loads(out.strip().splitlines()[-1])


def stats(daemon: Daemon) -> dict[str, int]:
    """The login counters of ``stats``, asked from 127.0.0.2."""
    with source_socket(daemon.port) as sock:
        f = sock.makefile("rwb")
        f.write(f"login {USER} {PASSWORD}\n".encode() + b"stats\nping\n")
        f.flush()
        assert f.readline().startswith(b"Logged in")
        text = b""
        while (line := f.readline()) != b"pong\r\n":
            text += line
    logins = re.search(rb"logins: (\d+) ok, (\d+) failed, (\d+) refused; (\d+) penalties",
                       text)
    refused = re.search(rb"(\d+) refused(?: \((\d+) for login penalties\))?\r\n", text)
    assert logins and refused, text
    ok, failed, refused_logins, penalties = map(int, logins.groups())
    return {"logins": ok, "failed": failed, "logins_refused": refused_logins,
            "penalties": penalties, "connections_refused": int(refused.group(2) or 0)}


@pytest.fixture
def daemon(start_daemon: Any, tmp_path: Path) -> Daemon:
    (tmp_path / "data").mkdir()
    add_user(tmp_path)
    d = start_daemon(["--line-auth", "required", "--max-per-ip", "10"])
    ssh_login(d.ports["ssh"])  # warm up: host keys loaded, bcrypt's threads started
    line_login(d.port)
    return d


class Resources:
    """The daemon's CPU, memory, descriptors and threads around an attack."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        before = cpu_seconds(daemon.pid)
        for _ in range(5):  # what one valid login costs the daemon (its bcrypt check)
            line_login(daemon.port)
        self.per_login = (cpu_seconds(daemon.pid) - before) / 5
        self.counters = stats(daemon)
        self.cpu = cpu_seconds(daemon.pid)
        self.rss = daemon.rss_kib()
        self.fds = daemon.fds()
        self.threads = daemon.threads()

    def check(self) -> dict[str, Any]:
        d = self.daemon
        cpu = cpu_seconds(d.pid) - self.cpu
        wait_for(lambda: d.fds() <= self.fds + 2, timeout=30, what="descriptors back")
        counters = stats(d)
        valid = counters["logins"] - self.counters["logins"] - 1  # the stats call's own
        attack_cpu = cpu - valid * self.per_login
        figures = {"cpu": round(cpu, 2), "valid_logins": valid,
                   "cpu_per_login": round(self.per_login, 3),
                   "attack_cpu": round(attack_cpu, 2),
                   "rss_growth_kib": d.rss_kib() - self.rss,
                   "fds": (self.fds, d.fds()), "threads": (self.threads, d.threads()),
                   **{k: v - self.counters[k] for k, v in counters.items()}}
        assert attack_cpu < CPU_OVERHEAD, figures
        assert d.rss_kib() - self.rss < 30 * 1024, figures
        assert d.threads() <= self.threads + 2, figures  # bcrypt's two threads at most
        assert d.log_errors() == []
        return figures


def report(name: str, **figures: Any) -> None:
    print(f"\n{name}: {json.dumps(figures)}")


def test_pipelined_pb_authenticate(daemon: Daemon) -> None:
    resources = Resources(daemon)
    with Prober(daemon) as prober:
        time.sleep(0.5)
        seen = finished(attacker("pb-pipeline", daemon.ports["pb"], USER, 400))
        time.sleep(1.0)
    latency = prober.check()
    figures = resources.check()
    # One check ran (the first call); the others were refused at once, and the
    # connection was closed after the fifth refusal.
    assert figures["penalties"] <= 1, figures
    assert seen.get("login refused: a login is already being checked on this "
                    "connection", 0) == 4, seen
    assert seen.get("login failed; too many failures, closing", 0) >= 300, seen
    report("pb-pipeline", seen=seen, latency=latency, **figures)


def test_pipelined_ssh_password_requests(daemon: Daemon) -> None:
    resources = Resources(daemon)
    with Prober(daemon) as prober:
        time.sleep(0.5)
        seen = finished(attacker("ssh-pipeline", daemon.ports["ssh"], USER, 400))
        time.sleep(1.0)
    latency = prober.check()
    figures = resources.check()
    # The server hangs up after the third refusal, often before the client has
    # written all 400: what it wrote was pipelined all the same.
    assert seen["closed by the server"] and seen["sent"] > 3, seen
    assert figures["penalties"] <= 1 and figures["logins_refused"] == 3, figures
    report("ssh-pipeline", seen=seen, latency=latency, **figures)


def test_parallel_connections_from_one_address(daemon: Daemon) -> None:
    resources = Resources(daemon)
    seconds = 15
    with Prober(daemon) as prober:
        seen = finished(attacker("parallel", daemon.port, daemon.ports["ssh"],
                                 daemon.ports["pb"], USER, seconds), timeout=120)
    latency = prober.check()
    figures = resources.check()
    # Penalties of 1, 2, 4, 8 s…: in 15 s only a few guesses are checked at all.
    assert figures["penalties"] <= 12, figures
    assert figures["connections_refused"] > 0, figures
    report("parallel", seen=seen, latency=latency, **figures)
