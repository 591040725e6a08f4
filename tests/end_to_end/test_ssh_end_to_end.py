"""The SSH door end to end: the real service on loopback port 0, driven by paramiko
(in a thread, so the reactor keeps running) and by OpenSSH's ``ssh``/``sftp`` when
they are installed."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import socket
import stat
import tempfile
import time
from typing import Any, cast

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.checkers import InMemorySSHKeyDB, SSHPublicKeyChecker
from twisted.conch.ssh.keys import Key
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, reactor, task, threads, utils
from twisted.internet.interfaces import IReactorFromThreads
from twisted.trial import unittest

from cmdserver.auth.gate import GateSettings
from cmdserver.auth.portal import Account, Realm, build_portal
from cmdserver.commands import default_registry
from cmdserver.commands.base import Command, Context
from cmdserver.commands.lastlog import LastLog, LogSource
from cmdserver.commands.upload.spool import TEMP_RE
from cmdserver.core import CommandCore
from cmdserver.doors.ssh.door import SSHSettings, add_ssh_door
from cmdserver.doors.ssh.session import CommandSession
from cmdserver.doors.ssh.shell import PipedCommands, ShellProtocol
from cmdserver.errors import CommandError
from cmdserver.policy import Policy
from cmdserver.service import CmdServerService, Limits
from tests.helpers import OutsideTreeTempMixin, capture_audit, capture_log, commands_audited

PASSWORD = "s3cret"
# Host keys take a moment to generate (RSA 3072): make them once for the module.
_KEY_DIR = tempfile.mkdtemp(prefix="cmdserver-ssh-test-")
atexit.register(shutil.rmtree, _KEY_DIR, True)
SSH = shutil.which("ssh")
SFTP = shutil.which("sftp")


class Slow(Command):
    """A test command that runs until cancelled, and says when it was."""

    name = "slow"
    summary = "Wait until cancelled."
    usage = "slow"

    def __init__(self) -> None:
        self.cancelled: defer.Deferred = defer.Deferred()

    def run(self, ctx: Context) -> defer.Deferred:
        ctx.out.line("started")
        self.ctx = ctx
        self.running: defer.Deferred = defer.Deferred(lambda _: self.cancelled.callback(None))
        return self.running

    def shell(self) -> ShellProtocol:
        """The shell of the SSH session the command last ran in."""
        session = self.ctx.session
        assert isinstance(session, CommandSession) and session.shell is not None
        return session.shell

    def pipe(self) -> PipedCommands:
        """The piped commands (a shell without a pty) the command last ran in."""
        session = self.ctx.session
        assert isinstance(session, CommandSession) and session.pipe is not None
        return session.pipe


class LongLog(LastLog):
    """``lastlog`` whose ``tail`` prints a line, then runs for a minute."""

    name = "longlog"


def long_tail(directory: str) -> tuple[str, str]:
    """A fake ``tail`` that records its pid and never ends by itself."""
    script, pidfile = os.path.join(directory, "tail"), os.path.join(directory, "tail.pid")
    with open(script, "w") as f:
        f.write(f"#!/bin/sh\necho $$ > {pidfile}\necho first line\nexec sleep 60\n")
    os.chmod(script, 0o755)
    return script, pidfile


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Count(Command):
    """A test command that reads the exec channel's stdin and counts the bytes."""

    name = "count"
    summary = "Count the bytes on stdin."
    usage = "count"

    def run(self, ctx: Context) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        received = bytearray()
        session = cast(CommandSession, ctx.session)  # served on the SSH door only

        class Consumer:
            def data_received(self, data: bytes) -> None:
                received.extend(data)
                # Exercise back-pressure: hold the client at the window for a turn.
                session.pause_input()
                ctx.reactor.callLater(0, session.resume_input)

            def eof_received(self) -> None:
                done.callback(f"{len(received)} bytes")

        if not session.read_input(Consumer()):
            raise CommandError("no input here")
        return done


def client_key() -> tuple[paramiko.Ed25519Key, Key, bytes]:
    """A fresh Ed25519 user key: paramiko's, conch's, and the OpenSSH private file."""
    private = ed25519.Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    return (paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode())),
            Key.fromString(pem).public(), pem)


def wait_for(predicate: Any, what: str) -> defer.Deferred:
    """Poll ``predicate`` on the reactor until true (a bound, not a timing check)."""
    @defer.inlineCallbacks
    def loop() -> Any:
        for _ in range(500):
            if predicate():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"never happened: {what}")

    return loop()


