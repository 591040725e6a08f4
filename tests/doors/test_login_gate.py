"""The login gate on every door, with Twisted's doubles.

- A penalised address's new connection is closed before any work: no session,
  no banner, no protocol exchange (line, SSH, PB), only the line door's one line.
- Pipelined logins: one check in flight per connection (PB through iosim, SSH
  password requests straight into conch's userauth); the rest are refused at once.
- The login deadline: PB and the line door close a connection that has not
  logged in, whatever it sends; a login meets it.
- TLS client certificates: a failure penalises, a penalised address is refused.

bcrypt runs in a fake pool (``Pool``): a check "runs" until the test finishes it.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import userauth
from twisted.conch.ssh.common import NS
from twisted.conch.ssh.keys import Key
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.spread import pb
from twisted.test import iosim
from twisted.trial import unittest

from cmdserver.auth.credentials import Credentials, build_checkers
from cmdserver.auth.portal import ANONYMOUS, Realm, build_portal
from cmdserver.auth.tls import CertificateLogin
from cmdserver.auth.users import UserRecord, UserStore, hash_password
from cmdserver.commands.account import Login, PasswordLogin, Whoami
from cmdserver.commands.base import Context, Registry
from cmdserver.commands.basic import Ping
from cmdserver.core import CommandCore
from cmdserver.doors.limits import ConnectionLimits, LimitedFactory
from cmdserver.doors.line.protocol import LineFactory, LineProtocol, LineSettings, refusal
from cmdserver.doors.pb.door import pb_factory
from cmdserver.doors.ssh.avatar import SSHSettings
from cmdserver.doors.ssh.door import CmdServerSSHFactory, CmdServerUserAuth
from cmdserver.policy import Policy
from tests.auth.test_gate import Pool
from tests.helpers import capture_audit
from tests.helpers.creds import TEST_COST, make_ca, make_client_cert, temp_dir

PASSWORD = "right pw"
HOST_KEY = Key(ed25519.Ed25519PrivateKey.generate())
ATTACKER, OTHER = "10.0.0.7", "10.0.0.8"


class DoorsBase(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = temp_dir(self)
        store = UserStore(os.path.join(self.tmp, "data"))
        with store.locked() as users:
            users["ops"] = UserRecord("ops", hash_password(PASSWORD, TEST_COST))
        self.credentials = Credentials(store, cost=TEST_COST)
        self.credentials.load_now()
        self.pool = Pool()
        self.realm = Realm(self.credentials.account)
        self.portal = build_portal(self.realm, build_checkers(self.credentials, self.pool.run))
        self.clock = MemoryReactorClock()
        registry = Registry([Ping(), Whoami(), Login(PasswordLogin(self.portal))])
        self.core = CommandCore(registry, Policy([self.tmp]), self.clock)
        self.audit = capture_audit(self)

    def penalise(self, host: str = ATTACKER) -> None:
        """One failed login from ``host`` (the line door's, say): penalised 1 s."""
        session = self.core.open_session("line", f"{host}:1")
        self.core.gate.failure(session, "ops")
        self.core.close_session(session)

    def limited(self, door: str, factory: Any, words: Any = None) -> LimitedFactory:
        return LimitedFactory(factory, ConnectionLimits(100, 10), self.core.stats, door, words,
                              self.core.gate)

    def ssh_factory(self) -> CmdServerSSHFactory:
        service = type("Service", (), {"core": self.core, "realm": self.realm,
                                        "portal": self.portal})()
        factory = CmdServerSSHFactory(self.core, self.portal, {b"ssh-ed25519": HOST_KEY},
                                      SSHSettings())
        self.realm.register(*_ssh_avatar(service))
        factory.startFactory()
        return factory

    def connect(self, factory: Any, host: str) -> tuple[Any, StringTransport]:
        addr = IPv4Address("TCP", host, 40000)
        protocol = factory.buildProtocol(addr)
        transport = StringTransport(peerAddress=addr)
        protocol.makeConnection(transport)
        self.addCleanup(lambda: transport.disconnecting or protocol.connectionLost(None))
        return protocol, transport

    def events(self, kind: str) -> list[dict]:
        return [e for e in self.audit if e["event"] == kind]


def _ssh_avatar(service: Any) -> tuple[Any, Any]:
    """What ssh_factory registers with the realm (without making host keys on disk)."""
    from twisted.conch.interfaces import IConchUser

    from cmdserver.doors.ssh.avatar import SSHAvatar

    def avatar(account: Any, mind: Any) -> Any:
        a = SSHAvatar(service.core, account, SSHSettings())
        return a, a.logout

    return IConchUser, avatar


class RefusedBeforeAnyWorkTests(DoorsBase):
    def doors(self) -> dict[str, LimitedFactory]:
        return {
            "line": self.limited("line", LineFactory(self.core, LineSettings(
                login="required", idle_timeout=0)), refusal),
            "ssh": self.limited("ssh", self.ssh_factory()),
            "pb": self.limited("pb", pb_factory(self.core, self.portal)),
        }

    def test_a_penalised_address_is_closed_without_a_word_of_protocol(self) -> None:
        doors = self.doors()
        self.penalise()
        for name, factory in doors.items():
            _, transport = self.connect(factory, ATTACKER)
            said = transport.value()
            self.assertTrue(transport.disconnecting, name)
            if name == "line":  # the line door's one line; SSH and PB: nothing at all
                self.assertEqual(said, b"Too many failed logins from your address; "
                                       b"try again in 1 s. bye !\r\n")
            else:
                self.assertEqual(said, b"", name)
        self.assertEqual(self.core.sessions, {})  # no session was even opened
        self.assertEqual([e for e in self.events("session-start")
                          if e["peer"].endswith(":40000")], [])
        self.assertEqual(self.core.stats.refused_penalised, 3)
        self.assertEqual(self.core.stats.refused, 3)
        refused = self.events("refused")
        self.assertEqual([e["door"] for e in refused], ["line"])  # one record a second

    def said(self, name: str, factory: LimitedFactory, source: str) -> bytes:
        """What a new connection is told first (the line door, which does not greet:
        its answer to ``ping``)."""
        protocol, transport = self.connect(factory, source)
        if name == "line":
            self.assertEqual(transport.value(), b"")
            protocol.dataReceived(b"ping\n")
        return transport.value()

    def test_others_are_served_and_the_penalty_ends(self) -> None:
        doors = self.doors()
        self.penalise()
        said = {name: self.said(name, f, OTHER) for name, f in doors.items()}
        self.assertEqual(said["line"], b"pong\r\n")
        self.assertTrue(said["ssh"].startswith(b"SSH-2.0-"))
        self.assertTrue(said["pb"])  # banana's dialect list
        self.clock.advance(1)
        for name, factory in doors.items():
            self.assertTrue(self.said(name, factory, ATTACKER), name)
        self.assertEqual(self.said("line", doors["line"], ATTACKER), b"pong\r\n")


class PBPipelineTests(DoorsBase):
    def test_pipelined_authenticate_calls_are_checked_one_at_a_time(self) -> None:
        server = self.limited("pb", pb_factory(self.core, self.portal))
        client = pb.PBClientFactory()
        addr = IPv4Address("TCP", ATTACKER, 4321)
        client_proto, _, pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(addr), lambda: client.buildProtocol(addr),
            serverTransportFactory=lambda p: iosim.FakeTransport(p, True, peerAddress=addr))
        root_d = client.getRootObject()
        pump.flush()
        root = self.successResultOf(root_d)
        answers: list[str] = []
        for _ in range(400):  # sent without waiting for any answer
            root.callRemote("authenticate", "ops", "guess").addErrback(
                lambda f: answers.append(f.getErrorMessage()))
        pump.flush()
        self.clock.advance(0)  # the door hangs up once its last answer is out
        pump.flush()
        self.assertEqual(self.pool.started, 1)  # one check; the others were refused
        self.assertTrue(client_proto.disconnected)
        self.assertEqual(answers[:5], ["login refused: a login is already being checked on "
                                       "this connection"] * 4
                         + ["login failed; too many failures, closing"])
        self.assertEqual(set(answers[5:399]), {"login failed; too many failures, closing"})
        logins = self.events("login")
        self.assertEqual([e["outcome"] for e in logins], ["refused"] * 5)  # the rest: dropped
        # The check that was running still ends, and a wrong password still counts.
        self.pool.finish()
        self.assertEqual(self.core.gate.penalties.strikes(ATTACKER), 1)
        self.assertEqual(dict(self.core.gate._checks), {})


