"""One command contract on every door: each command of the registry runs on the
line door, on ``ssh HOST CMD`` and on PB; ``help`` lists exactly what each door
serves; a deadline and an output cap end a command the same way everywhere.

The registry is walked, so a command added without a sample here fails
:meth:`test_every_command_has_a_sample`: the next command cannot be forgotten on
a door.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.spread import pb
from twisted.test import iosim
from twisted.trial import unittest

from cmdserver.auth.portal import Account, Realm, build_portal
from cmdserver.commands.account import Login, PasswordLogin
from cmdserver.commands.base import Command, Context
from cmdserver.commands.params import Int, Param
from cmdserver.commands.portscan.command import PortScan
from cmdserver.commands.upload.command import UploadCommand
from cmdserver.commands.upload.engine import Uploads, UploadSettings
from cmdserver.doors.line.protocol import LineProtocol, LineSettings
from cmdserver.doors.pb.door import pb_factory
from cmdserver.doors.pb.upload import consumer_starter
from cmdserver.doors.ssh.avatar import SSHAvatar, SSHSettings
from cmdserver.doors.ssh.session import CommandSession
from tests.helpers import OutsideTreeTempMixin, make_core
from tests.helpers.fakenet import FakeNetwork

MAC = "ab" * 32
DOORS = ("line", "ssh", "pb")
# Each command: the words a person types, the named values a program passes, and
# a piece of the text doors' output that shows it ran.
SAMPLES: dict[str, tuple[list[str], dict[str, Any], str]] = {
    "help": (["ping"], {"command": "ping"}, "Usage: ping"),
    "ping": ([], {}, "pong"),
    "stats": ([], {}, "uptime:"),
    "whoami": ([], {}, "ops"),
    "ls": ([], {}, "a.txt"),
    "comphash": (["a.txt"], {"path": "a.txt"}, "8ed3f6ad"),
    "lastlog": (["1"], {"n": 1}, "End lastlog"),
    "portscan": (["127.0.0.1", "22"], {"host": "127.0.0.1", "ports": "22"},
                 "Scanned 1 ports"),
    "slow": ([], {}, ""),
    "chatty": ([], {}, ""),
}
# Commands with a door-specific protocol, tested on their own: the door's word.
SPECIAL = {
    "exit": "the text doors close the connection (tests/doors/line)",
    "login": "the line door's login (tests/doors/line/test_login.py)",
    "upload": "raw bytes after the line, on every door (tests/doors/test_upload_parity.py)",
}


class Slow(Command):
    """Never ends by itself: only a deadline or a cancel stops it."""

    name = "slow"
    summary = "Wait for ever."
    timeout = 5

    def __init__(self) -> None:
        self.cancelled = 0

    def run(self, ctx: Context) -> defer.Deferred:
        def cancel(_: Any) -> None:
            self.cancelled += 1

        return defer.Deferred(cancel)


class Chatty(Command):
    """Streams a line each time it is asked to, until it is stopped."""

    name = "chatty"
    summary = "Talk a lot."
    streams = True
    max_output = 100
    params = (Param("lines", Int(0, 1000), default=0),)

    def run(self, ctx: Context, lines: int = 0) -> defer.Deferred:
        self.ctx = ctx
        self.done: defer.Deferred = defer.Deferred()
        for i in range(lines):
            ctx.out.line(f"line {i:04d} " + "x" * 10)
        return self.done


class FakeChannel:
    """What CommandSession uses of conch's session process protocol and channel."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.status: int | None = None
        self.closed = False
        self.session = self
        self.conn = self

    def makeConnection(self, transport: Any) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out += data

    def writeExtended(self, kind: int, data: bytes) -> None:
        self.err += data

    def sendRequest(self, channel: Any, kind: bytes, data: bytes) -> None:
        self.status = int.from_bytes(data, "big")

    def loseConnection(self) -> None:
        self.closed = True

    def pause_input(self) -> None:
        pass

    def resume_input(self) -> None:
        pass