class ChannelReader:
    """Reads a paramiko channel until a marker shows up; keeps all it has read."""

    def __init__(self, chan: Any) -> None:
        self.chan = chan
        self.seen = b""

    def until(self, marker: bytes) -> None:
        while marker not in self.seen:
            data = self.chan.recv(4096)
            if not data:
                raise AssertionError(f"closed before {marker!r}: {self.seen!r}")
            self.seen += data


class SSHDoorTest(OutsideTreeTempMixin, unittest.TestCase):
    def setUp(self) -> defer.Deferred:  # type: ignore[override]  # trial waits on a returned Deferred
        self.root = self.mktemp()
        os.makedirs(self.root)
        self.other_root = self.mktemp()
        os.makedirs(self.other_root)
        with open(os.path.join(self.root, "notes.txt"), "w") as f:
            f.write("hello\n")
        self.slow = Slow()
        registry = default_registry(LogSource(os.path.join(self.root, "notes.txt")))
        registry.add(self.slow)
        registry.add(Count())
        bindir = os.path.abspath(self.mktemp())
        os.makedirs(bindir)
        tail, self.tail_pidfile = long_tail(bindir)
        registry.add(LongLog(LogSource("/dev/null"), tail=tail))
        # Loopback is exempt from login penalties here: these tests are about SSH, and
        # tests/end_to_end/test_login_gate_e2e.py about the penalties.
        self.core = CommandCore(registry, Policy([self.root]), reactor,
                                gate=GateSettings(exempt=("127.0.0.0/8",)))
        self.service = CmdServerService(self.core, Limits(max_clients=20, max_per_ip=4),
                                        portal=build_portal(Realm()))
        passwords = InMemoryUsernamePasswordDatabaseDontUse()
        passwords.addUser(b"ops", PASSWORD.encode())
        passwords.addUser(b"jailed", PASSWORD.encode())
        self.service.portal.registerChecker(passwords)
        self.pkey, public, self.pem = client_key()
        self.service.portal.registerChecker(
            SSHPublicKeyChecker(InMemorySSHKeyDB({b"ops": [public]})))
        self.service.realm.lookup = lambda name: Account(
            name, (self.other_root,) if name == "jailed" else None)
        self.settings = SSHSettings(idle_timeout=60)
        self.door = add_ssh_door(self.service, "tcp:0:interface=127.0.0.1", _KEY_DIR,
                                 self.settings)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.door.listening.addCallback(self._listening)

    def _listening(self, port: Any) -> None:
        self.port = port.getHost().port

    # -- paramiko helpers (run in a thread) ---------------------------------

    def connect(self, user: str = "ops", **auth: Any) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        client.connect("127.0.0.1", port=self.port, username=user, look_for_keys=False,
                       allow_agent=False, timeout=10, banner_timeout=10, auth_timeout=10,
                       **auth)
        return client

    def transport(self) -> paramiko.Transport:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        t = paramiko.Transport(sock)
        t.start_client(timeout=10)
        return t

    def in_thread(self, f: Any, *args: Any) -> defer.Deferred:
        return threads.deferToThread(f, *args)

    def exec_(self, command: str | bytes, **auth: Any) -> defer.Deferred:
        def run() -> tuple[bytes, bytes, int]:
            client = self.connect(**(auth or {"password": PASSWORD}))
            try:
                # The stub says str; paramiko hands bytes to Channel.exec_command as they are.
                _, stdout, stderr = client.exec_command(command,  # type: ignore[arg-type]
                                                        timeout=10)
                out, err = stdout.read(), stderr.read()
                return out, err, stdout.channel.recv_exit_status()
            finally:
                client.close()

        return self.in_thread(run)

    # -- login ---------------------------------------------------------------

    @defer.inlineCallbacks
    def test_password_login_exec_ok(self) -> Any:
        out, err, status = yield self.exec_("ping")
        self.assertEqual((out, err, status), (b"pong\n", b"", 0))

    @defer.inlineCallbacks
    def test_key_login(self) -> Any:
        out, err, status = yield self.exec_("ls", pkey=self.pkey)
        self.assertEqual((out, status), (b"notes.txt\n", 0))
        out, err, status = yield self.exec_("stats", pkey=self.pkey)
        # (the first connection may not be counted out yet when the second arrives)
        self.assertRegex(out, rb"connections: ([12]) open \(ssh \1\)")

    def _login_fails(self, **auth: Any) -> defer.Deferred:
        def run() -> None:
            with self.assertRaises(paramiko.AuthenticationException):
                self.connect(**auth)

        return self.in_thread(run)

    def test_wrong_password(self) -> defer.Deferred:
        return self._login_fails(password="wrong")

    def test_unknown_user(self) -> defer.Deferred:
        return self._login_fails(user="nobody", password=PASSWORD)

    def test_key_not_on_file(self) -> defer.Deferred:
        return self._login_fails(pkey=client_key()[0])

    def test_key_of_another_user(self) -> defer.Deferred:
        return self._login_fails(user="jailed", pkey=self.pkey)

    def _three_failures_then_disconnect(self, attempt: Any) -> defer.Deferred:
        """Two failed ``attempt(transport)`` calls leave the connection up; the third
        ends it."""

        def run() -> None:
            t = self.transport()
            try:
                for _ in range(2):
                    with self.assertRaises(paramiko.AuthenticationException):
                        attempt(t)
                    self.assertTrue(t.is_active())
                with self.assertRaises(paramiko.SSHException):
                    attempt(t)  # the third failure: cut off
                for _ in range(100):
                    if not t.is_active():
                        break
                    time.sleep(0.05)
                self.assertFalse(t.is_active())
            finally:
                t.close()

        return self.in_thread(run)

    def test_three_attempts_then_disconnect(self) -> defer.Deferred:
        return self._three_failures_then_disconnect(
            lambda t: t.auth_password("ops", "wrong"))

    def test_three_key_attempts_then_disconnect(self) -> defer.Deferred:
        return self._three_failures_then_disconnect(
            lambda t: t.auth_publickey("ops", client_key()[0]))

    def test_shared_per_address_limit_counts_ssh(self) -> defer.Deferred:
        def run() -> tuple[list[bytes], bytes]:
            socks = [socket.create_connection(("127.0.0.1", self.port), timeout=10)
                     for _ in range(4)]
            try:
                banners = [s.recv(64)[:8] for s in socks]
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as fifth:
                    return banners, fifth.recv(64)
            finally:
                for s in socks:
                    s.close()

        def check(result: tuple[list[bytes], bytes]) -> None:
            banners, fifth = result
            self.assertEqual(banners, [b"SSH-2.0-"] * 4)
            self.assertEqual(fifth, b"")  # over --max-per-ip: closed before the banner
            self.assertEqual(self.core.stats.refused, 1)

        return self.in_thread(run).addCallback(check)

    # -- exec ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_exec_error_goes_to_stderr_with_status_1(self) -> Any:
        out, err, status = yield self.exec_("nosuch")
        self.assertEqual((out, err, status), (b"", b"Command not found.\n", 1))
        out, err, status = yield self.exec_("ls ..")
        self.assertEqual((err, status), (b"Error: path outside allowed roots\n", 1))

    def test_exec_stdin_reaches_a_command_that_reads_it(self) -> defer.Deferred:
        def run() -> tuple[bytes, int]:
            client = self.connect(password=PASSWORD)
            try:
                stdin, stdout, _ = client.exec_command("count", timeout=10)
                stdin.write(b"z" * 1_000_000)
                stdin.channel.shutdown_write()
                return stdout.read(), stdout.channel.recv_exit_status()
            finally:
                client.close()

        return self.in_thread(run).addCallback(self.assertEqual, (b"1000000 bytes\n", 0))

    def test_exec_on_a_pty_ends_lines_with_crlf_and_takes_ctrl_c(self) -> defer.Deferred:
        def run() -> tuple[bytes, bytes, int, bytes, int]:
            t = self.transport()
            try:
                t.auth_password("ops", PASSWORD)
                chan = t.open_session()
                chan.settimeout(10)
                chan.get_pty()
                chan.exec_command("ping")
                ping_status = chan.recv_exit_status()
                ping = chan.makefile().read()
                chan = t.open_session()
                chan.settimeout(10)
                chan.get_pty()
                chan.exec_command("slow")
                seen = b""
                while b"started\r\n" not in seen:
                    seen += chan.recv(4096)
                chan.send(b"\x03")  # Ctrl-C on the client's terminal
                status = chan.recv_exit_status()
                seen += chan.makefile().read()
                return ping, seen, status, chan.makefile_stderr().read(), ping_status
            finally:
                t.close()

        def check(result: tuple[bytes, bytes, int, bytes, int]) -> None:
            ping, seen, status, err, ping_status = result
            self.assertEqual((ping, ping_status), (b"pong\r\n", 0))
            # A terminal has one stream: the error line comes on it, as from sshd.
            self.assertEqual((seen, status, err),
                             (b"started\r\nError: cancelled\r\n", 1, b""))
            self.assertTrue(self.slow.cancelled.called)

        return self.in_thread(run).addCallback(check)

    @defer.inlineCallbacks
    def test_tcp_nodelay_on_accepted_sockets(self) -> Any:
        client = yield self.in_thread(lambda: self.connect(password=PASSWORD))
        self.addCleanup(client.close)
        [wrapper] = self.door.factory.protocols
        sock = wrapper.transport.getHandle()
        self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @defer.inlineCallbacks
    def test_exec_bad_command_lines(self) -> Any:
        out, err, status = yield self.exec_("ping\x1b[2J")
        self.assertEqual((out, err, status),
                         (b"", b"Error: control characters are not allowed in a command\n", 1))
        out, err, status = yield self.exec_("ls " + "x" * 5000)
        self.assertEqual((err, status), (b"Error: line too long (the limit is 4096 bytes)\n", 1))
        out, err, status = yield self.exec_(b"ls \xff")
        self.assertEqual((err, status), (b"Error: the command is not valid UTF-8\n", 1))
        out, err, status = yield self.exec_("ls 'unbalanced")
        self.assertEqual((err, status), (b"Error: no closing quotation\n", 1))

    @defer.inlineCallbacks
    def test_exec_streams_lastlog(self) -> Any:
        out, err, status = yield self.exec_("lastlog 5")
        self.assertEqual((out, status), (b"Begin lastlog\nhello\nEnd lastlog\n", 0))

    @defer.inlineCallbacks
    def test_exec_audited_with_user(self) -> Any:

        events = capture_audit(self)
        yield self.exec_("ping")
        audited = commands_audited(events)
        self.assertEqual([(e["user"], e["door"], e["command"]) for e in audited],
                         [("ops", "ssh", "ping")])

    @defer.inlineCallbacks
    def test_jailed_user_sees_own_roots(self) -> Any:
        open(os.path.join(self.other_root, "mine"), "w").close()
        out, _, status = yield self.exec_("ls", user="jailed", password=PASSWORD)
        self.assertEqual((out, status), (b"mine\n", 0))

    # -- shell ----------------------------------------------------------------

    def test_shell_command_and_ctrl_c(self) -> defer.Deferred:
        def run() -> tuple[str, int]:
            client = self.connect(password=PASSWORD)
            try:
                chan = client.invoke_shell(width=100, height=30)
                chan.settimeout(10)
                reader = ChannelReader(chan)
                until = reader.until

                until(b"cmdserver> ")
                chan.send(b"ping\r")
                until(b"pong\r\ncmdserver> ")
                chan.send(b"slow\r")
                until(b"started\r\n")
                chan.send(b"\x03")
                until(b"Error: cancelled\r\ncmdserver> ")
                chan.send(b"longlog 5\r")
                until(b"first line\r\n")
                with open(self.tail_pidfile) as f:
                    pid = int(f.read())
                self.assertTrue(alive(pid))
                chan.send(b"\x03")
                until(b"^C\r\nError: cancelled\r\ncmdserver> ")
                chan.send(b"exit\r")
                until(b"bye !")
                return reader.seen.decode(), chan.recv_exit_status()
            finally:
                client.close()

        def check(result: tuple[str, int]) -> defer.Deferred:
            seen, status = result
            self.assertEqual(status, 0)
            self.assertIn("ready; type 'help'", seen)
            self.assertTrue(self.slow.cancelled.called)
            with open(self.tail_pidfile) as f:
                pid = int(f.read())
            return wait_for(lambda: not alive(pid), "the lastlog child is killed")

        return self.in_thread(run).addCallback(check)

    def test_shell_keeps_what_is_typed_while_a_command_runs(self) -> defer.Deferred:
        def run() -> bytes:
            client = self.connect(password=PASSWORD)
            try:
                chan = client.invoke_shell()
                chan.settimeout(10)
                reader = ChannelReader(chan)
                until = reader.until

                until(b"cmdserver> ")
                chan.send(b"slow\r")
                until(b"started\r\n")
                chan.send("ls café\r".encode())  # typed while slow runs
                threads.blockingCallFromThread(  # the server has taken every key
                    IReactorFromThreads(reactor), wait_for,
                    lambda: len(self.slow.shell()._typeahead) == 8, "type-ahead")
                IReactorFromThreads(reactor).callFromThread(self.slow.running.callback,
                                                            "slow done")
                until("café\r\ncmdserver> ".encode())
                return reader.seen[reader.seen.index(b"started\r\n"):]
            finally:
                client.close()

        def check(seen: bytes) -> None:
            self.assertEqual(seen, "started\r\nslow done\r\ncmdserver> ls café\r\n"
                                   "Error: no such file or directory: café\r\n"
                                   "cmdserver> ".encode())

        return self.in_thread(run).addCallback(check)

    def test_shell_ctrl_d_leaves(self) -> defer.Deferred:
        def run() -> int:
            client = self.connect(password=PASSWORD)
            try:
                chan = client.invoke_shell()
                chan.settimeout(10)
                seen = b""
                while b"cmdserver> " not in seen:
                    seen += chan.recv(4096)
                chan.send(b"\x04")
                return chan.recv_exit_status()
            finally:
                client.close()

        return self.in_thread(run).addCallback(self.assertEqual, 0)

    def piped_shell(self, script: bytes, cancel_slow: bool = False) -> defer.Deferred:
        """A shell channel without a pty fed ``script`` then EOF: (stdout, stderr, status)."""
        def run() -> tuple[bytes, bytes, int]:
            t = self.transport()
            try:
                t.auth_password("ops", PASSWORD)
                chan = t.open_session()
                chan.settimeout(10)
                chan.invoke_shell()
                chan.sendall(script)
                chan.shutdown_write()
                if cancel_slow:  # EOF while slow runs: the channel waits for it
                    seen = b""
                    while b"started" not in seen:
                        seen += chan.recv(4096)
                    self.assertFalse(chan.exit_status_ready())
                    threads.blockingCallFromThread(  # the server has seen the EOF
                        IReactorFromThreads(reactor), wait_for, lambda: self.slow.pipe().ended,
                        "EOF")
                    IReactorFromThreads(reactor).callFromThread(lambda: self.slow.running.cancel())
                status = chan.recv_exit_status()
                out = b""
                while data := chan.recv(4096):
                    out += data
                return (seen if cancel_slow else b"") + out, chan.makefile_stderr().read(), status
            finally:
                t.close()

        return self.in_thread(run)

    @defer.inlineCallbacks
    def test_piped_commands_without_pty(self) -> Any:
        out, err, status = yield self.piped_shell(b"ping\r\n\nnosuch\nls\n")
        self.assertEqual((out, err, status), (b"pong\nnotes.txt\n", b"Command not found.\n", 0))
        out, err, status = yield self.piped_shell(b"ping\nls ..\n")
        self.assertEqual((err, status), (b"Error: path outside allowed roots\n", 1))
        out, err, status = yield self.piped_shell(b"exit\nping\n")
        self.assertEqual((out, err, status), (b"bye !\n", b"", 0))
        out, err, status = yield self.piped_shell(b"x" * 5000 + b"\n")
        self.assertEqual((err, status), (b"Error: line too long (the limit is 4096 bytes)\n", 1))

    @defer.inlineCallbacks
    def test_piped_commands_wait_for_the_running_one_at_eof(self) -> Any:
        out, err, status = yield self.piped_shell(b"ping\nslow\n", cancel_slow=True)
        self.assertEqual((out, err, status), (b"pong\nstarted\n", b"Error: cancelled\n", 1))

    # -- refusals ------------------------------------------------------------

    def test_forwarding_refused_and_logged(self) -> defer.Deferred:

        events = capture_log(self)

        def run() -> None:
            t = self.transport()
            try:
                t.auth_password("ops", PASSWORD)
                with self.assertRaises(paramiko.SSHException):
                    t.request_port_forward("127.0.0.1", 0)
                with self.assertRaises(paramiko.ChannelException):
                    t.open_channel("direct-tcpip", ("127.0.0.1", self.port), ("127.0.0.1", 1))
                with self.assertRaises(paramiko.SSHException):
                    t.open_session().request_x11()
                with self.assertRaises(paramiko.SSHException):
                    t.open_session().invoke_subsystem("netconf")
                chan = t.open_session()
                chan.request_forward_agent(lambda _: None)  # wants no reply
                chan.exec_command("ping")  # after the refusals, the connection still works
                self.assertEqual(chan.recv_exit_status(), 0)
            finally:
                t.close()

        def check(_: Any) -> None:
            refused = [(e["what"], e["detail"]) for e in events if "what" in e]
            self.assertEqual(refused, [
                ("global request", "tcpip-forward"), ("channel", "direct-tcpip"),
                ("session request", "x11-req"), ("subsystem", "netconf"),
                ("session request", "auth-agent-req@openssh.com")])

        return self.in_thread(run).addCallback(check)

    def test_at_most_ten_session_channels(self) -> defer.Deferred:

        events = capture_log(self)

        def run() -> None:
            t = self.transport()
            try:
                t.auth_password("ops", PASSWORD)
                channels = [t.open_session() for _ in range(10)]
                with self.assertRaises(paramiko.ChannelException):
                    t.open_session()
                channels.pop().close()  # one closed: room for one more
                chan = t.open_session()
                chan.exec_command("ping")
                self.assertEqual(chan.recv_exit_status(), 0)
            finally:
                t.close()

        def check(_: Any) -> None:
            refused = [(e["what"], e["detail"]) for e in events if "what" in e]
            self.assertEqual(refused, [("channel", "session: 10 are open already")])

        return self.in_thread(run).addCallback(check)

    def test_env_refused_beyond_a_few(self) -> defer.Deferred:

        events = capture_log(self)

        def run() -> tuple[bool, bool]:
            t = self.transport()
            try:
                t.auth_password("ops", PASSWORD)
                chan = t.open_session()
                ok_lang = _env_request(chan, "LC_ALL", "C")
                ok_path = _env_request(chan, "LD_PRELOAD", "/tmp/x.so")
                return ok_lang, ok_path
            finally:
                t.close()

        def check(result: tuple[bool, bool]) -> None:
            self.assertEqual(result, (True, False))
            refused = [(e["what"], e["detail"], e["user"]) for e in events if "what" in e]
            self.assertEqual(refused, [("env", "LD_PRELOAD", "ops")])

        return self.in_thread(run).addCallback(check)

    # -- sftp ----------------------------------------------------------------

    def sftp(self, f: Any, user: str = "ops") -> defer.Deferred:
        def run() -> Any:
            client = self.connect(user=user, password=PASSWORD)
            try:
                return f(client.open_sftp())
            finally:
                client.close()

        return self.in_thread(run)

    @defer.inlineCallbacks
    def test_sftp_put_get_mkdir_rename_rm(self) -> Any:
        local = os.path.join(self.mktemp() + "-src")
        payload = os.urandom(300_000)
        with open(local, "wb") as f:
            f.write(payload)
        fetched = self.mktemp() + "-dst"

        def session(sftp: paramiko.SFTPClient) -> list[str]:
            sftp.mkdir("dir")
            sftp.put(local, "dir/data.bin")
            sftp.rename("dir/data.bin", "dir/renamed.bin")
            sftp.get("dir/renamed.bin", fetched)
            listing = sftp.listdir("dir")
            sftp.remove("dir/renamed.bin")
            sftp.rmdir("dir")
            return listing

        listing = yield self.sftp(session)
        self.assertEqual(listing, ["renamed.bin"])
        with open(fetched, "rb") as got:
            self.assertEqual(got.read(), payload)
        self.assertEqual(sorted(os.listdir(self.root)), ["notes.txt"])

    @defer.inlineCallbacks
    def test_sftp_posix_rename_replaces(self) -> Any:
        def session(sftp: paramiko.SFTPClient) -> tuple[str, list[str]]:
            sftp.putfo(io.BytesIO(b"old"), "a.txt")
            sftp.putfo(io.BytesIO(b"new"), "b.txt")
            try:
                sftp.rename("b.txt", "a.txt")  # SFTP v3: refused onto an existing name
                refused = ""
            except OSError as e:
                refused = str(e)
            sftp.posix_rename("b.txt", "a.txt")  # posix-rename@openssh.com
            return refused, sorted(sftp.listdir("/"))

        refused, names = yield self.sftp(session)
        self.assertIn("file exists: a.txt", refused)
        self.assertEqual(names, ["a.txt", "notes.txt"])
        with open(os.path.join(self.root, "a.txt"), "rb") as f:
            self.assertEqual(f.read(), b"new")

    def test_sftp_ends_at_eof_after_an_env_request(self) -> defer.Deferred:
        # OpenSSH's sftp sends LANG first (SendEnv), then ends the session by EOF.
        def run() -> tuple[bool, list[str], bool]:
            t = self.transport()
            try:
                t.auth_password("ops", PASSWORD)
                chan = t.open_session()
                accepted = _env_request(chan, "LANG", "C.UTF-8")
                chan.invoke_subsystem("sftp")
                listing = paramiko.SFTPClient(chan).listdir(".")
                return accepted, listing, _ends_at_eof(chan)
            finally:
                t.close()

        return self.in_thread(run).addCallback(self.assertEqual, (True, ["notes.txt"], True))

    def test_sftp_errors_naming_a_path_that_is_not_ascii(self) -> defer.Deferred:
        # Each is answered, in UTF-8, and the session goes on, then ends at EOF.
        def run() -> tuple[list[str], list[str], bool]:
            t = self.transport()
            try:
                t.auth_password("ops", PASSWORD)
                chan = t.open_session()
                chan.invoke_subsystem("sftp")
                chan.settimeout(10)
                sftp = paramiko.SFTPClient(chan)
                errors = []
                for attempt in (lambda: sftp.stat("café.txt"),
                                lambda: sftp.open("/café.txt"),
                                lambda: sftp.remove(b"caf\xe9.txt"),
                                lambda: sftp.mkdir("notes.txt/été")):
                    try:
                        attempt()
                    except OSError as e:
                        errors.append(str(e))
                listing = sftp.listdir(".")
                return errors, listing, _ends_at_eof(chan)
            finally:
                t.close()

        return self.in_thread(run).addCallback(self.assertEqual, (
            ["[Errno 2] no such file or directory: café.txt",
             "[Errno 2] no such file or directory: /café.txt",
             "[Errno 2] no such file or directory: caf\\xe9.txt",
             "not a directory: notes.txt/été"],
            ["notes.txt"], True))

    @defer.inlineCallbacks
    def test_sftp_cannot_name_anything_outside_the_jail(self) -> Any:
        # The root is / (as under OpenSSH's ChrootDirectory): .. stops there, an
        # absolute path lies under it, and a symlink that leads out is refused.
        os.symlink("/etc", os.path.join(self.root, "etc"))

        def session(sftp: paramiko.SFTPClient) -> tuple[list[type], list[str]]:
            errors = []
            for attempt in (lambda: sftp.stat("/etc/passwd"),
                            lambda: sftp.get("/tmp/../etc/hostname", os.devnull),
                            lambda: sftp.stat("/proc/self")):
                try:
                    attempt()
                except OSError as e:
                    errors.append(type(e))
            sftp.put(__file__, "../escape.py")
            return errors, sorted(sftp.listdir("/.."))

        errors, names = yield self.sftp(session)
        self.assertEqual(errors, [PermissionError, PermissionError, FileNotFoundError])
        self.assertEqual(names, ["escape.py", "etc", "notes.txt"])
        self.assertTrue(os.path.exists(os.path.join(self.root, "escape.py")))
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.root),
                                                     "escape.py")))

    @defer.inlineCallbacks
    def test_sftp_files_are_0600_and_chmod_only_narrows(self) -> Any:
        local = self.mktemp() + "-src"
        with open(local, "wb") as f:
            f.write(b"payload")
        os.chmod(local, 0o755)

        def session(sftp: paramiko.SFTPClient) -> list[int]:
            modes = []
            sftp.put(local, "put.bin")
            modes.append(sftp.stat("put.bin").st_mode)
            with sftp.open("open.bin", "wb") as remote:
                remote.write(b"data")
                remote.chmod(0o755)  # FSETSTAT on the open upload
            modes.append(sftp.stat("open.bin").st_mode)
            for asked in (0o644, 0o4777, 0o400):  # SETSTAT
                sftp.chmod("put.bin", asked)
                modes.append(sftp.stat("put.bin").st_mode)
            sftp.mkdir("dir", 0o777)
            sftp.chmod("dir", 0o1777)
            modes.append(sftp.stat("dir").st_mode)
            return [stat.S_IMODE(cast(int, m)) for m in modes]  # every stat here has a mode

        modes = yield self.sftp(session)
        self.assertEqual(modes, [0o600, 0o600, 0o600, 0o600, 0o400, 0o755])
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.root, "open.bin")).st_mode),
                         0o600)

    @defer.inlineCallbacks
    def test_sftp_jailed_user_lands_in_own_root(self) -> Any:
        with open(os.path.join(self.other_root, "mine.txt"), "w") as f:
            f.write("mine")
        cwd, names = yield self.sftp(lambda sftp: (sftp.normalize("."), sftp.listdir("/")),
                                     user="jailed")
        self.assertEqual((cwd, names), ("/", ["mine.txt"]))

    @defer.inlineCallbacks
    def test_sftp_upload_invisible_until_closed_and_gone_if_client_dies(self) -> Any:
        client = yield self.in_thread(lambda: self.connect(password=PASSWORD))
        sftp = yield self.in_thread(client.open_sftp)
        remote = yield self.in_thread(sftp.open, "big.bin", "wb")

        def write_some() -> None:
            remote.write(b"x" * 100_000)
            remote.flush()

        yield self.in_thread(write_some)
        names = os.listdir(self.root)
        self.assertNotIn("big.bin", names)
        # An unnamed file (O_TMPFILE) where the filesystem has it, else a hidden one.
        named = 0 if self.core.policy.jail.use_tmpfile else 1
        self.assertEqual(len([n for n in names if TEMP_RE.match(n)]), named)
        yield self.in_thread(client.get_transport().sock.close)  # the client dies
        yield wait_for(lambda: os.listdir(self.root) == ["notes.txt"], "temp file removed")

    def limited_door(self, **limits: Any) -> defer.Deferred:
        """A second SSH door on this service with these settings; connections made
        by the helpers go to it from now on."""
        settings = SSHSettings(idle_timeout=60, **limits)
        door = add_ssh_door(self.service, "tcp:0:interface=127.0.0.1:backlog=10", _KEY_DIR,
                            settings)

        def listening(port: Any) -> None:
            self.port = port.getHost().port

        return door.listening.addCallback(listening)

    @defer.inlineCallbacks
    def test_sftp_upload_limit(self) -> Any:
        yield self.limited_door(max_upload=1000)

        def session(sftp: paramiko.SFTPClient) -> tuple[str, list[str]]:
            remote = sftp.open("big.bin", "wb")
            try:
                remote.write(b"x" * 2000)
                remote.flush()  # waits for the answer to the write
                too_large = ""
            except OSError as e:
                too_large = str(e)
            remote.close()  # paramiko keeps the answer to a close to itself
            sftp.putfo(io.BytesIO(b"y" * 1000), "fits.bin")
            return too_large, sorted(sftp.listdir("."))

        too_large, names = yield self.sftp(session)
        self.assertIn("upload too large: 2000 bytes (the limit is 1000 bytes)", too_large)
        self.assertEqual(names, ["fits.bin", "notes.txt"])
        self.assertEqual(sorted(os.listdir(self.root)), ["fits.bin", "notes.txt"])

    @defer.inlineCallbacks
    def test_sftp_handle_cap(self) -> Any:
        yield self.limited_door(sftp_max_handles=4)

        def session(sftp: paramiko.SFTPClient) -> tuple[str, bytes]:
            held = [sftp.open("notes.txt", "rb") for _ in range(4)]
            try:
                sftp.open("notes.txt", "rb")
                refused = ""
            except OSError as e:
                refused = str(e)
            for handle in held:
                handle.close()
            with sftp.open("notes.txt", "rb") as f:  # they were given back: it opens
                return refused, f.read()

        refused, again = yield self.sftp(session)
        self.assertIn("too many open files and directories (the limit is 4 per session)",
                      refused)
        self.assertEqual(again, b"hello\n")

    # -- OpenSSH -------------------------------------------------------------

    def openssh(self, *args: str, program: str | None = SSH,
                stdin: bytes | None = None) -> defer.Deferred:
        if program is None:
            raise unittest.SkipTest("OpenSSH client not installed")
        key = os.path.abspath(self.mktemp())
        with open(key, "wb") as f:
            f.write(self.pem)
        os.chmod(key, stat.S_IRUSR | stat.S_IWUSR)
        options = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                   "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
                   "-o", "LogLevel=ERROR", "-i", key]
        port = ["-P" if program == SFTP else "-p", str(self.port)]
        return utils.getProcessOutputAndValue(program, [*options, *port, *args],
                                              env={"PATH": os.defpath}, reactor=reactor)

    @defer.inlineCallbacks
    def test_openssh_exec(self) -> Any:
        out, err, status = yield self.openssh("ops@127.0.0.1", "ping")
        self.assertEqual((out, status), (b"pong\n", 0), err)
        out, err, status = yield self.openssh("ops@127.0.0.1", "help", "nosuch")
        self.assertEqual((out, err, status), (b"", b"Error: no such command: nosuch\n", 1))

    @defer.inlineCallbacks
    def test_openssh_key_not_on_file(self) -> Any:
        self.pem = client_key()[2]
        out, err, status = yield self.openssh("ops@127.0.0.1", "ping")
        self.assertEqual((out, status), (b"", 255))
        self.assertIn(b"Permission denied", err)

    @defer.inlineCallbacks
    def test_openssh_sftp(self) -> Any:
        if SFTP is None:
            raise unittest.SkipTest("OpenSSH sftp not installed")
        batch = os.path.abspath(self.mktemp())
        with open(batch, "w") as f:
            f.write(f"mkdir up\nput {__file__} up/t.py\nls up\nrename up/t.py up/u.py\n")
        out, err, status = yield self.openssh("-b", batch, "ops@127.0.0.1", program=SFTP)
        self.assertEqual(status, 0, err)
        with open(os.path.join(self.root, "up", "u.py"), "rb") as f, open(__file__, "rb") as g:
            self.assertEqual(f.read(), g.read())


def _ends_at_eof(chan: paramiko.Channel) -> bool:
    """Send EOF; whether the server then ends the channel (within 10 s) with
    nothing more to say."""
    chan.shutdown_write()
    chan.settimeout(10)
    try:
        return chan.recv(1) == b""
    except TimeoutError:
        return False


def _env_request(chan: paramiko.Channel, name: str, value: str) -> bool:
    """Send an ``env`` request wanting a reply; True if the server accepted it."""
    m = paramiko.Message()
    m.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string("env")
    m.add_boolean(True)
    m.add_string(name)
    m.add_string(value)
    # env with want-reply needs paramiko's private request calls, which its stubs leave out.
    chan._event_pending()  # type: ignore[attr-defined]
    chan.get_transport()._send_user_message(m)  # type: ignore[attr-defined]
    try:
        chan._wait_for_event()  # type: ignore[attr-defined]
    except paramiko.SSHException:
        return False
    return True
