"""Shared pieces of the benchmarks: start a daemon, find its port, read its memory.

Every benchmark runs servers and load generators as separate processes on the
loopback interface only, so one process's work never hides another's cost.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
TWISTD = str(Path(PYTHON).with_name("twistd"))
LISTENING = re.compile(r"line door listening on 127\.0\.0\.1:(\d+)")


def raise_nofile(wanted: int = 20000) -> int:
    """Raise the open-files soft limit as far as the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kib(pid: int) -> int:
    """Resident set size of a process, in KiB (from /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for row in f:
            if row.startswith("VmRSS:"):
                return int(row.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid``."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


@dataclass
class Daemon:
    """A ``twistd -n cmdserver`` process on an ephemeral loopback port."""

    args: list[str] = field(default_factory=list)
    audit: bool = True
    endpoint: str = "tcp:0:interface=127.0.0.1:backlog=4096"
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cmdbench-")))
    proc: subprocess.Popen | None = None
    port: int = 0
    source: str | None = None  # a directory with another cmdserver package to run

    @property
    def log_path(self) -> Path:
        return self.workdir / "twistd.log"

    @property
    def audit_path(self) -> Path:
        return self.workdir / "data" / "audit.log"

    def start(self, timeout: float = 20.0) -> Daemon:
        audit = [] if self.audit else ["--audit-log", "none"]
        # No fixed ports: other daemons may hold them (an older tree has no HTTP door).
        others = ["--ssh", "none", "--pb", "none"]
        if (Path(self.source or ROOT) / "cmdserver" / "doors" / "http").is_dir():
            others += ["--http", "none"]
        cmd = [TWISTD, "-n", "--pidfile=", "-l", str(self.log_path), "cmdserver",
               "--line", self.endpoint, "--data-dir",
               str(self.workdir / "data"), *audit, *others, *self.args]
        env = dict(os.environ, PYTHONPATH=self.source) if self.source else None
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                     preexec_fn=raise_nofile, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited early:\n{self.log_text()}")
            m = LISTENING.search(self.log_text())
            if m:
                self.port = int(m.group(1))
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"daemon did not listen in time:\n{self.log_text()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def machine() -> str:
    """The CPU model, its count and whether it has SHA-NI (from /proc/cpuinfo)."""
    model, flags, count = "unknown CPU", set(), 0
    try:
        with open("/proc/cpuinfo") as f:
            for row in f:
                key, _, value = row.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                    count += 1
                elif key == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    sha = "SHA-NI" if "sha_ni" in flags else "no SHA-NI"
    return f"{count} x {model}, {sha}; load average {os.getloadavg()[0]:.2f}"


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def greeting_lines(port: int, wait: float = 0.5) -> int:
    """Lines a server sends on connect before any command: none from cmdserver's line
    door unless it runs with ``--greeting``, one from an older tree's."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.settimeout(wait)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except TimeoutError:
            pass
    return data.count(b"\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
