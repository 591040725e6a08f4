"""The SSH shell: an interactive terminal, or one command a line without one.

With a pty, :class:`ShellProtocol` is a
:class:`~twisted.conch.recvline.HistoricRecvLine` (line editing, history) over
an insults terminal: prompt ``cmdserver> ``, UTF-8 input, type-ahead while a
command runs, Ctrl-C cancels the running command, Ctrl-D or ``exit`` leaves.
Without one, :class:`PipedCommands` runs the lines it reads like exec would.
Both print the line door's text.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.conch.recvline import HistoricRecvLine
from twisted.protocols.basic import LineReceiver

from cmdserver.core import TextReply
from cmdserver.text import shown

if TYPE_CHECKING:
    from cmdserver.doors.ssh.session import CommandSession

PROMPT = b"cmdserver> "
QUEUE_HIGH = 64  # lines queued by the piped shell at which it stops reading
QUEUE_LOW = 16  # and at which it starts again
TYPEAHEAD_LIMIT = 4096  # keys kept while a command runs; more are dropped
HISTORY_LIMIT = 500  # lines of history per session
CTRL_A, CTRL_C, CTRL_D, CTRL_E, CTRL_L = b"\x01", b"\x03", b"\x04", b"\x05", b"\x0c"


def render(text: str, end: bytes) -> bytes:
    """One output line as bytes, with control and format characters made harmless."""
    return shown(text).encode("utf-8", "backslashreplace") + end


class LineSink:
    """A command's output sink writing lines to the channel.

    A command's output source registered here (``registerProducer``) is paused
    while the client's window for the channel is closed (see
    :meth:`CommandSession.output_blocked`).
    """

    def __init__(self, write: Callable[[bytes], None], end: bytes,
                 session: CommandSession | None = None) -> None:
        self.write = write
        self.end = end
        self.session = session

    def line(self, text: str) -> None:
        self.write(render(text, self.end))

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.session is not None:
            self.session.register_output(producer)

    def unregisterProducer(self) -> None:
        if self.session is not None:
            self.session.unregister_output()


class PipedCommands(LineReceiver):
    """A shell without a terminal (``ssh host < commands``): one command a line.

    Like exec, but for many lines: output on stdout, failures on stderr, no
    prompt and no echo.  Lines are queued and run one after another; at the end
    of input the channel closes with the exit status of the last command.

    Bounded like the line door: while the client does not read our output (its
    window is closed) no further command starts; at ``QUEUE_HIGH`` queued lines
    the channel's window is held closed, so the client stops sending (at most
    one window, kept as bytes), until the queue is down to ``QUEUE_LOW``.
    """

    delimiter = b"\n"

    def __init__(self, session: CommandSession) -> None:
        self.session = session
        self.MAX_LENGTH = session.avatar.settings.max_line
        self.queue: deque[bytes] = deque()
        self.status = 0
        self.ended = False
        self._draining = False
        self._input_held = False

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if not self._busyReceiving:  # (else the outer call is still taking lines)
            self._hold_input(self.paused)

    def lineReceived(self, line: bytes) -> None:
        self.queue.append(line)
        if len(self.queue) >= QUEUE_HIGH:
            self.paused = True  # LineReceiver keeps the rest as bytes
        self._next()

    def _hold_input(self, hold: bool) -> None:
        """Keep the client's window closed while lines wait as bytes: it is reopened
        only once they are all taken, so at most one window is ever kept."""
        if hold != self._input_held:
            self._input_held = hold
            if hold:
                self.session.pause_input()
            else:
                self.session.resume_input()

    def output_resumed(self) -> None:
        """The client reads again: run what waits."""
        self._next()

    def _take(self) -> bytes:
        line = self.queue.popleft()
        if self.paused and len(self.queue) <= QUEUE_LOW:
            self.paused = False
            self.dataReceived(b"")  # the lines kept as bytes meanwhile (queued, not run)
        return line

    def lineLengthExceeded(self, line: bytes) -> None:
        self.queue.clear()
        self.session.write_reply(TextReply(
            [f"Error: line too long (the limit is {self.MAX_LENGTH} bytes)"], False))
        self.session.finish(1)

    def eof(self) -> None:
        self.ended = True
        self._next()

    def _next(self) -> None:
        """Run queued lines one by one (a loop, not recursion: replies may be synchronous)."""
        if self._draining:
            return
        self._draining = True
        try:
            while (self.session.running is None and not self.session.is_closed
                   and not self.session.output_paused):
                if self.session.closing or (self.ended and not self.queue and not self.paused):
                    self.session.finish(0 if self.session.closing else self.status)
                    return
                if not self.queue:
                    return
                text, error = command_text(self._take().removesuffix(b"\r"))
                if error is not None:
                    self._done(TextReply([error], False))
                elif text.strip():
                    out = LineSink(self.session.write_out, b"\n", self.session)
                    self.session.run(text, out, self._done)
        finally:
            self._draining = False

    def _done(self, reply: TextReply) -> None:
        self.status = 0 if reply.ok else 1
        self.session.write_reply(reply)
        self._next()


def command_text(raw: bytes) -> tuple[str, str | None]:
    """A command line without a terminal: its text, or the line door's error."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "", "Error: the command is not valid UTF-8"
    if not text.replace("\t", " ").isprintable():
        return "", "Error: control characters are not allowed in a command"
    return text, None


