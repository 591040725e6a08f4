"""The login gate end to end: the real service on loopback port 0, real clients.

A failed login on one door penalises the address on every door: its new
connections are closed before any protocol exchange (OpenSSH's ``ssh`` and
paramiko see no SSH banner, the PB client no PB, the line door one line), while
another loopback address (127.0.0.2) is served as usual.  A TLS client
certificate from an unknown CA penalises the address the same way.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from typing import Any

import paramiko
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from cmdserver import client
from cmdserver.auth.tls import gencert, quote
from cmdserver.cli import main as cli
from tests.end_to_end.support import LineClient, RunningService, in_thread
from tests.helpers.creds import make_ca, make_client_cert

PASSWORD = "gate-pass"
LOCAL = "tcp:0:interface=127.0.0.1"
ATTACKER, OTHER = "127.0.0.1", "127.0.0.2"
REFUSED = re.compile(rb"Too many failed logins from your address; try again in \d+ s\. bye !\r\n")
SSH = shutil.which("ssh")


def source_socket(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.settimeout(10)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


class GateCase(unittest.TestCase):
    argv: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.tmp = os.path.abspath(self.mktemp())
        self.data = os.path.join(self.tmp, "data")
        self.patch(sys, "stdin", io.StringIO(f"{PASSWORD}\n"))
        self.assertEqual(cli(["useradd", "ops", "--password-stdin", "--cost", "4",
                              "--data-dir", self.data]), 0)
        self.before_start()
        # A long penalty, so that it is still running whatever the machine's speed.
        self.server = RunningService(self.tmp, *self.argv, "--line-auth", "required",
                                     "--bcrypt-cost", "4", "--login-penalty", "30",
                                     "--login-penalty-max", "30")
        yield self.server.start()
        self.addCleanup(self.server.stop)
        self.ports = {door.door: port.getHost().port
                      for door, port in zip(self.server.service.doors, self.server.ports,
                                            strict=True)}
        self.gate = self.server.service.core.gate

    def before_start(self) -> None:
        pass

    @defer.inlineCallbacks
    def penalised(self, source: str = ATTACKER) -> Any:
        """Wait (at most 10 s) until ``source`` is penalised."""
        for _ in range(200):
            if self.gate.penalties.remaining(source) > 0:
                return
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.fail(f"{source} was not penalised")


class EveryDoorTests(GateCase):
    argv = ("--ssh", LOCAL, "--pb", LOCAL)

    def line(self, source: str) -> bytes:
        c = LineClient(("127.0.0.1", self.ports["line"]), source=source)
        try:
            return c.read_until_closed()
        finally:
            c.close()

    def paramiko_banner(self, source: str) -> str:
        t = paramiko.Transport(source_socket(source, self.ports["ssh"]))
        try:
            t.start_client(timeout=10)
            t.auth_password("ops", PASSWORD)
            chan = t.open_session()
            chan.exec_command("ping")
            return chan.makefile().read().decode()
        except paramiko.SSHException as e:
            return f"SSHException: {e}"
        finally:
            t.close()

    def openssh(self) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SSH), "-p", str(self.ports["ssh"]), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=10", "-F", "/dev/null", "ops@127.0.0.1", "ping"],
            capture_output=True, timeout=30, stdin=subprocess.DEVNULL)

    @defer.inlineCallbacks
    def pb(self, source: str) -> Any:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports["pb"], timeout=10,
                                      bindAddress=(source, 0))
        try:
            session = yield client.connect_endpoint(endpoint, "ops", PASSWORD, reactor, 10)
        except Exception as e:  # the server closed the connection
            return type(e).__name__
        try:
            return (yield session.ping())
        finally:
            yield session.close()

    @defer.inlineCallbacks
    def test_a_failed_login_closes_every_door_to_that_address_only(self) -> Any:
        attacker = yield in_thread(LineClient, ("127.0.0.1", self.ports["line"]))
        self.addCleanup(attacker.close)
        attacker.send(b"login ops wrong\n")  # answered when its 30 s penalty is over
        yield self.penalised()

        self.assertRegex((yield in_thread(self.line, ATTACKER)), REFUSED)
        self.assertIn("SSHException", (yield in_thread(self.paramiko_banner, ATTACKER)))
        self.assertEqual((yield self.pb(ATTACKER)), "ConnectionLost")
        if SSH:
            result = yield in_thread(self.openssh)
            self.assertEqual(result.returncode, 255)
            self.assertIn(b"Connection closed", result.stderr)

        # Another address is served on every door.
        def line_login() -> list[str]:
            c = LineClient(("127.0.0.1", self.ports["line"]), source=OTHER)
            try:
                return [c.ask(f"login ops {PASSWORD}")[0], c.ask("ping")[0]]
            finally:
                c.close()

        self.assertEqual((yield in_thread(line_login)), ["Logged in as ops", "pong"])
        self.assertEqual((yield in_thread(self.paramiko_banner, OTHER)), "pong\n")
        self.assertEqual((yield self.pb(OTHER)), "pong")

        stats = self.server.service.core.stats
        self.assertEqual(stats.refused_penalised, 4 if SSH else 3)
        self.assertEqual(stats.penalties, 1)  # the failed login is answered in 30 s


class CertificateTests(GateCase):
    def before_start(self) -> None:
        key, self.cert, _ = gencert(self.data, "localhost")
        ca = make_ca(self.data, "clients-ca")
        self.ops = make_client_cert(self.data, ca, "ops")
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.makedirs(elsewhere)
        self.stranger = make_client_cert(elsewhere, make_ca(elsewhere, "other-ca"), "ops")
        self.argv = ("--line", f"ssl:0:interface=127.0.0.1:privateKey={quote(key)}"
                               f":certKey={quote(self.cert)}", "--tls-client-ca", ca[2])

    def tls(self, cert: tuple[str, str] | None, source: str = ATTACKER) -> bytes:
        """What a TLS client reads: the reply to ``whoami``, or the error it gets."""
        context = ssl.create_default_context(cafile=self.cert)
        if cert is not None:
            context.load_cert_chain(*cert)
        try:
            raw = source_socket(source, self.ports["line"])
        except ConnectionError as e:  # refused at once: reset before connect() returned
            return type(e).__name__.encode()
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"whoami\n")
                data = b""
                while not data.endswith(b"\n") and (chunk := sock.recv(4096)):
                    data += chunk
                return data
        except (ssl.SSLError, ConnectionError) as e:
            return type(e).__name__.encode()
        finally:
            raw.close()

    def plain(self) -> bytes:
        try:
            c = LineClient(("127.0.0.1", self.ports["line"]))
        except ConnectionResetError:  # aborted before connect() even returned
            return b""
        try:
            return c.read_until_closed()
        except ConnectionResetError:  # aborted before any TLS
            return b""
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_a_certificate_from_another_ca_penalises_the_address(self) -> Any:
        self.assertEqual((yield in_thread(self.tls, self.stranger)), b"SSLError")
        yield self.penalised()
        # Refused before the TLS handshake: nothing is said, even with a good certificate.
        self.assertEqual((yield in_thread(self.plain)), b"")
        self.assertIn((yield in_thread(self.tls, self.ops)),
                      (b"SSLError", b"SSLEOFError", b"ConnectionResetError", b""))
        # Another address logs in by its certificate.
        reply = yield in_thread(self.tls, self.ops, OTHER)
        self.assertEqual(reply, b"ops\r\n")