class SSHPipelineTests(DoorsBase):
    def test_pipelined_password_requests_are_checked_one_at_a_time(self) -> None:
        factory = self.limited("ssh", self.ssh_factory())
        wrapper, _ = self.connect(factory, ATTACKER)
        transport = wrapper.wrappedProtocol
        packets: list[int] = []
        disconnects: list[bytes] = []
        transport.sendPacket = lambda kind, data: packets.append(kind)
        transport.sendDisconnect = lambda code, text: disconnects.append(text)
        transport.isEncrypted = lambda direction: True
        service = CmdServerUserAuth()
        transport.setService(service)
        request = (NS(b"ops") + NS(b"ssh-connection") + NS(b"password") + b"\x00"
                   + NS(b"guess"))
        for _ in range(400):
            service.ssh_USERAUTH_REQUEST(request)
        self.assertEqual(self.pool.started, 1)
        # Refused at once, each an attempt: the third ends the connection.
        self.assertEqual(packets, [userauth.MSG_USERAUTH_FAILURE] * 2)
        self.assertEqual(disconnects, [b"too many bad auths"])
        self.assertEqual([e["outcome"] for e in self.events("login")], ["refused"] * 3)
        transport.connectionLost(None)  # the check still runs; its answer goes nowhere
        self.pool.finish()
        self.assertEqual(self.core.gate.penalties.strikes(ATTACKER), 1)


