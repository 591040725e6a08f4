"""One audit trail, every door: the real service (makeService, a real users file) on
loopback port 0, driven by a socket client, paramiko, OpenSSH's ``sftp -b`` and the
PB client; then DATA-DIR/audit.log itself is read back.

Each test checks the records it caused: door, user, session id and outcome; the
records of one connection share a session id, two connections have different ones.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
from collections import defaultdict
from typing import Any

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from cmdserver import client
from cmdserver.cli import main as cli
from tests.end_to_end.support import LineClient, RunningService, in_thread

PASSWORD = "audit-pass"
LOCAL = "tcp:0:interface=127.0.0.1"
SFTP = shutil.which("sftp")


class AuditTrailTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.tmp = os.path.abspath(self.mktemp())
        data = os.path.join(self.tmp, "data")
        self.jail = os.path.join(self.tmp, "jail")
        os.makedirs(self.jail)
        with open(os.path.join(self.jail, "a.txt"), "wb") as f:
            f.write(b"hello audit\n")
        private = Ed25519PrivateKey.generate()
        self.pem = private.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption())
        pub = os.path.join(self.tmp, "ops.pub")
        with open(pub, "wb") as f:
            f.write(private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH))
        self.patch(sys, "stdin", io.StringIO(f"{PASSWORD}\n"))
        self.assertEqual(cli(["useradd", "ops", "--password-stdin", "--cost", "4",
                              "--root", self.jail, "--data-dir", data]), 0)
        self.assertEqual(cli(["addkey", "ops", pub, "--data-dir", data]), 0)
        self.server = RunningService(self.tmp, "--ssh", LOCAL, "--pb", LOCAL,
                                     "--line-auth", "required", "--bcrypt-cost", "4")
        yield self.server.start()
        self.ports = {door.door: port.getHost().port
                      for door, port in zip(self.server.service.doors, self.server.ports,
                                            strict=True)}
        self.stopped = False
        self.addCleanup(self.stop)

    def stop(self) -> defer.Deferred:
        if self.stopped:
            return defer.succeed(None)
        self.stopped = True
        return self.server.stop()

    @defer.inlineCallbacks
    def records(self) -> Any:
        """Every record of DATA-DIR/audit.log, once the service has stopped (and
        written its last batch)."""
        yield self.stop()
        with open(os.path.join(self.server.data_dir, "audit.log"), encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def sessions(self, records: list[dict], door: str) -> list[list[dict]]:
        """The records of each session opened on ``door``, in order of their start."""
        by_session: dict[str, list[dict]] = defaultdict(list)
        for r in records:
            by_session[r["session"]].append(r)
        return [by_session[r["session"]] for r in records
                if r["event"] == "session-start" and r["door"] == door]

    def summary(self, session: list[dict]) -> list[tuple]:
        return [(r["event"], r["door"], r["user"], r["command"], r["outcome"])
                for r in session]

    def check_session(self, session: list[dict], peer_host: str = "127.0.0.1") -> None:
        """One id for every record, a start and an end, the peer on every record."""
        self.assertEqual(len({r["session"] for r in session}), 1)
        self.assertRegex(session[0]["session"], r"^[0-9a-f]{12,}$")
        self.assertEqual((session[0]["event"], session[-1]["event"]),
                         ("session-start", "session-end"))
        self.assertEqual({r["peer"].rsplit(":", 1)[0] for r in session}, {peer_host})

    # -- the line door ---------------------------------------------------------

    @defer.inlineCallbacks
    def test_line_door(self) -> Any:
        address = ("127.0.0.1", self.ports["line"])

        def first() -> list[list[str]]:
            c = LineClient(address)
            try:
                return [c.ask("ls"), c.ask("login ops wrong"),
                        c.ask(f"login ops {PASSWORD}"), c.ask("ping"), c.ask("exit")]
            finally:
                c.close()

        def second() -> list[str]:
            c = LineClient(address)
            try:
                return c.ask("ping")
            finally:
                c.close()

        answers = yield in_thread(first)
        self.assertEqual(answers, [["Error: login required"], ["Error: login failed"],
                                   ["Logged in as ops"], ["pong"], ["bye !"]])
        self.assertEqual((yield in_thread(second)), ["pong"])
        records = yield self.records()
        one, two = self.sessions(records, "line")
        for session in (one, two):
            self.check_session(session)
        self.assertNotEqual(one[0]["session"], two[0]["session"])
        self.assertEqual(self.summary(one), [
            ("session-start", "line", "anonymous", None, "ok"),
            ("command", "line", "anonymous", "ls", "refused"),
            ("penalty", "line", "ops", None, "penalised"),  # the address: 1 s
            ("login", "line", "ops", None, "failed"),
            ("command", "line", "anonymous", "login", "error"),
            ("login", "line", "ops", None, "ok"),
            ("command", "line", "ops", "login", "ok"),
            ("command", "line", "ops", "ping", "ok"),
            ("command", "line", "ops", "exit", "ok"),
            ("session-end", "line", "ops", None, "ok"),
        ])
        self.assertEqual([r["args"] for r in one if r["event"] == "login"],
                         [{"method": "password"}] * 2)
        self.assertEqual(one[-1]["result"], {"commands": 4, "file_operations": 0,
                                             "login_failures": 1})
        self.assertEqual(self.summary(two), [
            ("session-start", "line", "anonymous", None, "ok"),
            ("command", "line", "anonymous", "ping", "ok"),
            ("session-end", "line", "anonymous", None, "ok"),
        ])
        self.assertNotIn(PASSWORD, json.dumps(records))
        self.assertNotIn("wrong", json.dumps(records))

    # -- the SSH door: exec, shell and SFTP on one connection --------------------

    def ssh(self, password: str) -> paramiko.SSHClient:
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        c.connect("127.0.0.1", self.ports["ssh"], username="ops", password=password,
                  allow_agent=False, look_for_keys=False, timeout=10)
        return c

    @defer.inlineCallbacks
    def test_ssh_door(self) -> Any:
        data = os.urandom(70_000)  # a few SFTP writes

        def refused() -> str:
            try:
                self.ssh("wrong")
            except paramiko.AuthenticationException:
                return "refused"
            return "accepted"

        def session() -> tuple:
            t = paramiko.Transport(("127.0.0.1", self.ports["ssh"]))
            try:
                t.start_client(timeout=10)
                with self.assertRaises(paramiko.BadAuthenticationType):
                    t.auth_none("ops")  # the 'none' probe is no login attempt
                t.auth_password("ops", PASSWORD)
                chan = t.open_session()
                chan.exec_command("ping")
                exec_out = chan.makefile("rb").read()
                chan = t.open_session()
                chan.invoke_shell()  # no pty: the shell reads command lines
                chan.sendall(b"whoami\n")
                chan.shutdown_write()
                shell_out = b""
                while chunk := chan.recv(4096):
                    shell_out += chunk
                sftp = paramiko.SFTPClient.from_transport(t)
                assert sftp is not None
                sftp.mkdir("d")
                sftp.putfo(io.BytesIO(data), "d/up.bin")
                got = io.BytesIO()
                sftp.getfo("d/up.bin", got)
                sftp.rename("d/up.bin", "d/moved.bin")
                sftp.remove("d/moved.bin")
                sftp.close()
                return exec_out, shell_out, got.getvalue()
            finally:
                t.close()

        self.assertEqual((yield in_thread(refused)), "refused")
        exec_out, shell_out, got = yield in_thread(session)
        self.assertEqual((exec_out, shell_out, got == data), (b"pong\n", b"ops\n", True))
        records = yield self.records()
        failed, used = self.sessions(records, "ssh")
        for session_records in (failed, used):
            self.check_session(session_records)
        self.assertNotEqual(failed[0]["session"], used[0]["session"])
        self.assertEqual(self.summary(failed), [
            ("session-start", "ssh", "anonymous", None, "ok"),
            ("penalty", "ssh", "ops", None, "penalised"),  # the address: 1 s
            ("login", "ssh", "ops", None, "failed"),
            ("session-end", "ssh", "anonymous", None, "ok"),
        ])
        self.assertEqual(self.summary(used), [
            ("session-start", "ssh", "anonymous", None, "ok"),
            ("login", "ssh", "ops", None, "ok"),
            ("command", "ssh", "ops", "ping", "ok"),
            ("command", "ssh", "ops", "whoami", "ok"),
            ("file", "sftp", "ops", "mkdir", "ok"),
            ("file", "sftp", "ops", "put", "ok"),
            ("file", "sftp", "ops", "get", "ok"),
            ("file", "sftp", "ops", "rename", "ok"),
            ("file", "sftp", "ops", "rm", "ok"),
            ("session-end", "ssh", "ops", None, "ok"),
        ])
        files = [r for r in used if r["event"] == "file"]
        self.assertEqual([r["args"] for r in files], [
            {"path": "d"}, {"path": "d/up.bin"}, {"path": "d/up.bin"},
            {"path": "d/up.bin", "to": "d/moved.bin"}, {"path": "d/moved.bin"}])
        self.assertEqual([r["result"] for r in files if r["command"] in ("put", "get")],
                         [{"bytes": len(data)}, {"bytes": len(data)}])
        self.assertEqual([r["args"] for r in used if r["event"] == "login"],
                         [{"method": "password"}])
        self.assertEqual(used[-1]["result"], {"commands": 2, "file_operations": 5,
                                              "login_failures": 0})
        self.assertNotIn(self.jail, json.dumps(records))

    @defer.inlineCallbacks
    def test_openssh_sftp_by_key(self) -> Any:
        if SFTP is None:
            raise unittest.SkipTest("OpenSSH sftp not installed")
        key = os.path.join(self.tmp, "id_ed25519")
        with open(key, "wb") as f:
            f.write(self.pem)
        os.chmod(key, stat.S_IRUSR | stat.S_IWUSR)
        local = os.path.join(self.tmp, "local.txt")
        with open(local, "wb") as f:
            f.write(b"0123456789")
        batch = os.path.join(self.tmp, "batch")
        with open(batch, "w") as f:
            f.write(f"mkdir up\nput {local} up/t.txt\nget up/t.txt {local}.back\n"
                    "rename up/t.txt up/u.txt\nrm up/u.txt\nls\n")
        options = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                   "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
                   "-o", "LogLevel=ERROR", "-i", key, "-P", str(self.ports["ssh"])]
        out, err, status = yield utils.getProcessOutputAndValue(
            SFTP, [*options, "-b", batch, "ops@127.0.0.1"], env={"PATH": os.defpath},
            reactor=reactor)
        self.assertEqual(status, 0, err)
        records = yield self.records()
        [session] = self.sessions(records, "ssh")
        self.check_session(session)
        logins = [(r["user"], r["args"], r["outcome"]) for r in session if r["event"] == "login"]
        self.assertEqual(logins, [("ops", {"method": "key"}, "ok")])  # none, probe: not logins
        files = [(r["door"], r["user"], r["command"], r["args"], r["outcome"])
                 for r in session if r["event"] == "file" and r["command"] != "ls"]
        # OpenSSH names every path absolutely (after realpath): the record does not.
        self.assertEqual(files, [
            ("sftp", "ops", "mkdir", {"path": "up"}, "ok"),
            ("sftp", "ops", "put", {"path": "up/t.txt"}, "ok"),
            ("sftp", "ops", "get", {"path": "up/t.txt"}, "ok"),
            ("sftp", "ops", "rename", {"path": "up/t.txt", "to": "up/u.txt"}, "ok"),
            ("sftp", "ops", "rm", {"path": "up/u.txt"}, "ok"),
        ])
        self.assertIn(("ls", {"path": "."}),
                      [(r["command"], r["args"]) for r in session if r["event"] == "file"])
        self.assertNotIn(self.jail, json.dumps(records))

    # -- the PB door -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_pb_door(self) -> Any:
        port = self.ports["pb"]
        with self.assertRaises(client.LoginError):
            yield client.connect("127.0.0.1", port, "ops", "wrong")
        s = yield client.connect("127.0.0.1", port, "ops", PASSWORD)
        self.assertEqual((yield s.ping()), "pong")
        self.assertEqual((yield s.ls()), ["a.txt"])
        yield s.close()
        records = yield self.records()
        failed, used = self.sessions(records, "pb")
        for session in (failed, used):
            self.check_session(session)
        self.assertNotEqual(failed[0]["session"], used[0]["session"])
        self.assertEqual(self.summary(failed), [
            ("session-start", "pb", "anonymous", None, "ok"),
            ("penalty", "pb", "ops", None, "penalised"),  # the address: 1 s
            ("login", "pb", "ops", None, "failed"),
            ("session-end", "pb", "anonymous", None, "ok"),
        ])
        self.assertEqual(self.summary(used), [
            ("session-start", "pb", "anonymous", None, "ok"),
            ("login", "pb", "ops", None, "ok"),
            ("command", "pb", "ops", "ping", "ok"),
            ("command", "pb", "ops", "ls", "ok"),
            ("session-end", "pb", "ops", None, "ok"),
        ])
        self.assertEqual(failed[2]["args"], {"method": "password"})
        self.assertEqual((failed[1]["args"], failed[1]["result"]),
                         ({"source": "127.0.0.1"}, {"seconds": 1.0, "failures": 1}))
        self.assertNotIn(PASSWORD, json.dumps(records))
