"""One users file serves every door: the real makeService, a real users file, paramiko."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import socket
import sys

import paramiko
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from cmdserver.cli import main as cli
from tests.end_to_end.support import LineClient, RunningService, in_thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SharedCredentialsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[override]  # trial waits on a returned Deferred
        self.tmp = os.path.abspath(self.mktemp())
        data = os.path.join(self.tmp, "data")
        self.jail = os.path.join(self.tmp, "ops-jail")
        os.makedirs(self.jail)
        with open(os.path.join(self.jail, "only-ops.txt"), "w") as f:
            f.write("x")
        self.key = new_key()
        pub = os.path.join(self.tmp, "ops.pub")
        with open(pub, "w") as f:
            f.write(f"ssh-ed25519 {self.key.get_base64()} ops@test\n")
        self.patch(sys, "stdin", io.StringIO("s3cret-pass\n"))
        self.assertEqual(cli(["useradd", "ops", "--password-stdin", "--cost", "4",
                              "--root", self.jail, "--data-dir", data]), 0)
        self.assertEqual(cli(["addkey", "ops", pub, "--data-dir", data]), 0)
        self.server = RunningService(
            self.tmp, "--ssh", f"tcp:{free_port()}:interface=127.0.0.1",
            "--line-auth", "required", "--bcrypt-cost", "4")
        yield self.server.start()
        self.addCleanup(self.server.stop)

    def ssh(self, **auth) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        host = self.server.ports[1].getHost()
        client.connect(host.host, host.port, username="ops", allow_agent=False,
                       look_for_keys=False, timeout=10, **auth)
        return client

    def exec(self, client: paramiko.SSHClient, command: str) -> tuple[int, str, str]:
        _, out, err = client.exec_command(command, timeout=10)
        status = out.channel.recv_exit_status()
        return status, out.read().decode(), err.read().decode()

    def test_password_on_ssh_uses_the_users_file(self):
        def session():
            client = self.ssh(password="s3cret-pass")
            try:
                return self.exec(client, "whoami"), self.exec(client, "ls")
            finally:
                client.close()

        d = in_thread(session)
        d.addCallback(self.assertEqual,
                      ((0, "ops\n", ""), (0, "only-ops.txt\n", "")))
        return d

    def test_key_file_on_ssh(self):
        def session():
            client = self.ssh(pkey=self.key)
            try:
                return self.exec(client, "comphash ../data/users")
            finally:
                client.close()

        d = in_thread(session)
        d.addCallback(self.assertEqual, (1, "", "Error: path outside allowed roots\n"))
        return d

    def test_wrong_password_on_ssh(self):
        def session():
            try:
                self.ssh(password="wrong")
            except paramiko.AuthenticationException:
                return "refused"
            return "accepted"

        return in_thread(session).addCallback(self.assertEqual, "refused")

    def upload_over_ssh(self, data: bytes, send: bytes, name: str = "up.bin",
                        key: bytes | None = None):
        from cmdserver.commands.upload.key import read_key_file

        key = key or read_key_file(os.path.join(self.tmp, "data", "hmac.key"))
        mac = hmac.new(key, data, hashlib.sha256).hexdigest()

        def session():
            client = self.ssh(pkey=self.key)
            try:
                stdin, out, err = client.exec_command(f"upload {name} {len(data)} {mac}",
                                                      timeout=30)
                stdin.write(send)
                stdin.channel.shutdown_write()
                status = out.channel.recv_exit_status()
                return status, out.read().decode(), err.read().decode()
            finally:
                client.close()

        return in_thread(session)

    @defer.inlineCallbacks
    def test_upload_over_ssh_exec(self):
        data = os.urandom(3 << 20)  # several SSH windows: back-pressure is exercised
        status, out, err = yield self.upload_over_ssh(data, data)
        self.assertEqual((status, err), (0, ""))
        digest = hashlib.sha256(data).hexdigest()
        self.assertEqual(out, f"Ready for {len(data)} bytes\nUpload OK up.bin {len(data)} "
                              f"sha256={digest}\n")
        with open(os.path.join(self.jail, "up.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def test_upload_over_ssh_with_short_stdin_leaves_nothing(self):
        data = os.urandom(100_000)
        status, out, err = yield self.upload_over_ssh(data, data[:1000])
        self.assertEqual(status, 1)
        self.assertEqual(err, "Error: upload incomplete: the input ended after 1000 of "
                              "100000 bytes, upload discarded\n")
        # The worker thread removes the temporary file just after the answer.
        for _ in range(500):
            if sorted(os.listdir(self.jail)) == ["only-ops.txt"]:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(sorted(os.listdir(self.jail)), ["only-ops.txt"])

    @defer.inlineCallbacks
    def test_a_users_own_upload_key_replaces_the_servers(self):
        from cmdserver.auth.credentials import ReloadService
        from cmdserver.auth.users import UserStore

        own = UserStore(os.path.join(self.tmp, "data")).ensure_hmac_key("ops")
        [reloader] = [s for s in self.server.service if isinstance(s, ReloadService)]
        yield reloader.credentials.reload()
        data = b"signed with the user's own key"
        status, out, err = yield self.upload_over_ssh(data, data, "theirs.txt")
        self.assertEqual(err, "Error: HMAC mismatch, upload discarded\n")
        status, out, err = yield self.upload_over_ssh(data, data, "theirs.txt", key=own)
        self.assertEqual(status, 0, err)
        self.assertTrue(out.endswith(f"Upload OK theirs.txt {len(data)} "
                                     f"sha256={hashlib.sha256(data).hexdigest()}\n"))

    @defer.inlineCallbacks
    def test_upload_client_logs_in_when_the_door_requires_it(self):
        from cmdserver.cli.upload import UploadFailed, upload
        from cmdserver.commands.upload.key import read_key_file

        key = read_key_file(os.path.join(self.tmp, "data", "hmac.key"))
        path = os.path.join(self.tmp, "report.txt")
        with open(path, "wb") as f:
            f.write(b"report\n")
        host, port = self.server.address

        def attempt(login):
            try:
                return upload(path, "report.txt", key, host, port, timeout=30,
                              login=login)[0]
            except UploadFailed as e:
                return str(e)

        self.assertEqual((yield in_thread(attempt, None)), "Error: login required")
        self.assertEqual((yield in_thread(attempt, ("ops", "wrong"))), "Error: login failed")
        self.assertEqual(os.listdir(self.jail), ["only-ops.txt"])
        answer = yield in_thread(attempt, ("ops", "s3cret-pass"))
        self.assertTrue(answer.startswith("Upload OK report.txt 7 mac=hmac-sha256:"), answer)
        with open(os.path.join(self.jail, "report.txt"), "rb") as got:
            self.assertEqual(got.read(), b"report\n")

    def test_same_user_on_the_line_door(self):
        def session():
            c = LineClient(self.server.address)
            try:
                return [c.ask("ls"), c.ask("login ops s3cret-pass"), c.ask("ls")]
            finally:
                c.close()

        def check(answers):
            self.assertEqual(answers[0], ["Error: login required"])
            self.assertEqual(answers[2], ["only-ops.txt"])

        return in_thread(session).addCallback(check)



def new_key() -> paramiko.Ed25519Key:
    """A fresh Ed25519 key for this test run: no key material lives in the tree."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode()
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem))
