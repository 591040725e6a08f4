"""Start-up and operations against real ``twistd -n cmdserver`` processes: doors
that cannot listen, two daemons on one data directory, the audit log under
rotation and deletion, bad start-up input, a broken users file, the first-run
admin.  Loopback and UNIX sockets only; each test stops the daemons it started."""

from __future__ import annotations

import json
import os
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
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or "line door listening" in self.log(),
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
            for stream in (self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    stream.close()


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


def run_twistd(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """A daemon expected to stop at start (the timeout only bounds a hang)."""
    return subprocess.run([sys.executable, *TWISTD, "-n", "--pidfile=", "cmdserver", *args],
                          cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


def audit_commands(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [record["command"] for record in map(json.loads, text.splitlines())
            if record["event"] == "command" and record["command"] != "exit"]


def test_a_door_that_cannot_listen_stops_the_daemon(workdir: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    sock = workdir / "first.sock"
    try:
        done = run_twistd(workdir, "--line", f"unix:{sock}", "--line-auth", "off",
                          "--line", f"tcp:{port}:interface=127.0.0.1", "--ssh", "none",
                          "--pb", "none", "--data-dir", str(workdir / "data"))
    finally:
        taken.close()
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    problems = [row for row in output.splitlines()
                if "#critical]" in row or "#error]" in row or "cannot" in row]
    assert len(problems) == 1, output
    assert problems[0].endswith(f"cannot start: line door tcp:{port}:interface=127.0.0.1: "
                                "cannot listen: Address already in use")
    assert "Traceback" not in output
    assert done.stderr == ""
    # The first door had listened: it was closed again, its socket file removed.
    assert "line door listening on" in output
    assert not sock.exists()


def test_without_n_the_waiting_parent_says_why_and_exits_1(workdir: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    log, pidfile = workdir / "twistd.log", workdir / "twistd.pid"
    try:  # twistd forks: the parent waits for the daemon to report its start
        done = subprocess.run(
            [sys.executable, *TWISTD, f"--pidfile={pidfile}", "-l", str(log), "cmdserver",
             "--line", f"tcp:{port}:interface=127.0.0.1", "--ssh", "none", "--pb", "none",
             "--data-dir", str(workdir / "data")],
            cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    if done.returncode == 0 and pidfile.exists():  # it did start: stop the daemon we made
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert done.returncode == 1
    assert done.stderr.startswith("An error has occurred: b'cmdserver.service.StartupExit: "
                                  f"cannot start: line door tcp:{port}")
    # The daemon answers its parent first, then removes the pidfile.
    wait_for(lambda: not pidfile.exists(), "the pidfile to be removed")
    [line] = [row for row in log.read_text().splitlines() if "cannot" in row]
    assert line.endswith(f"cannot start: line door tcp:{port}:interface=127.0.0.1: "
                         "cannot listen: Address already in use")
    assert "Traceback" not in log.read_text()


def test_a_unix_door_in_a_missing_directory(workdir: Path) -> None:
    done = run_twistd(workdir, "--line", f"unix:{workdir}/missing/s", "--ssh", "none",
                      "--pb", "none", "--data-dir", str(workdir / "data"))
    assert done.returncode == 1
    assert "Traceback" not in done.stdout + done.stderr
    [line] = [row for row in done.stdout.splitlines() if "cannot" in row]
    assert line.endswith(f"cannot start: line door unix:{workdir}/missing/s: cannot listen: "
                         "No such file or directory")


def test_a_second_daemon_on_the_same_data_directory_refuses_to_start(
        workdir: Path, daemons: list[Daemon]) -> None:
    data = workdir / "data"
    first = Daemon(workdir, data, name="first").start()
    daemons.append(first)
    assert first.proc is not None
    with open(data / "cmdserver.lock") as f:
        assert f.read() == f"{first.proc.pid}\n"
    done = run_twistd(workdir, "--line", f"unix:{workdir}/second.sock", "--ssh", "none",
                      "--pb", "none", "--data-dir", str(data))
    assert done.returncode == 1
    assert done.stderr == (f"cmdserver: data directory {data} is in use by another cmdserver "
                           f"(pid {first.proc.pid})\n")
    assert done.stdout == ""
    assert not (workdir / "second.sock").exists()
    assert first.ask("ping").endswith(b"pong\r\nbye !\r\n")  # the first one is untouched
    first.stop()
    again = Daemon(workdir, data, name="again").start()  # the lock went with the process
    daemons.append(again)
    assert again.ask("ping").endswith(b"pong\r\nbye !\r\n")


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


@pytest.mark.parametrize("where", ["missing/audit.log", "."])
def test_an_audit_log_that_cannot_be_opened_is_one_line(workdir: Path, where: str) -> None:
    path = workdir / where
    done = run_twistd(workdir, "--line", f"unix:{workdir}/s", "--ssh", "none", "--pb", "none",
                      "--data-dir", str(workdir / "data"), "--audit-log", str(path))
    assert done.returncode == 1
    reason = "No such file or directory" if where != "." else "Is a directory"
    assert done.stderr == f"cmdserver: --audit-log {path}: {reason}\n"
    assert done.stdout == ""
    assert not (workdir / "s").exists()


def test_a_broken_users_file_is_reported_once_per_change(
        workdir: Path, daemons: list[Daemon]) -> None:
    daemon = Daemon(workdir, workdir / "data", "--users-poll-interval", "0.05").start()
    daemons.append(daemon)
    users = workdir / "data" / "users"

    def reports() -> int:
        return daemon.log().count("credentials not reloaded")

    with open(users, "a") as f:
        f.write("garbage\n")
    wait_for(lambda: reports() == 1, "the broken file to be reported")
    time.sleep(1)  # twenty polls of the same broken file
    assert reports() == 1
    users.write_text('{"name": 1}\n')  # changed, still broken
    wait_for(lambda: reports() == 2, "the changed file to be reported")
    assert daemon.ask("ping").endswith(b"pong\r\nbye !\r\n")  # the last good users still serve
    assert "Traceback" not in daemon.log()


def test_the_first_admin_is_for_a_new_data_directory_only(
        workdir: Path, daemons: list[Daemon]) -> None:
    data = workdir / "data"
    first = Daemon(workdir, data, name="first").start()
    daemons.append(first)
    password_file = data / "initial-admin-password"
    password = password_file.read_text().strip()
    assert password_file.stat().st_mode & 0o777 == 0o600
    assert "First run: created user admin" in first.log()
    assert password not in first.log()
    first.stop()
    assert password not in first.log()
    # Every user deleted, the password file too: the next start makes no admin.
    subprocess.run([sys.executable, *CLI, "userdel", "--data-dir", str(data), "admin"],
                   check=True, capture_output=True)
    password_file.unlink()
    second = Daemon(workdir, data, name="second").start()
    daemons.append(second)
    assert not password_file.exists()
    assert (data / "users").read_text() == ""
    assert "First run" not in second.log()
    assert "no users on file" in second.log()
