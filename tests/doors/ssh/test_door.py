"""Unit tests of the SSH door's transport and userauth with a fake clock."""

from __future__ import annotations

import os
import struct
from typing import cast

from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import connection
from twisted.conch.ssh.keys import Key
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python import usage
from twisted.trial import unittest

from cmdserver.auth.portal import Realm, build_portal
from cmdserver.commands.base import Registry
from cmdserver.core import CommandCore
from cmdserver.doors.ssh.door import (
    CmdServerConnection,
    CmdServerSSHFactory,
    CmdServerTransport,
    CmdServerUserAuth,
    SSHAvatar,
    SSHSettings,
)
from cmdserver.doors.ssh.session import RefusingSSHSession
from cmdserver.policy import Policy
from cmdserver.tap import Options, makeService
from tests.helpers import OutsideTreeTempMixin

# A small host key: these tests never complete a key exchange.

HOST_KEY = Key(ed25519.Ed25519PrivateKey.generate())


class FakeAvatar:
    busy = 0


class TransportTest(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        portal = build_portal(Realm(), [InMemoryUsernamePasswordDatabaseDontUse(ops=b"pw")])
        self.settings = SSHSettings(idle_timeout=300)
        self.core = CommandCore(Registry(), Policy(["/"]), self.clock)
        self.factory = CmdServerSSHFactory(self.core, portal, {b"ssh-ed25519": HOST_KEY},
                                           self.settings)
        self.factory.startFactory()
        self.transport: CmdServerTransport = self.factory.buildProtocol(
            IPv4Address("TCP", "127.0.0.1", 40000))
        self.tcp = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.transport.makeConnection(self.tcp)
        self.disconnects: list[tuple[int, bytes]] = []
        self.patch(self.transport, "sendDisconnect",
                   lambda code, text: self.disconnects.append((code, text)))
        self.addCleanup(self.transport.connectionLost, None)

    def start_userauth(self) -> CmdServerUserAuth:
        service = CmdServerUserAuth()
        self.patch(self.transport, "isEncrypted", lambda direction: True)
        self.transport.setService(service)
        return service

    def test_login_grace_uses_the_door_clock(self) -> None:
        self.start_userauth()
        self.assertEqual(self.core.gate.settings.login_grace, 30)  # the gate's deadline
        self.clock.advance(29.9)
        self.assertEqual(self.disconnects, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.disconnects), 1)

    def test_login_grace_counts_from_the_connection(self) -> None:
        # A client that never finishes the key exchange is cut off too.
        self.clock.advance(29.9)
        self.assertEqual(self.disconnects, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.disconnects), 1)

    def test_grace_left_passes_to_userauth(self) -> None:
        self.clock.advance(10)
        self.start_userauth()
        self.clock.advance(19.9)
        self.assertEqual(self.disconnects, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.disconnects), 1)  # once: conch's own timer is off

    def test_requesting_userauth_again_keeps_the_deadline(self) -> None:
        self.start_userauth()
        self.clock.advance(20)
        self.start_userauth()  # a client asking for ssh-userauth once more
        self.clock.advance(10)
        self.assertEqual(len(self.disconnects), 1)

    def test_failures_survive_a_new_userauth_service(self) -> None:
        service = self.start_userauth()
        self.assertEqual(service.attemptsBeforeDisconnect, 2)  # the third failure ends it
        self.transport.auth_failures = 2
        self.assertEqual(self.start_userauth().loginAttempts, 2)

    def test_idle_timeout_disconnects(self) -> None:
        self.core.gate.cancel_deadline(self.transport.audit_session)  # as once logged in
        self.clock.advance(299)
        self.assertEqual(self.disconnects, [])
        self.transport.dataReceived(b"")  # activity resets the timer
        self.clock.advance(299)
        self.assertEqual(self.disconnects, [])
        self.clock.advance(1)
        self.assertEqual([text for _, text in self.disconnects], [b"Timeout: idle for 300 s"])

    def test_running_command_is_not_idle(self) -> None:
        self.core.gate.cancel_deadline(self.transport.audit_session)  # as once logged in
        self.transport.avatar = cast(SSHAvatar, FakeAvatar())
        self.transport.logoutFunction = lambda: None
        self.transport.avatar.busy = 1
        self.clock.advance(300)
        self.assertEqual(self.disconnects, [])
        self.transport.avatar.busy = 0
        self.clock.advance(300)
        self.assertEqual(len(self.disconnects), 1)

    def test_tcp_nodelay_is_set(self) -> None:
        calls: list[bool] = []

        class TCPTransport(StringTransport):
            def setTcpNoDelay(self, enabled: bool) -> None:
                calls.append(enabled)

        transport = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
        transport.makeConnection(TCPTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001)))
        self.addCleanup(transport.connectionLost, None)
        self.assertEqual(calls, [True])


