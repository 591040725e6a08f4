"""The soak and fault suite's fixtures: a real ``twistd cmdserver`` process.

Run with ``.venv/bin/python -m pytest tests/load`` (the default run skips this
directory).  Everything is on loopback, bounded in time and count.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paramiko
import pytest

TWISTD = str(Path(sys.executable).with_name("twistd"))
CLI = str(Path(sys.executable).with_name("cmdserver"))
USER, PASSWORD = "ops", "soak-password"
LISTENING = re.compile(r"(\w+) door listening on 127\.0\.0\.1:(\d+)")
LOOPBACK_ANY_PORT = "tcp:0:interface=127.0.0.1"
# What must never appear in the daemon's log: tracebacks and error-level events.
LOG_ERRORS = re.compile(r"Traceback|Unhandled|#critical\]|#error\]")


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))


class Daemon:
    """``twistd -n cmdserver`` on an ephemeral loopback port, with /proc probes."""

    def __init__(self, workdir: Path, args: list[str], env: dict[str, str] | None = None):
        self.workdir = workdir
        self.args = args
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.ports: dict[str, int] = {}  # door name -> port

    @property
    def log_path(self) -> Path:
        return self.workdir / "twistd.log"

    def start(self) -> Daemon:
        """Start on ephemeral loopback ports (every door, unless ``args`` says ``none``)."""
        cmd = [TWISTD, "-n", "--pidfile=", "-l", str(self.log_path), "cmdserver",
               "--line", "tcp:0:interface=127.0.0.1:backlog=1024",
               "--ssh", LOOPBACK_ANY_PORT, "--pb", LOOPBACK_ANY_PORT, "--http", LOOPBACK_ANY_PORT,
               "--data-dir", str(self.workdir / "data"), *self.args]
        doors = {"line", "ssh", "pb", "http"} - {door for door in ("ssh", "pb")
                                         if f"--{door}=none" in self.args or
                                         self._follows(f"--{door}", "none")}
        skip = len(LISTENING.findall(self.log()))  # a restart appends to the same log
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=self.env,
                                     stdin=subprocess.DEVNULL, preexec_fn=raise_nofile)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited:\n{self.log()}"
            self.ports = {door: int(port) for door, port in LISTENING.findall(self.log())[skip:]}
            if set(self.ports) >= doors:
                self.port = self.ports["line"]
                return self
            time.sleep(0.05)
        raise AssertionError(f"daemon did not listen:\n{self.log()}")

    def _follows(self, flag: str, value: str) -> bool:
        return any(a == flag and b.lower() == value for a, b in
                   zip(self.args, self.args[1:], strict=False))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_errors(self) -> list[str]:
        return [row for row in self.log().splitlines() if LOG_ERRORS.search(row)]

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            return next(int(r.split()[1]) for r in f if r.startswith("VmRSS:"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def children(self) -> list[int]:
        kids: list[int] = []
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            try:
                with open(f"/proc/{self.pid}/task/{tid}/children") as f:
                    kids += [int(p) for p in f.read().split()]
            except FileNotFoundError:
                pass
        return kids

    def session(self) -> Session:
        return Session(self.port)

    def terminate(self, timeout: float = 5.0) -> float:
        """SIGTERM; the seconds it took to exit (raises if over ``timeout``)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Session:
    """A blocking line-door client for checks between the loads (from ``source``, a
    loopback address, if given)."""

    def __init__(self, port: int, source: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30,
                                             source_address=(source, 0) if source else None)
        self.buffer = b""

    def read_line(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; pending {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode()

    def run(self, command: str) -> list[str]:
        """Send a command and a ping; the lines before the pong are its reply."""
        self.sock.sendall(command.encode() + b"\nping\n")
        lines = []
        while (line := self.read_line()) != "pong":
            lines.append(line)
        return lines

    def stats(self) -> dict[str, int]:
        text = "\n".join(self.run("stats"))
        connections = re.search(r"connections: (\d+) open", text)
        in_flight = re.search(r"commands in flight: (\d+)", text)
        assert connections is not None and in_flight is not None, text
        return {
            "open": int(connections.group(1)),
            "in_flight": int(in_flight.group(1)),
        }

    def close(self) -> None:
        self.sock.close()


def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def add_user(workdir: Path, name: str = USER, password: str = PASSWORD) -> paramiko.PKey:
    """Create a user with the ``cmdserver`` CLI in the daemon's data directory.

    Cheap bcrypt (cost 4) for the many PB logins; an SSH key (ECDSA: quick to
    make) for the SSH door.  Returns the private key.
    """
    data = str(workdir / "data")
    subprocess.run([CLI, "useradd", "--data-dir", data, "--password-stdin", "--cost", "4",
                    name], input=password + "\n", text=True, check=True, capture_output=True)
    key = paramiko.ECDSAKey.generate()
    public = workdir / f"{name}.pub"
    public.write_text(f"{key.get_name()} {key.get_base64()} {name}\n")
    subprocess.run([CLI, "addkey", "--data-dir", data, name, str(public)], check=True,
                   capture_output=True)
    return key


def ssh_connect(port: int, key: paramiko.PKey, name: str = USER) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", port, username=name, pkey=key, allow_agent=False,
                   look_for_keys=False, timeout=30, banner_timeout=30, auth_timeout=30)
    return client


@pytest.fixture
def jail(tmp_path: Path) -> Path:
    root = tmp_path / "jail"
    (root / "sub").mkdir(parents=True)
    (root / "small.txt").write_bytes(b"hello\n")
    (root / "sub" / "notes.txt").write_bytes(b"notes\n" * 100)
    (root / "medium.bin").write_bytes(os.urandom(4 << 20))
    return root


@pytest.fixture
def syslog(tmp_path: Path) -> Path:
    path = tmp_path / "syslog"
    path.write_text("".join(f"Nov 21 08:00:{i % 60:02d} host app[{i}]: line {i}\n"
                            for i in range(2000)))
    return path


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator:
    started: list[Daemon] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(tmp_path, args, env).start()
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.kill()
