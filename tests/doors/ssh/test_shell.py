"""The interactive SSH shell through the real insults/recvline stack on a StringTransport:
UTF-8 input, type-ahead while a command runs, Ctrl-C, and the bounds on line and history."""

from __future__ import annotations

from typing import Any

from twisted.conch.insults import insults
from twisted.internet.defer import Deferred
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from cmdserver.core import TextReply
from cmdserver.doors.ssh import shell as ssh_shell
from cmdserver.doors.ssh.door import SSHSettings
from cmdserver.doors.ssh.shell import ShellProtocol

LEFT, UP, BACKSPACE = b"\x1b[D", b"\x1b[A", b"\x7f"


class FakeAvatar:
    def __init__(self, max_line: int) -> None:
        self.settings = SSHSettings(greeting="", max_line=max_line)


class FakeSession:
    """What the shell asks of its CommandSession.

    ``slow`` answers when the test says; other commands answer at once (the
    core's fast path) with ``at_once[text]`` or ``ok``.
    """

    def __init__(self, max_line: int = 4096) -> None:
        self.avatar = FakeAvatar(max_line)
        self.running: Deferred | None = None
        self.ran: list[str] = []
        self.at_once: dict[str, str] = {}  # commands that answer synchronously
        self.cancelled = 0
        self.closing = False
        self.is_closed = False
        self.status: int | None = None

    def run(self, text: str, out: Any, done: Any) -> None:
        self.ran.append(text)
        if text != "slow":
            done(TextReply([self.at_once.get(text, "ok")], True))
            return
        d: Deferred = Deferred()

        def fired(reply: TextReply) -> None:
            self.running = None
            done(reply)

        self.running = d.addCallback(fired)

    def answer(self, text: str, ok: bool = True) -> None:
        assert self.running is not None
        self.running.callback(TextReply([text], ok))

    def cancel(self) -> None:
        self.cancelled += 1
        if self.running is not None:
            self.answer("Error: cancelled", False)

    def end_session(self) -> None:
        self.closing = True

    def finish(self, status: int) -> None:
        self.status = status
        self.is_closed = True