class OptionsTest(OutsideTreeTempMixin, unittest.TestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--data-dir", self.mktemp(), *argv])
        return options

    def test_default_endpoint(self) -> None:
        self.assertEqual(self.parse()["ssh"], "tcp:2222:interface=127.0.0.1")

    def test_none_turns_it_off(self) -> None:
        self.assertIsNone(self.parse("--ssh", "none")["ssh"])

    def test_bad_endpoint_rejected(self) -> None:
        with self.assertRaises(usage.UsageError):
            self.parse("--ssh", "nonsense:1")

    def test_ssh_alone_is_enough(self) -> None:
        self.assertEqual(self.parse("--line", "none", "--ssh", "tcp:0")["line"], [])

    def test_make_service_adds_the_door_and_keys(self) -> None:
        options = self.parse("--ssh", "tcp:0:interface=127.0.0.1", "--pb", "none",
                             "--http", "none", "--audit-log", "none")
        service = makeService(options, MemoryReactorClock())
        self.assertEqual([d.door for d in service.doors], ["line", "ssh"])
        names = sorted(os.listdir(options["data-dir"]))
        self.assertIn("ssh_host_ed25519_key", names)
        self.assertIn("ssh_host_rsa_key", names)

    def test_make_service_without_ssh(self) -> None:
        options = self.parse("--ssh", "none", "--pb", "none", "--http", "none",
                             "--audit-log", "none")
        service = makeService(options, MemoryReactorClock())
        self.assertEqual([d.door for d in service.doors], ["line"])


class FakeSSHTransport:
    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []

    def sendPacket(self, kind: int, data: bytes) -> None:
        self.packets.append((kind, data))


class InputFlowControlTest(unittest.TestCase):
    """A paused exec channel does not reopen its window: the client must stop."""

    def setUp(self) -> None:
        self.conn = CmdServerConnection()
        self.ssh_transport = FakeSSHTransport()
        self.conn.transport = cast(CmdServerTransport, self.ssh_transport)
        self.channel = RefusingSSHSession(conn=self.conn, avatar=None)
        self.channel.id = 0  # type: ignore[assignment]  # conch types it by its None default
        self.conn.channels[0] = self.channel
        self.conn.channelsToRemoteChannel[self.channel] = 7
        self.conn.localToRemoteChannel[0] = 7

    def send(self, packets: int) -> None:
        chunk = b"x" * self.channel.localMaxPacket
        for _ in range(packets):
            self.conn.ssh_CHANNEL_DATA(struct.pack(">2L", 0, len(chunk)) + chunk)

    def adjustments(self) -> list[int]:
        return [struct.unpack(">2L", data)[1] for kind, data in self.ssh_transport.packets
                if kind == connection.MSG_CHANNEL_WINDOW_ADJUST]

    def test_window_reopens_normally(self) -> None:
        self.send(3)
        self.assertEqual(self.adjustments(), [3 * self.channel.localMaxPacket])

    def test_paused_window_stays_closed_until_resumed(self) -> None:
        self.channel.pause_input()
        self.send(3)
        self.assertEqual(self.adjustments(), [])
        self.channel.resume_input()
        self.assertEqual(self.adjustments(), [3 * self.channel.localMaxPacket])
        self.assertEqual(self.channel.localWindowLeft, self.channel.localWindowSize)
