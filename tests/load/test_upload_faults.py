"""Upload faults around a real daemon: the disk fills up in the middle of an
upload, SIGTERM while uploads and scans run, kill -9 while uploads run and a
restart on the same data directory.  Whatever happens, no partial file and no
temporary file is left visible, and the clients get clean errors."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Daemon, Session, add_user, ssh_connect, wait_for

from cmdserver.commands.upload.key import server_key
from cmdserver.commands.upload.spool import TEMP_MARK
from cmdserver.jail import Jail

MIB = 1 << 20


def mac(key: bytes, content: bytes) -> str:
    return hmac.new(key, content, hashlib.sha256).hexdigest()


def begin_upload(daemon: Daemon, name: str, content: bytes, trailer: bool = False) -> Session:
    """Send ``upload NAME SIZE HMAC`` (``-`` with ``trailer``: the MAC is to follow the
    content) and wait for ``Ready``; no content yet."""
    key = server_key(str(daemon.workdir / "data"))
    session = daemon.session()
    given = "-" if trailer else mac(key, content)
    session.sock.sendall(f"upload {name} {len(content)} {given}\n".encode())
    assert session.read_line() == f"Ready for {len(content)} bytes"
    return session


def leftovers(root: Path) -> list[str]:
    """Upload temporary files (line/SSH/PB engine and SFTP) anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if TEMP_MARK in p.name or p.name.endswith(".sftp-part"))


def rest_of_stream(sock: socket.socket) -> bytes:
    """Everything the server still sends until it closes (bounded wait)."""
    sock.settimeout(10)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "8m") -> Iterator[Path]:
    """A tiny filesystem of its own at ``path``, so the disk can really fill up."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root; tests/commands/upload/test_engine.py "
                    "covers disk full with a fake writer")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write into ``directory`` until its filesystem says ENOSPC."""
    filler = directory / "filler"
    block = b"\xaa" * (64 << 10)
    with open(filler, "wb", buffering=0) as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(block)
    return filler


def still_serving(daemon: Daemon) -> None:
    session = daemon.session()
    wait_for(lambda: session.stats() == {"open": 1, "in_flight": 1},  # itself and its stats
             what="connections back to one")
    session.close()