class OpenConnectionTests(DoorsBase):
    """Connections opened before the penalty: their attempts are refused unchecked."""

    def test_pb(self) -> None:
        server = pb_factory(self.core, self.portal)
        client = pb.PBClientFactory()
        addr = IPv4Address("TCP", ATTACKER, 4321)
        _, _, pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(addr), lambda: client.buildProtocol(addr),
            serverTransportFactory=lambda p: iosim.FakeTransport(p, True, peerAddress=addr))
        root_d = client.getRootObject()
        pump.flush()
        self.penalise()  # a failure elsewhere (the line door, say)
        d = self.successResultOf(root_d).callRemote("authenticate", "ops", PASSWORD)
        pump.flush()
        self.assertEqual(self.failureResultOf(d).getErrorMessage(),
                         "login refused: too many failed logins from your address; "
                         "try again in 1 s")
        self.assertEqual(self.pool.started, 0)

    def test_ssh(self) -> None:
        wrapper, _ = self.connect(self.limited("ssh", self.ssh_factory()), ATTACKER)
        transport = wrapper.wrappedProtocol
        packets: list[int] = []
        transport.sendPacket = lambda kind, data: packets.append(kind)
        transport.isEncrypted = lambda direction: True
        service = CmdServerUserAuth()
        transport.setService(service)
        self.penalise()
        service.ssh_USERAUTH_REQUEST(NS(b"ops") + NS(b"ssh-connection") + NS(b"password")
                                     + b"\x00" + NS(PASSWORD.encode()))
        self.assertEqual((packets, self.pool.started), ([userauth.MSG_USERAUTH_FAILURE], 0))
        [login] = self.events("login")
        self.assertEqual((login["outcome"], login["error"]),
                         ("refused", "too many failed logins from your address; "
                                     "try again in 1 s"))