class ShellTest(unittest.TestCase):
    def setUp(self) -> None:
        self.make()

    def make(self, max_line: int = 4096) -> None:
        self.session = FakeSession(max_line)
        self.terminal = insults.ServerProtocol(ShellProtocol, self.session)
        self.transport = StringTransport()
        self.terminal.makeConnection(self.transport)
        assert isinstance(self.terminal.terminalProtocol, ShellProtocol)
        self.shell: ShellProtocol = self.terminal.terminalProtocol

    def type(self, data: bytes) -> None:
        self.terminal.dataReceived(data)

    def output(self) -> bytes:
        return self.transport.value()

    # -- UTF-8 ---------------------------------------------------------------

    def test_multibyte_characters_make_one_line(self) -> None:
        self.type("comphash café.txt\r".encode())
        self.assertEqual(self.session.ran, ["comphash café.txt"])
        self.assertIn("comphash café.txt".encode(), self.output())

    def test_a_multibyte_character_is_one_editor_character(self) -> None:
        # é, Left, x: the cursor steps over the whole character, not one byte of it.
        self.type("é".encode() + LEFT + b"x\r")
        # Backspace removes the whole character.
        self.type("aé".encode() + BACKSPACE + b"\r")
        # Split across reads (as a slow link delivers it).
        euro = "€".encode()
        for byte in euro:
            self.type(bytes([byte]))
        self.type(b"\r")
        self.assertEqual(self.session.ran, ["xé", "a", "€"])

    def test_invalid_utf8_is_dropped_with_a_bell(self) -> None:
        self.type(b"a\xffb\r")
        self.type(b"\xc3c\r")  # a character cut short by a plain key: the key counts
        self.assertEqual(self.session.ran, ["ab", "c"])
        self.assertIn(b"\a", self.output())

    def test_unprintable_characters_are_not_taken(self) -> None:
        self.type("a\u200bb\x0bc\u0085d\r".encode())  # zero width space, VT, NEL
        self.assertEqual(self.session.ran, ["abcd"])

    def test_history_recalls_multibyte_characters_whole(self) -> None:
        self.session.at_once["café"] = "done"
        self.type("café\r".encode())
        self.type(UP + LEFT + BACKSPACE + b"\r")  # delete the f before the é
        self.assertEqual(self.session.ran, ["café", "caé"])

    # -- type-ahead ----------------------------------------------------------

    def test_typing_while_a_command_runs_is_kept_and_echoed_after(self) -> None:
        self.session.at_once["ping"] = "pong"
        self.type(b"slow\r")
        before = len(self.output())
        self.type(b"ping\r")
        self.assertEqual(self.session.ran, ["slow"])
        self.assertNotIn(b"ping", self.output()[before:])  # not echoed yet
        self.session.answer("slow done")
        after = self.output()[before:]
        self.assertEqual(self.session.ran, ["slow", "ping"])
        self.assertTrue(after.endswith(b"ping\r\npong\r\ncmdserver> "), after)
        # The reply, then the prompt, then the echo of what was typed.
        reply = after.index(b"slow done")
        prompt = after.index(b"cmdserver> ", reply)
        self.assertGreater(after.index(b"ping", prompt), prompt)

    def test_type_ahead_runs_commands_in_order(self) -> None:
        self.session.at_once.update({"a": "A", "b": "B"})
        self.type(b"slow\r")
        self.type(b"a\rb\rslow\rc\r")
        self.session.answer("first")
        self.assertEqual(self.session.ran, ["slow", "a", "b", "slow"])
        self.session.answer("second")
        self.assertEqual(self.session.ran, ["slow", "a", "b", "slow", "c"])

    def test_ctrl_c_cancels_and_drops_the_type_ahead(self) -> None:
        self.type(b"slow\r")
        self.type(b"ping\r\x03")
        self.assertEqual(self.session.cancelled, 1)
        self.assertIsNone(self.session.running)
        self.assertEqual(self.session.ran, ["slow"])
        self.assertIn(b"^C\r\nError: cancelled\r\ncmdserver> ", self.output())
        self.type(b"ls\r")
        self.assertEqual(self.session.ran, ["slow", "ls"])
        self.assertTrue(self.output().endswith(b"ls\r\nok\r\ncmdserver> "))

    def test_ctrl_d_while_running_cancels_and_leaves(self) -> None:
        self.type(b"slow\r")
        self.type(b"ping\r\x04")
        self.assertEqual((self.session.cancelled, self.session.status), (1, 0))
        self.assertEqual(self.session.ran, ["slow"])

    def test_type_ahead_is_bounded(self) -> None:
        self.patch(ssh_shell, "TYPEAHEAD_LIMIT", 5)
        self.type(b"slow\r")
        self.type(b"abcdefgh\r")
        self.session.answer("ok")
        self.type(b"\r")
        self.assertEqual(self.session.ran, ["slow", "abcde"])

    # -- bounds ---------------------------------------------------------------

    def test_line_is_bounded_in_bytes(self) -> None:
        self.make(max_line=8)
        self.type("abcdeéfgh\r".encode())  # é takes two bytes: abcdeé is 7, f is the 8th
        self.assertEqual(self.session.ran, ["abcdeéf"])
        self.assertIn(b"\a", self.output())
        self.type(b"abcdefg\t\r")  # a tab that would pass the limit is refused too
        self.assertEqual(self.session.ran[-1], "abcdefg")

    def test_history_is_bounded(self) -> None:
        self.patch(ssh_shell, "HISTORY_LIMIT", 3)
        for word in "abcde":
            self.session.at_once[word] = word
            self.type(word.encode() + b"\r")
        self.assertEqual(self.shell.historyLines, [b"c", b"d", b"e"])
        self.type(UP * 5 + b"\r")
        self.assertEqual(self.session.ran[-1], "c")