class ShellProtocol(HistoricRecvLine):
    """The interactive shell: prompt, line editing, history, Ctrl-C and Ctrl-D.

    Input is UTF-8: the bytes of a multi-byte character are gathered into one
    character of the line editor (one cursor step, one Backspace).  Keys typed
    while a command runs are kept (type-ahead, up to ``TYPEAHEAD_LIMIT`` keys)
    and take effect, echoed, once its reply and the prompt are out; Ctrl-C
    cancels the command and drops them, as a terminal's interrupt flushes its
    input.  The line is at most ``max_line`` bytes, the history
    ``HISTORY_LIMIT`` lines.
    """

    ps = (PROMPT, PROMPT)

    def __init__(self, session: CommandSession) -> None:
        self.session = session
        self.max_line = session.avatar.settings.max_line
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self._typeahead: deque[tuple[Any, Any]] = deque()
        self._replaying = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.keyHandlers.update({
            CTRL_C: self.handle_INT,
            CTRL_D: self.handle_EOF,
            CTRL_L: self.handle_FF,
            CTRL_A: self.handle_HOME,
            CTRL_E: self.handle_END,
        })

    def initializeScreen(self) -> None:
        # Unlike RecvLine, do not reset the user's terminal: print below what is there.
        greeting = self.session.avatar.settings.greeting
        if greeting:
            self.terminal.write(render(greeting, b"\n"))
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def terminalSize(self, width: int, height: int) -> None:
        self.width, self.height = width, height  # no redraw: keep the screen as it is

    # -- keys --------------------------------------------------------------

    def keystrokeReceived(self, keyID: Any, modifier: Any) -> None:
        key = keyID
        if isinstance(key, bytes) and (key >= b"\x80" or self._utf8.getstate()[0]):
            key = self._utf8_char(key)
            if key is None:
                return
        elif self._utf8.getstate()[0]:
            self._utf8.reset()  # a function key cut a character short: drop the part
        if self.session.running is not None and key not in (CTRL_C, CTRL_D):
            if len(self._typeahead) < TYPEAHEAD_LIMIT:
                self._typeahead.append((key, modifier))
            return
        self._key(key, modifier)

    def _utf8_char(self, byte: bytes) -> bytes | None:
        """The next byte of UTF-8 input: a whole character once complete, else None."""
        try:
            text = self._utf8.decode(byte)
        except UnicodeDecodeError:
            self._utf8.reset()
            if byte < b"\x80":  # a plain key after a broken sequence still counts
                return byte
            self._bell()
            return None
        return text.encode("utf-8") if text else None

    def _key(self, keyID: Any, modifier: Any) -> None:
        handler = self.keyHandlers.get(keyID)
        if handler is not None:
            handler()
        elif isinstance(keyID, bytes) and keyID.decode("utf-8", "replace").isprintable():
            self.characterReceived(keyID, False)

    def _bell(self) -> None:
        if self.session.running is None:
            self.terminal.write(b"\a")

    def characterReceived(self, ch: bytes, moreCharactersComing: bool) -> None:
        if self.mode == "insert" or self.lineBufferIndex >= len(self.lineBuffer):
            if self._line_bytes() + len(ch) > self.max_line:
                self._bell()  # the line door's limit: refuse the key, keep the line
                return
        super().characterReceived(ch, moreCharactersComing)

    def handle_TAB(self) -> None:
        if self._line_bytes() + self.TABSTOP <= self.max_line:
            super().handle_TAB()

    def _line_bytes(self) -> int:
        return sum(map(len, self.lineBuffer))

    def _deliverBuffer(self, buf: bytes) -> None:
        # A history line back into the editor: one element per character, not per byte.
        for ch in buf.decode("utf-8", "replace"):
            self.characterReceived(ch.encode("utf-8"), True)

    def handle_RETURN(self) -> None:
        if len(self.historyLines) >= HISTORY_LIMIT:
            del self.historyLines[:len(self.historyLines) - HISTORY_LIMIT + 1]
        super().handle_RETURN()

    # -- commands ------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        text, error = command_text(line)
        if error is not None:
            self.terminal.write(render(error, b"\n"))
            self.drawInputLine()
            return
        text = text.strip()
        if not text:
            self.drawInputLine()
            return
        self.session.run(text, LineSink(self.terminal.write, b"\n", self.session), self._reply)

    def _reply(self, reply: TextReply) -> None:
        for text in reply.lines:
            self.terminal.write(render(text, b"\n"))
        if self.session.closing:
            self._typeahead.clear()
            self.session.finish(0)
            return
        self.drawInputLine()
        self._replay()

    def _replay(self) -> None:
        """Type what was typed while the command ran, up to the next command."""
        if self._replaying:
            return  # a command answered at once inside the loop below
        self._replaying = True
        try:
            while (self._typeahead and self.session.running is None
                   and not self.session.is_closed):
                self._key(*self._typeahead.popleft())
        finally:
            self._replaying = False

    def handle_INT(self) -> None:
        self.terminal.write(b"^C\n")
        self._typeahead.clear()
        if self.session.running is not None:
            self.session.cancel()  # the reply (Error: cancelled) redraws the prompt
            return
        self.lineBuffer = []
        self.lineBufferIndex = 0
        self.drawInputLine()

    def handle_EOF(self) -> None:
        if self.session.running is not None:
            self._typeahead.clear()
            self.session.end_session()  # first: the cancelled reply then ends the shell
            self.session.cancel()
        elif self.lineBuffer:
            self.terminal.write(b"\a")
        else:
            self.terminal.write(b"\n")
            self.session.finish(0)

    def handle_FF(self) -> None:
        self.terminal.eraseDisplay()
        self.terminal.cursorHome()
        self.drawInputLine()
