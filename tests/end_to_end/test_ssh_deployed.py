"""The SSH door as deployed: makeService with a real users file (``cmdserver useradd``,
``cmdserver addkey``), driven by paramiko and by OpenSSH's ``ssh`` and ``sftp``.

Covers the start-up sweep of SFTP temporary files, ``upload`` refused in the shell,
UTF-8 typed at the shell prompt, and OpenSSH exec and SFTP in batch mode.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import sys
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.internet import defer, reactor, utils
from twisted.internet.task import deferLater
from twisted.trial import unittest

from cmdserver.cli import main as cli
from cmdserver.commands.upload.spool import TEMP_RE, temp_name
from cmdserver.jail import Jail
from tests.end_to_end.support import RunningService, in_thread

SSH = shutil.which("ssh")
SFTP = shutil.which("sftp")
SCP = shutil.which("scp")
SHELL_UPLOAD_ERROR = (b"Error: upload reads its bytes from stdin: "
                      b"use 'ssh HOST upload NAME SIZE HMAC < FILE'")


class DeployedSSHBase(unittest.TestCase):
    """The service from makeService and a users file with ``ops``: a password and
    an Ed25519 key (``self.key_file`` for OpenSSH, ``self.pkey`` for paramiko)."""

    def setUp(self) -> None:
        self.tmp = os.path.abspath(self.mktemp())
        self.data = os.path.join(self.tmp, "data")
        private = ed25519.Ed25519PrivateKey.generate()
        pem = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        self.pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))
        os.makedirs(self.tmp)
        self.key_file = os.path.join(self.tmp, "id_ed25519")
        with open(self.key_file, "wb") as f:
            f.write(pem)
        os.chmod(self.key_file, stat.S_IRUSR | stat.S_IWUSR)
        pub = os.path.join(self.tmp, "ops.pub")
        with open(pub, "w") as f:
            f.write(f"ssh-ed25519 {self.pkey.get_base64()} ops@test\n")
        self.patch(sys, "stdin", io.StringIO("s3cret-pass\n"))
        self.assertEqual(cli(["useradd", "ops", "--password-stdin", "--cost", "4",
                              "--data-dir", self.data]), 0)
        self.assertEqual(cli(["addkey", "ops", pub, "--data-dir", self.data]), 0)

    def build(self) -> RunningService:
        return RunningService(self.tmp, "--line", "none", "--ssh", "tcp:0:interface=127.0.0.1",
                              "--bcrypt-cost", "4")

    @defer.inlineCallbacks
    def serve(self, server: RunningService | None = None) -> Any:
        server = server or self.build()
        yield server.start()
        self.addCleanup(server.stop)
        self.port = server.ports[0].getHost().port
        self.root = server.root
        return server

    def connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        client.connect("127.0.0.1", self.port, username="ops", pkey=self.pkey,
                       allow_agent=False, look_for_keys=False, timeout=10)
        return client

    def openssh(self, program: str | None, *args: str) -> defer.Deferred:
        """Run an OpenSSH client in batch mode with the key: (out, err, status)."""
        if program is None:
            raise unittest.SkipTest("OpenSSH client not installed")
        options = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                   "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
                   "-o", "LogLevel=ERROR", "-i", self.key_file,
                   "-P" if program in (SFTP, SCP) else "-p", str(self.port)]
        return utils.getProcessOutputAndValue(program, [*options, *args],
                                              env={"PATH": os.defpath}, reactor=reactor)


class DeployedSSHTest(DeployedSSHBase):
    # -- the start-up sweep ----------------------------------------------------

    @defer.inlineCallbacks
    def test_stale_sftp_temp_file_removed_at_start_current_run_kept(self) -> Any:
        # SFTP uploads are unnamed files where the filesystem has O_TMPFILE (nothing
        # to leave behind); elsewhere they are named temporary files, swept at start.
        self.patch(Jail, "use_tmpfile", False)
        first = yield self.serve()

        def half_upload() -> tuple[paramiko.SSHClient, Any]:
            client = self.connect()
            remote = client.open_sftp().open("big.bin", "wb")
            remote.write(b"x" * 50_000)
            remote.flush()
            return client, remote

        client, _ = yield in_thread(half_upload)
        [stale] = [n for n in os.listdir(self.root) if TEMP_RE.match(n)]
        # What kill -9 leaves behind: the temporary file stays.  (Stopping the
        # service cleanly removes it, so keep a link to it and put it back.)
        aside = os.path.join(self.tmp, "aside")
        os.link(os.path.join(self.root, stale), aside)
        client.close()
        yield first.stop()
        # The session's own clean-up removes the file in a worker thread: wait for
        # it, or it could remove the copy put back below.
        for _ in range(500):
            if stale not in os.listdir(self.root):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertNotIn(stale, os.listdir(self.root))
        os.rename(aside, os.path.join(self.root, stale))

        second = self.build()
        run_id = second.service.getServiceNamed("uploads").uploads.run_id
        self.assertNotIn(f"-{run_id}-", stale)
        current = temp_name("current.bin", run_id)  # this run's: must survive the sweep
        open(os.path.join(self.root, current), "w").close()
        yield self.serve(second)
        removed = yield second.service.getServiceNamed("uploads").cleaned
        self.assertEqual(removed, [os.path.join(self.root, stale)])
        self.assertEqual(sorted(os.listdir(self.root)), [current])

        def upload() -> list[str]:
            client = self.connect()
            try:
                with client.open_sftp().open("big.bin", "wb") as remote:
                    remote.write(b"y" * 1000)
                    remote.flush()
                    return os.listdir(self.root)
            finally:
                client.close()

        during = yield in_thread(upload)
        [spooling] = [n for n in during if n not in (current,) and TEMP_RE.match(n)]
        self.assertIn(f"-{run_id}-", spooling)  # the SFTP door uses the sweep's run token
        with open(os.path.join(self.root, "big.bin"), "rb") as f:
            self.assertEqual(f.read(), b"y" * 1000)

    @defer.inlineCallbacks
    def test_sweep_covers_the_users_own_roots(self) -> Any:
        jail = os.path.join(self.tmp, "jail")
        os.makedirs(os.path.join(jail, "sub"))
        self.patch(sys, "stdin", io.StringIO("other-pass\n"))
        self.assertEqual(cli(["useradd", "jailed", "--password-stdin", "--cost", "4",
                              "--root", jail, "--data-dir", self.data]), 0)
        stale = os.path.join(jail, "sub", temp_name("put.bin", "0badf00d"))
        open(stale, "w").close()
        server = yield self.serve()
        removed = yield server.service.getServiceNamed("uploads").cleaned
        self.assertEqual(removed, [stale])

    # -- the shell ---------------------------------------------------------------

    def shell(self, keys: list[tuple[bytes, bytes]]) -> defer.Deferred:
        """Over a pty, send each key string once its marker appears (after the
        previous one); returns the output from the first marker on."""
        def run() -> bytes:
            client = self.connect()
            try:
                chan = client.invoke_shell(width=100, height=30)
                chan.settimeout(10)
                seen, start, pos = b"", None, 0
                for marker, keystrokes in keys:
                    while marker not in seen[pos:]:
                        data = chan.recv(4096)
                        if not data:
                            raise AssertionError(f"closed before {marker!r}: {seen!r}")
                        seen += data
                    pos = seen.index(marker, pos) + len(marker)
                    start = pos if start is None else start
                    if keystrokes:
                        chan.send(keystrokes)
                return seen[start:]
            finally:
                client.close()

        return in_thread(run)

    @defer.inlineCallbacks
    def test_upload_in_the_shell_is_refused_and_leaves_nothing(self) -> Any:
        yield self.serve()
        mac = "ab" * 32
        seen = yield self.shell([
            (b"cmdserver> ", f"upload up.bin 5 {mac}\r".encode()),
            (b"cmdserver> ", b"ping\r"),
            (b"pong", b""),
        ])
        self.assertIn(f"upload up.bin 5 {mac}\r\n".encode() + SHELL_UPLOAD_ERROR
                      + b"\r\ncmdserver> ping", seen)
        self.assertNotIn(b"Ready", seen)
        self.assertEqual(os.listdir(self.root), [])

    @defer.inlineCallbacks
    def test_upload_in_a_shell_without_pty_is_refused(self) -> Any:
        yield self.serve()

        def run() -> tuple[bytes, bytes, int]:
            client = self.connect()
            try:
                transport = client.get_transport()
                assert transport is not None
                chan = transport.open_session()
                chan.settimeout(10)
                chan.invoke_shell()
                chan.sendall(f"upload up.bin 5 {'ab' * 32}\nhello\n".encode())
                chan.shutdown_write()
                status = chan.recv_exit_status()
                return chan.makefile().read(), chan.makefile_stderr().read(), status
            finally:
                client.close()

        out, err, status = yield in_thread(run)
        self.assertEqual((out, err, status),
                         (b"", SHELL_UPLOAD_ERROR + b"\nCommand not found.\n", 1))
        self.assertEqual(os.listdir(self.root), [])

    @defer.inlineCallbacks
    def test_utf8_typed_at_the_prompt(self) -> Any:
        yield self.serve()
        content = b"accented\n"
        with open(os.path.join(self.root, "café.txt"), "wb") as f:
            f.write(content)
        seen = yield self.shell([
            (b"cmdserver> ", "comphash café.txt\r".encode()),
            (b"cmdserver> ", b"exit\r"),
            (b"bye !", b""),
        ])
        self.assertIn(f"File hash is : {hashlib.sha256(content).hexdigest()}".encode(), seen)

    # -- OpenSSH clients -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_openssh_exec_with_the_users_file(self) -> Any:
        if SSH is None:
            raise unittest.SkipTest("OpenSSH client not installed")
        yield self.serve()
        out, err, status = yield self.openssh(SSH, "ops@127.0.0.1", "ping")
        self.assertEqual((out, err, status), (b"pong\n", b"", 0))
        out, err, status = yield self.openssh(SSH, "ops@127.0.0.1", "ls", "..")
        self.assertEqual((out, err, status), (b"", b"Error: path outside allowed roots\n", 1))
        # With a pty (-tt) the output lines end with CR LF, as a terminal expects.
        out, err, status = yield self.openssh(SSH, "-tt", "ops@127.0.0.1", "ping")
        self.assertEqual((out, status), (b"pong\r\n", 0))

    @defer.inlineCallbacks
    def test_openssh_sftp_batch(self) -> Any:
        if SFTP is None:
            raise unittest.SkipTest("OpenSSH sftp not installed")
        yield self.serve()
        local = os.path.join(self.tmp, "local.bin")
        payload = os.urandom(200_000)
        with open(local, "wb") as f:
            f.write(payload)
        os.symlink(self.tmp, os.path.join(self.root, "out"))  # a symlink that leads out
        fetched = os.path.join(self.tmp, "fetched.bin")
        leaked = os.path.join(self.tmp, "leaked")
        batch = os.path.join(self.tmp, "batch")
        with open(batch, "w") as f:
            f.write(f"mkdir up\nput {local} up/data.bin\nls up\n"
                    f"rename up/data.bin up/renamed.bin\nget up/renamed.bin {fetched}\n"
                    f"ls -1 up\nrm up/renamed.bin\nrmdir up\n"
                    # '-': a failing command does not end the batch.
                    f"-get /etc/hostname {leaked}\n-get out/local.bin {leaked}\n"
                    f"-put {local} ../out/escape.bin\n-ls /etc\n")
        out, err, status = yield self.openssh(SFTP, "-b", batch, "ops@127.0.0.1")
        self.assertEqual(status, 0, err)
        self.assertIn(b"up/data.bin", out)
        self.assertIn(b"up/renamed.bin", out)
        with open(fetched, "rb") as f:
            self.assertEqual(f.read(), payload)
        self.assertEqual(os.listdir(self.root), ["out"])
        self.assertFalse(os.path.exists(leaked))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "escape.bin")))
        # sftp stats a path before get and ls, and calls a refused stat "not found";
        # the paths it names are the client's: the root is /.
        self.assertEqual(err.decode().splitlines(), [
            'File "/etc/hostname" not found.',
            'File "/out/local.bin" not found.',
            'dest open "/../out/escape.bin": Permission denied',
            'Can\'t ls: "/etc" not found'])
        # Without '-', a refused path fails the batch (exit status 1).
        with open(batch, "w") as f:
            f.write("mkdir out/made\nls\n")
        out, err, status = yield self.openssh(SFTP, "-b", batch, "ops@127.0.0.1")
        self.assertEqual(status, 1)
        self.assertIn(b"Permission denied", err)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "made")))

    @defer.inlineCallbacks
    def test_openssh_sftp_put_and_chmod_never_widen_a_file(self) -> Any:
        if SFTP is None:
            raise unittest.SkipTest("OpenSSH sftp not installed")
        yield self.serve()
        local = os.path.join(self.tmp, "script.sh")
        with open(local, "wb") as script:
            script.write(b"#!/bin/sh\n")
        os.chmod(local, 0o755)
        batch = os.path.join(self.tmp, "batch")

        def mode(name: str) -> int:
            return stat.S_IMODE(os.stat(os.path.join(self.root, name)).st_mode)

        # sftp asks for the local file's mode on open; -p also sets it (FSETSTAT).
        for command in ("put", "put -p"):
            with open(batch, "w") as f:
                f.write(f"{command} {local} script.sh\n")
            out, err, status = yield self.openssh(SFTP, "-b", batch, "ops@127.0.0.1")
            self.assertEqual((err, status), (b"", 0))
            self.assertEqual(mode("script.sh"), 0o600, command)
        # chmod succeeds and narrows; it never widens a file beyond 0600.
        for asked, expected in (("755", 0o600), ("666", 0o600), ("400", 0o400)):
            with open(batch, "w") as f:
                f.write(f"chmod {asked} script.sh\n")
            out, err, status = yield self.openssh(SFTP, "-b", batch, "ops@127.0.0.1")
            self.assertEqual((err, status), (b"", 0))
            self.assertEqual(mode("script.sh"), expected, asked)
