"""One refusal, one wording: the line a text door prints and the PB error's message.

Each row is the same refusal asked of the line door (through StringTransport)
and of the PB door (real brokers joined by an iosim pump, so the message is
the one a PB client receives).  The text door's line must be ``Error: `` and
the PB message, except for the three answers whose fixed wording has no
prefix on the text doors.  Where PB has no words to parse (argument count,
names and types), its message keeps the text doors' style: ``…; usage: …``.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.spread import pb
from twisted.test import iosim
from twisted.trial import unittest

from cmdserver.auth.gate import GateSettings, LoginGate
from cmdserver.auth.portal import Realm, build_portal
from cmdserver.commands.account import Login, PasswordLogin
from cmdserver.commands.upload.command import UploadCommand
from cmdserver.commands.upload.engine import Uploads, UploadSettings
from cmdserver.core import NOT_FOUND_TEXT
from cmdserver.doors.line.protocol import LineProtocol, LineSettings
from cmdserver.doors.pb.door import pb_factory
from cmdserver.doors.pb.upload import consumer_starter
from cmdserver.policy import Policy, ScanPolicy
from tests.helpers import OutsideTreeTempMixin, make_core

# The text doors print these as they are (no "Error: "), as their issue fixed them.
UNPREFIXED = {NOT_FOUND_TEXT, "Please provide a path.", "Please provide a host."}
MAC = "ab" * 32
ALGOS = "(use one of blake2b, md5, sha1, sha256, sha512)"

# (text door line, PB method and arguments): the same refusal asked of each door.
SAME_REFUSAL: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
    ("nosuch", ("nosuch",), {}),
    ("help nosuch", ("help", "nosuch"), {}),
    ("lastlog 0", ("lastlog", 0), {}),
    ("lastlog 1001", ("lastlog", 1001), {}),
    ("comphash", ("comphash",), {}),
    ("comphash --algo md5", ("comphash",), {"algo": "md5"}),
    ('comphash ""', ("comphash", ""), {}),
    ("comphash --algo crc a.txt", ("comphash", "a.txt", "crc"), {}),
    ("comphash ../outside.txt", ("comphash", "../outside.txt"), {}),
    ("comphash /etc/passwd", ("comphash", "/etc/passwd"), {}),
    ("comphash sub", ("comphash", "sub"), {}),
    ("comphash nope.bin", ("comphash", "nope.bin"), {}),
    ("ls ../..", ("ls", "../.."), {}),
    ("ls a.txt", ("ls", "a.txt"), {}),
    ("ls nope", ("ls", "nope"), {}),
    ("portscan", ("portscan",), {}),
    ("portscan 10.0.0.1", ("portscan", "10.0.0.1"), {}),
    ("portscan a/b", ("portscan", "a/b"), {}),
    ("portscan -x", ("portscan", "-x"), {}),
    ('portscan ""', ("portscan", ""), {}),
    ('portscan "two words"', ("portscan", "two words"), {}),
    ("portscan 127.0.0.1 0", ("portscan", "127.0.0.1", "0"), {}),
    ("portscan 127.0.0.1 0", ("portscan", "127.0.0.1", [0]), {}),
    ("portscan 127.0.0.1 5-1", ("portscan", "127.0.0.1", "5-1"), {}),
    ("portscan 127.0.0.1 x", ("portscan", "127.0.0.1", "x"), {}),
    ('portscan 127.0.0.1 ""', ("portscan", "127.0.0.1", ""), {}),
    ("portscan 127.0.0.1 1-200", ("portscan", "127.0.0.1", "1-200"), {}),
    (f"upload ../x 1 {MAC}", ("upload", "../x", 1, MAC), {}),
    (f"upload a.txt 1 {MAC}", ("upload", "a.txt", 1, MAC), {}),
    (f"upload n -1 {MAC}", ("upload", "n", -1, MAC), {}),
    (f"upload n 5000 {MAC}", ("upload", "n", 5000, MAC), {}),
    ("upload n 1 00", ("upload", "n", 1, "00"), {}),
    (f"upload n 1 {MAC} --mac md5", ("upload", "n", 1, MAC), {"mac": "md5"}),
    ("upload n 1 - --mac md5", ("upload", "n", 1, "-"), {"mac": "md5"}),
    (f'upload "" 1 {MAC}', ("upload", "", 1, MAC), {}),
]

# Refusals PB cannot meet in the same form (it has no words to parse): the text
# door's line and the PB message, both a usage error in the same style.
USAGE_STYLE: list[tuple[str, str, tuple[Any, ...], dict[str, Any], str]] = [
    ("ping x", "Error: usage: ping", ("ping", "x"), {}, "usage: ping()"),
    ("help a b", "Error: usage: help [COMMAND]", ("help", "a", "b"), {},
     "usage: help(command=None)"),
    ("lastlog 1 2", "Error: usage: lastlog [N]   (1..1000)", ("lastlog", 1, None, 2), {},
     "usage: lastlog(n=10)"),
    ("lastlog x", "Error: not a number: x; usage: lastlog [N]   (1..1000)",
     ("lastlog", "x"), {}, "n must be an integer; usage: lastlog(n=10)"),
    ("comphash --bogus a.txt",
     "Error: unknown option --bogus; usage: comphash [--algo blake2b|md5|sha1|sha256|sha512] "
     "PATH", ("comphash", "a.txt"), {"bogus": 1},
     "unknown argument bogus; usage: comphash(path, algo='sha256')"),
    ("ls a b", "Error: usage: ls [PATH]", ("ls", "a", None, "b"), {},
     "usage: ls(path=None)"),
    ("upload n 1", "Error: usage: upload NAME SIZE HMAC [--mac ALG] [--sha256]",
     ("upload", "n", 1), {},
     "usage: upload(name, size, hmac, mac='hmac-sha256', sha256=False)"),
    ("upload n x " + MAC, "Error: SIZE must be a whole number of bytes: x",
     ("upload", "n", "x", MAC), {}, "SIZE must be a whole number of bytes: x"),
]


def text_line(pb_message: str) -> str:
    """The line a text door prints for a refusal whose PB message is ``pb_message``."""
    return pb_message if pb_message in UNPREFIXED else f"Error: {pb_message}"


class RefusalParityTests(OutsideTreeTempMixin, unittest.TestCase):
    def setUp(self) -> None:
        base = self.mktemp()
        self.root = os.path.join(base, "root")
        os.makedirs(os.path.join(self.root, "sub"))
        with open(os.path.join(self.root, "a.txt"), "w") as f:
            f.write("alpha")
        with open(os.path.join(base, "outside.txt"), "w") as f:
            f.write("outside")
        self.core = core = make_core(self.root)
        # The words, not the penalties or the deadline (tests/auth/test_gate.py has those).
        core.gate = LoginGate(core, GateSettings(penalty=0, login_grace=3600))
        core.policy = Policy([self.root], ScanPolicy(max_ports=100))
        self.clock = core.reactor
        portal = build_portal(Realm(), [InMemoryUsernamePasswordDatabaseDontUse(ops=b"s3cret")])
        core.registry.add(Login(PasswordLogin(portal)))
        uploads = Uploads(UploadSettings(max_upload=1000), b"k" * 32)
        core.registry.add(UploadCommand(uploads))
        server = pb_factory(core, portal, upload=consumer_starter(uploads.begin))
        client = pb.PBClientFactory()
        addr = IPv4Address("TCP", "127.0.0.1", 4321)
        _, _, self.pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(addr), lambda: client.buildProtocol(addr))
        self.root_object = self.pumped(client.getRootObject())
        self.avatar = self.pumped(self.root_object.callRemote("authenticate", "ops", "s3cret"))

    def pumped(self, d: Any) -> Any:
        self.pump.flush()
        return self.successResultOf(d)

    def pb_message(self, ref: pb.RemoteReference, *call: Any, **kw: Any) -> str:
        """The message of the pb.Error a PB client gets for the call."""
        d = ref.callRemote(*call, **kw)
        self.pump.flush()
        failure = self.failureResultOf(d)
        value = failure.value
        return value.decode() if isinstance(value, bytes) else str(value)

    def text_door(self, line: str, login: str = "off") -> list[str]:
        """What the line door prints for one line (answered on the fake clock)."""
        protocol = LineProtocol(self.core, LineSettings(login=login, greeting="",
                                                        idle_timeout=0))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 40000))
        protocol.makeConnection(transport)
        protocol.dataReceived(line.encode() + b"\r\n")
        self.clock.advance(0)
        self.clock.advance(60)  # a command that takes a while
        return transport.value().decode().splitlines()

    def test_same_refusal_same_words(self) -> None:
        differ = []
        for line, call, kw in SAME_REFUSAL:
            message = self.pb_message(self.avatar, *call, **kw)
            printed = self.text_door(line)
            if printed != [text_line(message)]:
                differ.append((line, printed, message))
        self.assertEqual(differ, [])

    def test_pb_argument_errors_are_usage_errors_in_the_text_doors_style(self) -> None:
        seen = [(self.text_door(line), self.pb_message(self.avatar, *call, **kw))
                for line, _, call, kw, _ in USAGE_STYLE]
        self.assertEqual(seen, [([text], message) for _, text, _, _, message in USAGE_STYLE])

    def test_command_before_login(self) -> None:
        # On PB every command needs authenticate; the root answers as a text door
        # where login is required.
        for name, args in (("lastlog", (5,)), ("ls", ("..",)), ("upload", ("n", 1, MAC))):
            message = self.pb_message(self.root_object, name, *args)
            self.assertEqual(self.text_door(f"{name} {' '.join(map(str, args))}", "required"),
                             [text_line(message)], name)
        # A name that is no command at all is unknown on both.
        self.assertEqual(self.text_door("nosuch"),
                         [text_line(self.pb_message(self.root_object, "nosuch"))])

    def test_failed_login(self) -> None:
        message = self.pb_message(self.root_object, "authenticate", "ops", "wrong")
        self.assertEqual(self.text_door("login ops wrong", "required"), [text_line(message)])
        self.assertEqual(message, "login failed")
        message = self.pb_message(self.root_object, "authenticate", "nobody", "x")
        self.assertEqual(self.text_door("login nobody x", "required"), [text_line(message)])

    def test_fifth_failed_login_closes_with_the_same_words(self) -> None:
        messages = [self.pb_message(self.root_object, "authenticate", "ops", "no")
                    for _ in range(5)]
        self.clock.advance(0)  # the PB door hangs up once the answer is out
        self.pump.flush()
        self.assertTrue(self.root_object.broker.disconnected)
        protocol = LineProtocol(self.core, LineSettings(login="required", greeting="",
                                                        idle_timeout=0))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.8", 40000))
        protocol.makeConnection(transport)
        for _ in range(5):
            protocol.dataReceived(b"login ops no\r\n")
            self.clock.advance(0)
            self.clock.advance(60)
        lines = transport.value().decode().splitlines()
        self.assertEqual(lines, [text_line(m) for m in messages])
        self.assertEqual(messages[-1], "login failed; too many failures, closing")
