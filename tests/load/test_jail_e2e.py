"""The file jail against a real daemon, with real clients.

- The rename race end to end: one SFTP session (the attacker, a user like any
  other) swaps a directory of the root with a symlink in the root that leads
  out, by SFTP renames, in a loop; meanwhile another SFTP session and the line
  door read, list, upload, rename, remove and chmod through that directory.
  Nothing outside the jail is ever read, listed, created or changed.
- One SFTP session cannot take the daemon's descriptors: past
  ``--sftp-max-handles`` its opens are refused, the daemon's descriptors stay
  bounded, other clients are served, and closing gives everything back.

Bounded in count and time (each well under a minute), loopback only.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import threading
import time
from pathlib import Path

import paramiko
from conftest import Daemon, add_user, ssh_connect, wait_for

from cmdserver.commands.upload.key import server_key
from tests.helpers.race import INSIDE_SECRET, OUTSIDE_ONLY, OUTSIDE_SECRET, RaceLayout

ROUNDS = 150
DEADLINE = 30.0  # seconds for the rounds, whatever the machine


class RenamingAttacker(threading.Thread):
    """Swaps ``d`` and the symlink ``out`` by SFTP renames until stopped."""

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        super().__init__(name="attacker", daemon=True)
        self.sftp = sftp
        self.stop_event = threading.Event()
        self.swaps = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                for old, new in (("d", "d.hold"), ("out", "d"), ("d", "out"), ("d.hold", "d")):
                    self.sftp.rename(old, new)
                self.swaps += 1
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)
        assert not self.is_alive()
        assert self.error is None, f"the attacker's renames failed: {self.error!r}"


def quietly(f, *args):  # noqa: ANN001, ANN202 - a test helper
    try:
        return f(*args)
    except (OSError, paramiko.SSHException):
        return None


def line_upload(daemon: Daemon, name: str, content: bytes) -> str:
    key = server_key(str(daemon.workdir / "data"))
    mac = hmac.new(key, content, hashlib.sha256).hexdigest()
    session = daemon.session()
    try:
        session.sock.sendall(f"upload {name} {len(content)} {mac}\n".encode())
        reply = session.read_line()
        if reply.startswith("Ready"):
            session.sock.sendall(content)
            reply = session.read_line()
        return reply
    finally:
        session.close()


def test_rename_race_end_to_end(start_daemon, tmp_path: Path) -> None:
    layout = RaceLayout(str(tmp_path / "race"))
    key = add_user(tmp_path)
    daemon = start_daemon(["--root", layout.root])
    attacker_client = ssh_connect(daemon.ports["ssh"], key)
    victim_client = ssh_connect(daemon.ports["ssh"], key)
    victim = victim_client.open_sftp()
    line = daemon.session()
    attacker = RenamingAttacker(attacker_client.open_sftp())
    attacker.start()
    reads = listings = rounds = 0
    started = time.monotonic()
    try:
        while rounds < ROUNDS and time.monotonic() - started < DEADLINE:
            rounds += 1
            data = quietly(lambda: victim.open("d/secret").read())
            assert data != OUTSIDE_SECRET, "SFTP read a file outside the jail"
            reads += data == INSIDE_SECRET
            names = quietly(victim.listdir, "d") or []
            assert OUTSIDE_ONLY not in names, "SFTP listed a directory outside"
            listings += bool(names)
            quietly(victim.putfo, io.BytesIO(b"race"), "d/new", 0, None, False)
            quietly(victim.rename, "d/x", "d/x2")
            quietly(victim.rename, "d/x2", "d/x")
            quietly(victim.remove, "d/victim")
            quietly(victim.chmod, "d/secret", 0o400)
            quietly(victim.utime, "d/secret", (5, 5))
            quietly(victim.mkdir, "d/made")
            quietly(victim.rmdir, "d/made")
            assert OUTSIDE_ONLY not in line.run("ls d"), "ls listed a directory outside"
            digest = line.run("comphash d/secret")
            assert hashlib.sha256(OUTSIDE_SECRET).hexdigest() not in " ".join(digest)
            line_upload(daemon, f"d/up{rounds}", b"uploaded")
            assert layout.outside_unchanged(), f"changed something outside in round {rounds}"
            layout.put_inside("victim", b"victim")
    finally:
        attacker.stop()
    assert layout.outside_unchanged()
    assert attacker.swaps > 0 and reads > 0 and listings > 0  # the race really ran
    line.close()
    for client in (attacker_client, victim_client):
        client.close()
    assert daemon.log_errors() == []
    assert daemon.terminate() < 5


def test_one_sftp_session_cannot_take_the_descriptors(start_daemon, tmp_path: Path,
                                                     jail: Path) -> None:
    key = add_user(tmp_path)
    daemon = start_daemon(["--root", str(jail), "--sftp-max-handles", "64"])
    client = ssh_connect(daemon.ports["ssh"], key)
    sftp = client.open_sftp()
    sftp.listdir(".")  # warm up: the worker threads and the session's own descriptors
    before = daemon.fds()
    held, refused = [], []
    for n in range(500):
        try:
            held.append(sftp.open("small.txt" if n % 2 else "sub/notes.txt", "rb"))
        except OSError as e:
            refused.append(str(e))
    assert len(held) == 64 and len(refused) == 436
    assert "too many open files and directories (the limit is 64 per session)" in refused[0]
    assert daemon.fds() - before <= 64 + 8  # the open files, and a few threads' worth
    other = daemon.session()
    assert other.run("ls") == ["medium.bin", "small.txt", "sub"]  # the others are served
    other.close()
    for handle in held:
        handle.close()
    wait_for(lambda: daemon.fds() <= before, what="descriptors given back")
    assert sftp.open("small.txt").read() == b"hello\n"
    client.close()
    assert daemon.log_errors() == []
    assert daemon.terminate() < 5