def hanging_port() -> tuple[socket.socket, list[socket.socket]]:
    """A loopback listener whose accept queue is full: connects to it hang.

    A ``portscan`` of that one port stays busy until its per-connect timeout,
    so a scan is in flight without probing anything but our own socket.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        queued.append(s)
    return listener, queued


def test_disk_full_during_upload(start_daemon, jail: Path) -> None:
    with small_tmpfs(jail / "small") as small:
        daemon = start_daemon(["--root", str(jail)])
        content = os.urandom(6 * MIB)  # fits the free space when the upload starts
        session = begin_upload(daemon, "small/big.bin", content)
        session.sock.sendall(content[:MIB])
        filler = fill(small)  # then someone else takes the rest of the disk
        with contextlib.suppress(OSError):  # the server may answer before it read it all
            session.sock.sendall(content[MIB:])
        assert session.read_line() == "Error: disk full, upload discarded"
        # The temporary file is gone before the error is sent, and the same
        # connection reads commands again.
        assert leftovers(jail) == []
        assert session.run("ls small") == ["filler"]
        session.close()
        # Space again: the next upload to the same place works.
        filler.unlink()
        small_content = os.urandom(MIB)
        session2 = begin_upload(daemon, "small/big.bin", small_content, trailer=True)
        key = server_key(str(daemon.workdir / "data"))
        session2.sock.sendall(small_content + f"MAC {mac(key, small_content)}\n".encode())
        assert session2.read_line() == (f"Upload OK small/big.bin {MIB} "
                                        f"mac=hmac-sha256:{mac(key, small_content)}")
        assert (small / "big.bin").read_bytes() == small_content
        session2.close()
        still_serving(daemon)
        assert daemon.log_errors() == []
        assert daemon.terminate() < 5
        assert leftovers(jail) == []


def test_sigterm_during_uploads_and_scans(start_daemon, jail: Path) -> None:
    listener, queued = hanging_port()
    try:
        daemon = start_daemon(["--root", str(jail), "--scan-timeout", "60"])
        uploads = []
        for i in range(4):
            content = os.urandom(8 * MIB)
            session = begin_upload(daemon, f"up{i}.bin", content, trailer=i >= 2)
            # Part of it, then nothing; the last one all of it, but not its trailer.
            session.sock.sendall(content if i == 3 else content[: 3 * MIB + i * 1000])
            uploads.append(session)
        port = listener.getsockname()[1]
        scans = [daemon.session() for _ in range(3)]
        for scan in scans:
            scan.sock.sendall(f"portscan 127.0.0.1 {port}\n".encode())
        watcher = daemon.session()
        wait_for(lambda: watcher.stats()["in_flight"] == 1 + len(uploads) + len(scans),
                 what="uploads and scans in flight")
        watcher.close()
        wait_for(lambda: len(leftovers(jail)) == len(uploads), what="temporary files")
        assert daemon.terminate() < 5
        for session in uploads + scans:
            rest = rest_of_stream(session.sock)
            assert b"Traceback" not in rest and b"internal error" not in rest, rest
            assert b"Upload OK" not in rest and b"Connected to port" not in rest, rest
            for line in rest.decode().splitlines():  # whatever it says is a clean line
                assert line.startswith(("Error: ", "Scanned ")) or line == "", rest
            session.close()
        assert "Server Shut Down." in daemon.log()
        assert daemon.log_errors() == []
        assert leftovers(jail) == []
        assert not any((jail / f"up{i}.bin").exists() for i in range(len(uploads)))
    finally:
        for s in [listener, *queued]:
            s.close()


def test_kill_9_during_uploads_then_restart(start_daemon, jail: Path) -> None:
    (jail / "sub" / "deep").mkdir()
    daemon = start_daemon(["--root", str(jail)])
    names = ["a.bin", "sub/b.bin", "sub/deep/c.bin"]
    sessions = []
    for name in names:
        content = os.urandom(6 * MIB)
        session = begin_upload(daemon, name, content)
        session.sock.sendall(content[: 5 * MIB])
        sessions.append(session)
    wait_for(lambda: len(leftovers(jail)) == len(names), what="temporary files")
    time.sleep(0.2)  # let the workers write part of what they got
    daemon.kill()
    stale = leftovers(jail)
    assert len(stale) == len(names)
    assert not any((jail / name).exists() for name in names)
    for session in sessions:
        session.close()

    again = Daemon(daemon.workdir, daemon.args).start()
    try:
        # The files go first, then the clean-up logs what it removed.
        wait_for(lambda: all(f"removed stale upload file {jail / path}" in again.log()
                             for path in stale), what="stale temporary files to be removed")
        assert leftovers(jail) == []
        assert not any((jail / name).exists() for name in names)
        # The names are free: a full upload to each works now.
        for name in names:
            content = os.urandom(MIB)
            session = begin_upload(again, name, content)
            session.sock.sendall(content)
            assert session.read_line().startswith(f"Upload OK {name} {MIB} sha256=")
            assert (jail / name).read_bytes() == content
            session.close()
        assert again.log_errors() == []
        assert again.terminate() < 5
    finally:
        again.kill()


def test_kill_9_during_sftp_put_then_restart(start_daemon, jail: Path) -> None:
    key = add_user(jail.parent)
    daemon = start_daemon(["--root", str(jail)])
    line = begin_upload(daemon, "line.bin", os.urandom(2 * MIB))
    client = ssh_connect(daemon.ports["ssh"], key)
    sftp = client.open_sftp()
    remote = sftp.open("sftp.bin", "wb")
    remote.write(os.urandom(MIB))
    remote.flush()
    # The SFTP upload is an unnamed file where the filesystem has O_TMPFILE: it
    # leaves nothing behind at all; else a named temporary file like the line's.
    expected = 1 if Jail.use_tmpfile else 2
    wait_for(lambda: len(leftovers(jail)) == expected, what="the temporary files")
    daemon.kill()
    client.close()
    line.close()
    assert not (jail / "sftp.bin").exists() and not (jail / "line.bin").exists()
    assert len(leftovers(jail)) == expected

    again = Daemon(daemon.workdir, daemon.args).start()
    try:
        wait_for(lambda: "removed stale upload file" in again.log(), what="the start clean-up")
        assert leftovers(jail) == []
    finally:
        again.kill()


def test_sigterm_tells_a_running_scan_why(start_daemon, jail: Path) -> None:
    listener, queued = hanging_port()
    try:
        daemon = start_daemon(["--root", str(jail), "--scan-timeout", "60"])
        scan = daemon.session()
        scan.sock.sendall(f"portscan 127.0.0.1 {listener.getsockname()[1]}\n".encode())
        watcher = daemon.session()
        wait_for(lambda: watcher.stats()["in_flight"] == 2, what="the scan in flight")
        watcher.close()
        assert daemon.terminate() < 5
        assert rest_of_stream(scan.sock).decode() == "Error: the server is shutting down\r\n"
    finally:
        for s in [listener, *queued]:
            s.close()
