"""TLS line doors end to end: Python's ssl client against the daemon on loopback port 0."""

from __future__ import annotations

import os
import socket
import ssl

from twisted.internet import defer, threads
from twisted.trial import unittest

from cmdserver.auth.tls import gencert, quote
from cmdserver.auth.users import UserRecord, UserStore, hash_password
from cmdserver.tap import Options, makeService
from tests.helpers import capture_audit
from tests.helpers.creds import TEST_COST, make_ca, make_client_cert, temp_dir

PASSWORD = "tls pass word"


def tls_session(port: int, cafile: str, lines: list[str], cert: tuple[str, str] | None = None,
                greeting: bool = False) -> list[str]:
    """Blocking client: connect, read the greeting if there is one, send each line and
    read its reply; return every line the server sent."""
    context = ssl.create_default_context(cafile=cafile)
    if cert is not None:
        context.load_cert_chain(*cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as sock:
        f = sock.makefile("rwb")
        received = [f.readline().decode()] if greeting else []
        for line in lines:
            f.write(line.encode() + b"\n")
            f.flush()
            reply = f.readline().decode()
            received.append(reply)
            if not reply:
                break
        return [r.rstrip("\r\n") for r in received]


class TLSDoorTests(unittest.TestCase):
    def setUp(self) -> None:
        self.data = os.path.join(temp_dir(self), "data")
        self.root = os.path.join(self.data, "files")
        os.makedirs(self.root)
        open(os.path.join(self.root, "hello.txt"), "w").close()
        with UserStore(self.data).locked() as users:
            users["ops"] = UserRecord("ops", hash_password(PASSWORD, TEST_COST))
        self.key, self.cert, _ = gencert(self.data, "localhost")

    @defer.inlineCallbacks
    def start(self, *argv: str):
        endpoint = (f"ssl:0:interface=127.0.0.1:privateKey={quote(self.key)}"
                    f":certKey={quote(self.cert)}")
        options = Options()
        options.parseOptions(["--data-dir", self.data, "--line", endpoint, "--ssh", "none",
                              "--pb", "none", "--http", "none",
                              "--bcrypt-cost",
                              "4", "--users-poll-interval", "0", *argv])
        service = makeService(options)
        service.startService()
        self.addCleanup(service.stopService)
        port = yield service.doors[0].listening
        return port.getHost().port

    @defer.inlineCallbacks
    def test_login_over_tls(self):
        port = yield self.start("--line-auth", "required")
        received = yield threads.deferToThread(
            tls_session, port, self.cert,
            ["ls", f"login ops '{PASSWORD}'", "whoami", "ls", "quit"])
        self.assertEqual(received, ["Error: login required", "Logged in as ops", "ops",
                                    "hello.txt", "bye !"])

    @defer.inlineCallbacks
    def test_a_greeting_over_tls(self):
        port = yield self.start("--greeting", "cmdserver over TLS")
        received = yield threads.deferToThread(tls_session, port, self.cert, ["test"],
                                               None, True)
        self.assertEqual(received, ["cmdserver over TLS", "Command not found."])

    @defer.inlineCallbacks
    def test_client_certificate_logs_in(self):
        ca = make_ca(self.data, "clients-ca")
        ops = make_client_cert(self.data, ca, "ops")
        ghost = make_client_cert(self.data, ca, "ghost")
        elsewhere = os.path.join(self.data, "elsewhere")
        os.mkdir(elsewhere)
        stranger = make_client_cert(elsewhere, make_ca(elsewhere, "other-ca"), "ops")
        audit = capture_audit(self)
        # Loopback exempt: each failure here would penalise the next connection.
        port = yield self.start("--line-auth", "required", "--tls-client-ca", ca[2],
                                "--penalty-exempt", "127.0.0.1")

        received = yield threads.deferToThread(tls_session, port, self.cert,
                                               ["whoami", "ls"], ops)
        self.assertEqual(received, ["ops", "hello.txt"])

        # A valid certificate for a name that is not a user: still anonymous.
        received = yield threads.deferToThread(tls_session, port, self.cert,
                                               ["whoami", "ls"], ghost)
        self.assertEqual(received, ["anonymous (not logged in)", "Error: login required"])

        # No certificate, or one from another CA: the handshake fails, nothing is served.
        for cert in (None, stranger):
            try:
                received = yield threads.deferToThread(tls_session, port, self.cert,
                                                       ["whoami"], cert)
            except (ssl.SSLError, ConnectionError):
                continue
            self.assertEqual(received, [""])  # closed before any reply

        # Every certificate login is audited, each in its connection's session; a
        # failed handshake is a failed certificate login too.
        logins = [e for e in audit if e["event"] == "login"]
        self.assertEqual([(e["user"], e["args"], e["outcome"], e["door"]) for e in logins],
                         [("ops", {"method": "certificate"}, "ok", "line"),
                          ("ghost", {"method": "certificate"}, "failed", "line"),
                          ("anonymous", {"method": "certificate"}, "failed", "line"),
                          ("anonymous", {"method": "certificate"}, "failed", "line")])
        self.assertTrue(all(e["error"].startswith("the TLS handshake failed: ")
                            for e in logins[2:]), [e["error"] for e in logins[2:]])
        self.assertNotEqual(logins[0]["session"], logins[1]["session"])
        ran = [e for e in audit if e["event"] == "command" and e["command"] == "ls"]
        self.assertEqual([(e["user"], e["session"]) for e in ran],
                         [("ops", logins[0]["session"]), ("anonymous", logins[1]["session"])])