class ContractTests(OutsideTreeTempMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        os.makedirs(self.root)
        with open(os.path.join(self.root, "a.txt"), "w") as f:
            f.write("alpha")
        self.core = core = make_core(self.root)
        self.reactor = core.reactor
        self.net = FakeNetwork(open_ports={22})
        registry = core.registry
        registry._commands["portscan"] = PortScan(socket_factory=self.net.socket)
        self.slow, self.chatty = Slow(), Chatty()
        registry.add(self.slow)
        registry.add(self.chatty)
        portal = build_portal(Realm(), [InMemoryUsernamePasswordDatabaseDontUse(ops=b"pw")])
        registry.add(Login(PasswordLogin(portal)))
        uploads = Uploads(UploadSettings(max_upload=1000), b"k" * 32)
        registry.add(UploadCommand(uploads))
        server = pb_factory(core, portal, upload=consumer_starter(uploads.begin))
        client = pb.PBClientFactory()
        addr = IPv4Address("TCP", "127.0.0.1", 4321)
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(addr), lambda: client.buildProtocol(addr))
        root = self.pumped(client.getRootObject())
        self.avatar = self.pumped(root.callRemote("authenticate", "ops", "pw"))

    def pumped(self, d: Any) -> Any:
        self.pump.flush()
        return self.successResultOf(d)

    def settle(self) -> None:
        """Let fake children answer and fake time pass, as the commands need."""
        for _ in range(3):
            for process in self.reactor.processes:
                if not process.ended:
                    process.out(b"a log line\n")
                    process.exit(0)
            self.reactor.advance(0)
            self.pump.flush()

    # -- the doors -----------------------------------------------------------

    def line(self, words: list[str], settle: bool = True) -> tuple[list[str], Any]:
        protocol = LineProtocol(self.core, LineSettings(greeting="", idle_timeout=0))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        assert protocol.ctx is not None  # set in connectionMade
        protocol.ctx.user = "ops"  # as after a login
        protocol.dataReceived(" ".join(words).encode() + b"\r\n")
        if settle:
            self.settle()
        return transport.value().decode().splitlines(), transport

    def ssh(self, words: list[str], settle: bool = True) -> FakeChannel:
        avatar = SSHAvatar(self.core, Account("ops"), SSHSettings())
        session = CommandSession(avatar)
        channel = FakeChannel()
        session.execCommand(channel, " ".join(words).encode())
        self.reactor.advance(0)  # exec starts once conch has answered the request
        if settle:
            self.settle()
        return channel

    def pb(self, name: str, **kwargs: Any) -> defer.Deferred:
        d = self.avatar.callRemote(name, **kwargs)
        self.settle()
        return d

    # -- the promises ----------------------------------------------------------

    def test_every_command_has_a_sample(self) -> None:
        names = {c.name for c in self.core.registry.commands()}
        self.assertEqual(names - set(SAMPLES) - set(SPECIAL), set())

    def test_every_command_runs_on_every_door(self) -> None:
        for command in self.core.registry.commands():
            if command.name in SPECIAL or command.name in ("slow", "chatty"):
                continue
            words, kwargs, shows = SAMPLES[command.name]
            lines, _ = self.line([command.name, *words])
            self.assertIn(shows, "\n".join(lines), f"line door: {command.name}")
            channel = self.ssh([command.name, *words])
            self.assertEqual((channel.status, channel.err), (0, b""), command.name)
            self.assertIn(shows, channel.out.decode(), f"ssh exec: {command.name}")
            value = self.successResultOf(self.pb(command.name, **kwargs))
            self.assertIsNotNone(value, f"pb: {command.name}")
            d = self.avatar.callRemote("call", command.name, **kwargs)
            self.settle()
            self.assertEqual(type(self.successResultOf(d)), type(value), command.name)

    def test_help_lists_exactly_what_each_door_serves(self) -> None:
        registry = self.core.registry
        for door in DOORS:
            served = [c.name for c in registry.commands(door)]
            self.assertIn("ping", served)
            if door == "line":
                lines, _ = self.line(["help"])
            elif door == "ssh":
                lines = self.ssh(["help"]).out.decode().splitlines()
            else:
                listed = self.successResultOf(self.pb("help"))
                self.assertEqual(sorted(listed), served)
                continue
            names = [line.split()[0] for line in lines[1:-1]]
            self.assertEqual(names, served, door)
        self.assertNotIn("login", [c.name for c in registry.commands("ssh")])
        self.assertNotIn("exit", [c.name for c in registry.commands("pb")])
        # A command a door does not serve is unknown there, in the same words.
        self.assertEqual(self.ssh(["login", "ops", "pw"]).err, b"Command not found.\n")
        failure = self.failureResultOf(self.pb("exit"))
        self.assertEqual(failure.value, "Command not found.")

    def test_deadline_ends_a_command_the_same_way_on_every_door(self) -> None:
        message = "deadline exceeded: stopped after 5 s"
        _, transport = self.line(["slow"], settle=False)
        self.reactor.advance(5)
        self.assertEqual(transport.value().decode().splitlines(), [f"Error: {message}"])
        channel = self.ssh(["slow"], settle=False)
        self.reactor.advance(5)
        self.assertEqual((channel.status, channel.err), (124, f"Error: {message}\n".encode()))
        d = self.avatar.callRemote("slow")
        self.pump.flush()
        self.reactor.advance(5)
        self.pump.flush()
        failure = self.failureResultOf(d)
        self.assertEqual(failure.value, message)
        self.assertIn(b"CommandTimedOut", failure.type)
        self.assertEqual(self.slow.cancelled, 3)  # the work itself was told to stop

    def test_output_cap_ends_a_command_the_same_way_on_every_door(self) -> None:
        message = "output limit exceeded: stopped after 100 bytes"
        _, transport = self.line(["chatty", "20"])
        self.reactor.advance(0)
        lines = transport.value().decode().splitlines()
        self.assertEqual(lines[-1], f"Error: {message}")
        self.assertLessEqual(sum(len(x) + 1 for x in lines[:-1]), 100)
        channel = self.ssh(["chatty", "20"])
        self.reactor.advance(0)
        self.assertEqual((channel.status, channel.err), (1, f"Error: {message}\n".encode()))
        lines_seen: list[str] = []

        class Observer(pb.Referenceable):
            def remote_line(self, text: str) -> None:
                lines_seen.append(text)

        d = self.avatar.callRemote("chatty", 20, observer=Observer())
        self.pump.flush()
        self.reactor.advance(0)
        self.pump.flush()
        self.assertEqual(self.failureResultOf(d).value, message)
        self.assertLessEqual(len(lines_seen), 5)

    def test_a_value_too_large_to_print_is_one_error_line(self) -> None:
        for i in range(20):
            open(os.path.join(self.root, f"file-{i:02d}"), "w").close()
        self.core.max_output = 100
        lines, _ = self.line(["ls"])
        self.assertEqual(lines, ["Error: output limit exceeded: stopped after 100 bytes"])
        channel = self.ssh(["ls"])
        self.assertEqual((channel.status, channel.err),
                         (1, b"Error: output limit exceeded: stopped after 100 bytes\n"))
        self.core.max_output = 0  # no cap
        lines, _ = self.line(["ls"])
        self.assertEqual(len(lines), 21)
