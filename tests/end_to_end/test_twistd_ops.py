"""Operations against real ``twistd -n cmdserver`` processes: the audit log under
rotation and deletion.  UNIX sockets only; each test stops the daemons it started."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]  # the twistd script
CLI = ["-m", "cmdserver.cli"]


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Daemon:
    """``twistd -n cmdserver`` with its log in a file, a line door on a UNIX socket."""

    def __init__(self, workdir: Path, data: Path, *args: str, name: str = "d") -> None:
        self.workdir = workdir
        self.data = data
        self.sock = workdir / f"{name}.sock"
        self.log_path = workdir / f"{name}.log"
        self.args = ["--line", f"unix:{self.sock}", "--line-auth", "off", "--ssh", "none",
                     "--pb", "none", "--data-dir", str(data), "--bcrypt-cost", "4", *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> Daemon:
        self.proc = subprocess.Popen(
            [sys.executable, *TWISTD, "-n", "--pidfile=", "-l", str(self.log_path),
             "cmdserver", *self.args],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        wait_for(lambda: self.proc.poll() is not None or "line door listening" in self.log(),
                 "the daemon to listen", 60)
        assert self.proc.poll() is None, f"the daemon exited:\n{self.log()}"
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ask(self, *lines: str) -> bytes:
        """Send the lines and ``exit``; everything the daemon answered."""
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(30)
        client.connect(str(self.sock))
        client.sendall("".join(f"{line}\n" for line in (*lines, "exit")).encode())
        data = b""
        while chunk := client.recv(4096):
            data += chunk
        client.close()
        return data

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="cmdo", dir="/tmp"))  # short: AF_UNIX paths are limited
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def audit_commands(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [record["command"] for record in map(json.loads, text.splitlines())
            if record["event"] == "command" and record["command"] != "exit"]


def test_the_audit_log_is_reopened_on_sighup_after_a_rotation(
        workdir: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(workdir, workdir / "data").start()
    daemons.append(daemon)
    audit = workdir / "data" / "audit.log"
    daemon.ask("before-rotation")
    wait_for(lambda: "before-rotation" in audit_commands(audit), "the first record")
    audit.rename(audit.with_name("audit.log.1"))
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reopened (SIGHUP)" in daemon.log(), "the audit log to be reopened")
    daemon.ask("after-rotation")
    wait_for(lambda: "after-rotation" in audit_commands(audit), "a record in the new file")
    assert audit_commands(audit.with_name("audit.log.1")) == ["before-rotation"]
    assert audit.stat().st_mode & 0o777 == 0o600
    # The one SIGHUP also reread the credentials.
    assert "SIGHUP: rereading the users file and keys" in daemon.log()


def test_a_deleted_audit_log_is_created_again_without_a_signal(
        workdir: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(workdir, workdir / "data").start()
    daemons.append(daemon)
    audit = workdir / "data" / "audit.log"
    daemon.ask("before-delete")
    wait_for(lambda: "before-delete" in audit_commands(audit), "the first record")
    audit.unlink()
    sent: list[str] = []

    def recorded() -> bool:
        sent.append(f"after-delete-{len(sent)}")
        daemon.ask(sent[-1])
        return bool(set(sent) & set(audit_commands(audit)))

    wait_for(recorded, "records in a new audit.log")
    assert "before-delete" not in audit_commands(audit)
