"""What fleet tools (Ansible, Fabric, parallel-ssh, ``xargs ssh``) meet on the SSH door:
error lines on a terminal, a shell separator in an exec line, and the main log of
one ``ssh host ping``.  The service as deployed, driven by paramiko and OpenSSH."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater

from cmdserver.doors.ssh.session import ONE_COMMAND
from tests.end_to_end.support import LineClient, RunningService, in_thread
from tests.end_to_end.test_ssh_deployed import SSH, DeployedSSHBase
from tests.helpers import capture_log

OUTSIDE = b"Error: path outside allowed roots"


class FleetEdgesTest(DeployedSSHBase):
    def exec_(self, command: str, pty: bool = False) -> defer.Deferred:
        """One exec channel (with a pty if asked): (stdout, stderr, status)."""
        def run() -> tuple[bytes, bytes, int]:
            client = self.connect()
            try:
                chan = client.get_transport().open_session()  # type: ignore[union-attr]
                chan.settimeout(10)
                if pty:
                    chan.get_pty()
                chan.exec_command(command)
                status = chan.recv_exit_status()
                return chan.makefile().read(), chan.makefile_stderr().read(), status
            finally:
                client.close()

        return in_thread(run)

    # -- a terminal has one output stream ----------------------------------

    @defer.inlineCallbacks
    def test_errors_come_on_the_terminal_with_a_pty(self) -> Any:
        yield self.serve()
        out, err, status = yield self.exec_("ls ..", pty=True)
        self.assertEqual((out, err, status), (OUTSIDE + b"\r\n", b"", 1))
        out, err, status = yield self.exec_("nosuch", pty=True)
        self.assertEqual((out, err, status), (b"Command not found.\r\n", b"", 1))
        # Without a terminal, stderr stays apart.
        out, err, status = yield self.exec_("ls ..")
        self.assertEqual((out, err, status), (b"", OUTSIDE + b"\n", 1))

    @defer.inlineCallbacks
    def test_openssh_tt_shows_the_error_on_stdout(self) -> Any:
        yield self.serve()
        out, err, status = yield self.openssh(SSH, "-tt", "ops@127.0.0.1", "ls ..")
        self.assertEqual((status, out), (1, OUTSIDE + b"\r\n"), err)

    # -- one command per exec ----------------------------------------------

    @defer.inlineCallbacks
    def test_shell_separators_are_refused_in_one_line(self) -> Any:
        yield self.serve()
        for line in ("stats; ping", "ping && ping", "ping || ping", "ls | ls", "ping\nping",
                     "ping;", "comphash a;b"):
            out, err, status = yield self.exec_(line)
            self.assertEqual((out, err, status), (b"", ONE_COMMAND.encode() + b"\n", 1), line)
        out, err, status = yield self.exec_("ping && ping", pty=True)
        self.assertEqual((out, err, status), (ONE_COMMAND.encode() + b"\r\n", b"", 1))

    @defer.inlineCallbacks
    def test_quoted_separators_are_part_of_a_word(self) -> Any:
        yield self.serve()
        for name in ("a;b", "x|y", "p&&q"):
            with open(os.path.join(self.root, name), "w") as f:
                f.write("x\n")
        for line in ('comphash "a;b"', "comphash 'x|y'", "comphash a\\;b", 'comphash "p&&q"'):
            out, err, status = yield self.exec_(line)
            self.assertEqual((status, err), (0, b""), line)
            self.assertTrue(out.startswith(b"File hash is : "), out)

    @defer.inlineCallbacks
    def test_the_line_door_keeps_its_answer(self) -> Any:
        server = RunningService(self.tmp, "--line", "tcp:0:interface=127.0.0.1",
                                "--ssh", "tcp:0:interface=127.0.0.1", "--bcrypt-cost", "4")
        yield server.start()
        self.addCleanup(server.stop)

        def ask() -> list[str]:
            client = LineClient(server.address)
            try:
                return client.ask("ping; stats") + client.ask("ping")
            finally:
                client.close()

        self.assertEqual((yield in_thread(ask)), ["Command not found.", "pong"])

    # -- the main log ------------------------------------------------------

    @defer.inlineCallbacks
    def one_ping_logs(self, run: Any) -> Any:
        """The main log's events while one client runs ``ping`` and leaves."""
        events = capture_log(self)  # before the door starts, as twistd's log file is
        yield self.serve()
        start = len(events)
        yield run()
        for _ in range(500):  # the logout comes as the server sees the connection go
            if any("logged out" in str(e.get("log_format")) for e in events[start:]):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        yield deferLater(reactor, 0.05, lambda: None)
        return [e for e in events[start:] if e.get("log_namespace") != "cmdserver.audit"]

    def assert_two_info_lines(self, events: list[dict]) -> None:
        shown = [(e.get("log_namespace"), e["log_level"].name, e.get("log_format"))
                 for e in events]
        self.assertEqual([level for _, level, _ in shown], ["info", "info"], shown)
        self.assertIn("logged in", shown[0][2])
        self.assertIn("logged out", shown[1][2])

    @defer.inlineCallbacks
    def test_one_openssh_ping_logs_a_start_and_an_end(self) -> Any:
        if SSH is None:
            self.skipTest("OpenSSH client not installed")

        @defer.inlineCallbacks
        def run() -> Any:
            out, err, status = yield self.openssh(SSH, "ops@127.0.0.1", "ping")
            self.assertEqual((out, status), (b"pong\n", 0), err)

        self.assert_two_info_lines((yield self.one_ping_logs(run)))

    @defer.inlineCallbacks
    def test_one_paramiko_ping_logs_a_start_and_an_end(self) -> Any:
        def run() -> defer.Deferred:
            return self.exec_("ping").addCallback(self.assertEqual, (b"pong\n", b"", 0))

        self.assert_two_info_lines((yield self.one_ping_logs(run)))

    @defer.inlineCallbacks
    def test_sftp_packets_are_not_logged_one_by_one(self) -> Any:
        def run() -> defer.Deferred:
            def transfer() -> None:
                client = self.connect()
                try:
                    sftp = client.open_sftp()
                    for i in range(20):
                        with sftp.open(f"f{i}", "wb") as f:
                            f.write(b"x")
                    sftp.listdir(".")
                    sftp.close()
                finally:
                    client.close()

            return in_thread(transfer)

        events = yield self.one_ping_logs(run)
        shown = [(e.get("log_level").name, e.get("log_format")) for e in events]
        # the login, the SFTP session, the logout: not a line per packet
        self.assertLessEqual(len(events), 4, shown)
        self.assertEqual([level for level, _ in shown if level != "info"], [], shown)

    @defer.inlineCallbacks
    def test_a_libssh2_keepalive_is_answered_without_a_log_line(self) -> Any:
        def run() -> defer.Deferred:
            def probe() -> Any:
                client = self.connect()
                try:
                    t = client.get_transport()
                    assert t is not None
                    return t.global_request("keepalive@libssh2.org", wait=True)
                finally:
                    client.close()

            return in_thread(probe).addCallback(self.assertIsNone)  # "no", as sshd says

        self.assert_two_info_lines((yield self.one_ping_logs(run)))
