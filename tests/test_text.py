"""Untrusted text never reaches a terminal or a log raw: C0 and C1 controls, bidi
overrides and other invisible format characters are replaced or escaped."""

from __future__ import annotations

import os

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from cmdserver.cli.call import safe
from cmdserver.doors.line.protocol import LineProtocol, LineSettings
from cmdserver.doors.ssh.shell import render
from cmdserver.errors import CommandError
from cmdserver.text import REPLACEMENT, escaped, shown
from tests.helpers import OutsideTreeTempMixin, make_core

NASTY = {
    "\x1b[2J": "C0 escape",
    "\x9b2J": "C1 CSI",
    "\x9d0;title\x9c": "C1 OSC and ST",
    "\u202egnp.exe": "right-to-left override",
    "\u2066isolate\u2069": "bidi isolate",
    "zero\u200bwidth": "zero-width space",
    "line\u2028sep": "line separator",
}


class TextTests(unittest.TestCase):
    def test_shown_replaces_every_unprintable_character(self) -> None:
        for text, what in NASTY.items():
            out = shown(text)
            self.assertTrue(out.replace(REPLACEMENT, "").isprintable(), what)
            self.assertIn(REPLACEMENT, out, what)
        self.assertEqual(shown("a\tb c"), "a\tb c")  # tab and space stay
        self.assertEqual(shown("plain"), "plain")

    def test_escaped_keeps_them_visible(self) -> None:
        self.assertEqual(escaped("a\x1bb\x9bc\u202ed"), "a\\x1bb\\x9bc\\u202ed")
        self.assertEqual(escaped("héllo"), "héllo")
        for text in NASTY:
            self.assertTrue(escaped(text).isprintable())

    def test_error_lines_and_the_cli_escape(self) -> None:
        self.assertEqual(CommandError("no such file: \u202eevil").text,
                         "Error: no such file: \\u202eevil")
        self.assertEqual(safe("x\x9dy"), "x\\x9dy")

    def test_ssh_output(self) -> None:
        self.assertEqual(render("a\x9bb\u202ec", b"\n"),
                         f"a{REPLACEMENT}b{REPLACEMENT}c\n".encode())


class LineDoorTests(OutsideTreeTempMixin, unittest.TestCase):
    def test_file_names_reach_the_terminal_escaped(self) -> None:
        root = self.mktemp()
        os.makedirs(root)
        for name in NASTY:
            open(os.path.join(root, name.replace("/", "_")), "w").close()
        core = make_core(root)
        protocol = LineProtocol(core, LineSettings(greeting="", idle_timeout=0))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4000))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"ls\r\n")
        out = transport.value().decode()
        lines = out.split("\r\n")[:-1]
        self.assertEqual(len(lines), len(NASTY))
        for line in lines:
            self.assertTrue(line.replace(REPLACEMENT, "").isprintable(), repr(line))