class DeadlineTests(DoorsBase):
    def line(self, login: str) -> tuple[LineProtocol, StringTransport]:
        protocol = LineProtocol(self.core, LineSettings(login=login, greeting="",
                                                        idle_timeout=0))
        transport = StringTransport(peerAddress=IPv4Address("TCP", OTHER, 40000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_line_door_closes_a_connection_that_never_logs_in(self) -> None:
        protocol, transport = self.line("required")
        for _ in range(5):  # a byte every five seconds: never a line
            self.clock.advance(5)
            protocol.dataReceived(b"x")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(5)
        self.assertEqual(transport.value(),
                         b"Timeout: not logged in within 30 s, closing the connection.\r\n")
        self.assertTrue(transport.disconnecting)

    def test_line_door_login_meets_the_deadline(self) -> None:
        protocol, transport = self.line("required")
        protocol.dataReceived(f"login ops '{PASSWORD}'\n".encode())
        self.pool.finish()
        self.clock.advance(60)
        self.assertEqual(transport.value(), b"Logged in as ops\r\n")
        self.assertFalse(transport.disconnecting)

    def test_no_deadline_where_no_login_is_required(self) -> None:
        for login in ("optional", "off"):
            _, transport = self.line(login)
            self.clock.advance(60)
            self.assertFalse(transport.disconnecting, login)

    def pb(self, anonymous: bool = False) -> tuple[Any, StringTransport]:
        factory = pb_factory(self.core, self.portal, anonymous)
        return self.connect(factory, OTHER)

    def test_pb_closes_a_connection_that_never_logs_in(self) -> None:
        broker, transport = self.pb()
        for _ in range(5):  # two bytes every five seconds: a banana prefix, never a call
            self.clock.advance(5)
            broker.dataReceived(b"\x01\x01")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(5)
        self.assertTrue(transport.disconnecting)

    def test_pb_anonymous_root_has_no_deadline(self) -> None:
        _, transport = self.pb(anonymous=True)
        self.clock.advance(60)
        self.assertFalse(transport.disconnecting)

    def test_pb_login_meets_the_deadline(self) -> None:
        server = pb_factory(self.core, self.portal)
        client = pb.PBClientFactory()
        addr = IPv4Address("TCP", OTHER, 4321)
        _, server_proto, pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(addr), lambda: client.buildProtocol(addr))
        root_d = client.getRootObject()
        pump.flush()
        d = self.successResultOf(root_d).callRemote("authenticate", "ops", PASSWORD)
        pump.flush()
        self.pool.finish()
        pump.flush()
        self.successResultOf(d)
        self.clock.advance(60)
        pump.flush()
        self.assertFalse(server_proto.disconnected)


class CertificateTests(DoorsBase):
    def setUp(self) -> None:
        super().setUp()
        self.ca = make_ca(self.tmp, "ca")
        self.login = CertificateLogin(self.credentials.account)

    def transport(self, name: str) -> Any:
        path, _ = make_client_cert(self.tmp, self.ca, name)
        with open(path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        return type("TLS", (), {"getPeerCertificate": lambda self: type(
            "Cert", (), {"to_cryptography": lambda self: cert})()})()

    def ctx(self, host: str = ATTACKER) -> Context:
        session = self.core.open_session("line", f"{host}:1")
        return Context(self.core, user=ANONYMOUS, peer=session.peer, door="line",
                       login="required", session_id=session.id)

    def test_an_unknown_name_penalises(self) -> None:
        ctx = self.ctx()
        self.login(ctx, self.transport("ghost"))
        self.assertEqual(ctx.user, ANONYMOUS)
        self.assertEqual(self.core.gate.penalties.strikes(ATTACKER), 1)
        self.assertEqual([(e["user"], e["outcome"]) for e in self.events("login")],
                         [("ghost", "failed")])

    def test_a_penalised_address_is_not_logged_in(self) -> None:
        self.penalise()
        ctx = self.ctx()
        self.login(ctx, self.transport("ops"))
        self.assertEqual(ctx.user, ANONYMOUS)
        self.assertEqual([(e["user"], e["outcome"]) for e in self.events("login")],
                         [("ops", "refused")])
        ctx = self.ctx(OTHER)
        self.login(ctx, self.transport("ops"))
        self.assertEqual(ctx.user, "ops")

    def test_a_failed_handshake_penalises(self) -> None:
        from OpenSSL import SSL
        from twisted.python.failure import Failure

        protocol = LineProtocol(self.core, LineSettings(login="required", greeting="",
                                                        peer_login=self.login))
        transport = StringTransport(peerAddress=IPv4Address("TCP", ATTACKER, 40000))
        protocol.makeConnection(transport)
        protocol.connectionLost(Failure(SSL.Error([("SSL routines", "",
                                                    "peer did not return a certificate")])))
        self.assertEqual(self.core.gate.penalties.strikes(ATTACKER), 1)
        login = self.events("login")
        self.assertEqual([(e["user"], e["args"], e["outcome"]) for e in login],
                         [(ANONYMOUS, {"method": "certificate"}, "failed")])
        self.assertIn("peer did not return a certificate", login[0]["error"])
