"""SSH session channels: ``ssh host COMMAND`` (exec) and the interactive shell.

Both run text commands through :meth:`CommandCore.run_line`, one at a time per
channel, and print the same text as the line door.  Exec ends with the exit
status 0 when the command succeeded and 1 when it failed, error lines on
stderr; the shell is a :class:`~twisted.conch.recvline.HistoricRecvLine`
(line editing, history) over an insults terminal, where Ctrl-C cancels the
running command and Ctrl-D or ``exit`` leaves.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.conch.insults import insults
from twisted.conch.interfaces import EnvironmentVariableNotPermitted, ISession, ISessionSetEnv
from twisted.conch.recvline import HistoricRecvLine
from twisted.conch.ssh import connection, session
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from zope.interface import implementer

from cmdserver.core import TextReply

if TYPE_CHECKING:
    from cmdserver.doors.ssh import SSHAvatar

log = Logger()

PROMPT = b"cmdserver> "
# Answered "no" without a log line: a liveness probe, not a feature we refuse.
QUIET_REQUESTS = frozenset({b"keepalive@openssh.com"})
ALLOWED_ENV = ("LANG", "TERM")  # and LC_*
INPUT_BUFFER_LIMIT = 1 << 20  # stdin bytes kept until the command says whether it reads them
CTRL_A, CTRL_C, CTRL_D, CTRL_E, CTRL_L = b"\x01", b"\x03", b"\x04", b"\x05", b"\x0c"
# C0 controls (but tab) and DEL: kept out of what a terminal shows.
_SANITIZE = {c: "\N{REPLACEMENT CHARACTER}" for c in [*range(0, 9), *range(10, 32), 127]}


def render(text: str, end: bytes) -> bytes:
    """One output line as bytes, with control characters made harmless."""
    if not text.isprintable():
        text = text.translate(_SANITIZE)
    return text.encode("utf-8", "backslashreplace") + end


class InputConsumer(Protocol):
    """What reads an exec channel's stdin (``ssh host upload … < file``)."""

    def data_received(self, data: bytes) -> None: ...

    def eof_received(self) -> None: ...


class RefusingSSHSession(session.SSHSession):
    """A session channel that logs every request it does not serve.

    Served: ``pty-req``, ``shell``, ``exec``, ``subsystem`` (``sftp``), ``env``
    (a few names), ``window-change``.  Refused: ``x11-req``,
    ``auth-agent-req@openssh.com`` and anything else.
    """

    input_paused = False  # while True the connection does not reopen our window

    def pause_input(self) -> None:
        """Stop the client's data at the SSH window (at most one window more arrives)."""
        self.input_paused = True

    def resume_input(self) -> None:
        self.input_paused = False
        missing = self.localWindowSize - self.localWindowLeft
        if missing > 0 and self.conn is not None:
            self.conn.adjustWindow(self, missing)

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        name = "request_" + requestType.replace(b"-", b"_").decode("ascii", "replace")
        if getattr(self, name, None) is None:
            if requestType not in QUIET_REQUESTS:
                self.avatar.refused("session request", requestType)
            return 0
        return super().requestReceived(requestType, data)


@implementer(ISession, ISessionSetEnv)
class CommandSession:
    """The work behind one session channel: exec one command or run a shell."""

    def __init__(self, avatar: SSHAvatar) -> None:
        self.avatar = avatar
        self.core = avatar.core
        self.width, self.height = 80, 24
        self.proto: Any = None  # SSHSessionProcessProtocol: our way to the channel
        self.pty = False
        self.shell: ShellProtocol | None = None
        self.pipe: PipedCommands | None = None
        self.running: Deferred | None = None
        self._start: Any = None  # the delayed call that starts an exec command
        self._closing = False
        self._closed = False
        self._input: InputConsumer | None = None
        self._input_buffer: list[bytes] | None = []  # None once stdin is discarded
        self._input_size = 0
        self._input_eof = False

    # -- ISession ----------------------------------------------------------

    def getPty(self, term: bytes, windowSize: tuple[int, ...], modes: Any) -> None:
        self.pty = True
        self.height, self.width = windowSize[0] or 24, windowSize[1] or 80

    def windowChanged(self, newWindowSize: tuple[int, ...]) -> None:
        self.height, self.width = newWindowSize[0] or 24, newWindowSize[1] or 80
        if self.shell is not None:
            self.shell.terminalSize(self.width, self.height)

    def setEnv(self, name: bytes, value: bytes) -> None:
        text = name.decode("ascii", "replace")
        if text in ALLOWED_ENV or text.startswith("LC_"):
            return  # harmless: nothing here reads the environment
        self.avatar.refused("env", name)
        raise EnvironmentVariableNotPermitted(name)

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        self.proto = proto
        proto.makeConnection(_ChannelInput(self.input_received))
        # Start after conch has answered the exec request: a command that ends at
        # once must not close the channel before that answer is sent.
        self._start = self.core.reactor.callLater(0, self._run_exec, cmd)

    def openShell(self, proto: Any) -> None:
        self.proto = proto
        if not self.pty:  # `ssh host < commands`: no terminal, no echo, no prompt
            self.pipe = PipedCommands(self)
            proto.makeConnection(_ChannelInput(self.pipe.dataReceived))
            return
        terminal = insults.ServerProtocol(ShellProtocol, self)
        terminal.makeConnection(proto)
        proto.makeConnection(session.wrapProtocol(terminal))
        self.shell = terminal.terminalProtocol
        self.shell.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        if self.shell is not None:  # stdin closed: leave once the command is done
            self.leave()
        elif self.pipe is not None:
            self.pipe.eof()
        else:
            self.input_eof()

    def closed(self) -> None:
        self._closed = True
        if self._start is not None and self._start.active():
            self._start.cancel()
        self._input = None
        self._input_buffer = None
        self.cancel()

    # -- running commands --------------------------------------------------

    def run(self, line: str, out: Any, done: Callable[[TextReply], None]) -> None:
        """Run one command line; ``out`` gets streamed lines, ``done`` the reply."""
        ctx = self.avatar.context(out=out, session=self)
        self.avatar.busy += 1
        d = self.core.run_line(ctx, line)
        if not d.called:
            self.running = d

        def finished(reply: TextReply) -> None:
            self.running = None
            self.avatar.busy -= 1
            if not self._closed:
                done(reply)

        d.addCallback(finished)

    def cancel(self) -> None:
        """Cancel the running command (Ctrl-C, channel closed)."""
        if self.running is not None:
            running, self.running = self.running, None
            running.cancel()

    def end_session(self) -> None:
        """``exit``: leave once the reply is written."""
        self._closing = True

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def is_closed(self) -> bool:
        """The channel is closed or closing: nothing more is run or written."""
        return self._closed

    def leave(self, status: int = 0) -> None:
        """End the channel now, or after the running command, with ``status``."""
        if self.running is not None:
            self._closing = True
            return
        self.finish(status)

    def finish(self, status: int) -> None:
        """Send the exit status and close the channel (after buffered output)."""
        if self._closed or self.proto is None:
            return
        self._closed = True
        channel = self.proto.session
        channel.conn.sendRequest(channel, b"exit-status", struct.pack(">L", status))
        channel.loseConnection()

    # -- exec ----------------------------------------------------------------

    def _run_exec(self, cmd: bytes) -> None:
        self._start = None
        limit = self.avatar.settings.max_line
        if len(cmd) > limit:
            self._exec_done(TextReply([f"Error: line too long (the limit is {limit} bytes)"],
                                      False))
            return
        text, error = command_text(cmd)
        if error is not None:
            self._exec_done(TextReply([error], False))
            return
        self.run(text, _LineSink(self.write_out, b"\n"), self._exec_done)
        if self._input is None:  # the command does not read stdin
            self._input_buffer = None

    def _exec_done(self, reply: TextReply) -> None:
        self.write_reply(reply)
        self.finish(0 if reply.ok else 1)

    def write_reply(self, reply: TextReply) -> None:
        """A reply without a terminal: stdout if it succeeded, else stderr."""
        write = self.write_out if reply.ok else self.write_err
        for text in reply.lines:
            write(render(text, b"\n"))

    def write_out(self, data: bytes) -> None:
        if not self._closed:
            self.proto.write(data)

    def write_err(self, data: bytes) -> None:
        if not self._closed:
            self.proto.session.writeExtended(connection.EXTENDED_DATA_STDERR, data)

    # -- stdin: the seam for commands that read the exec channel's input ----

    def read_input(self, consumer: InputConsumer) -> bool:
        """Hand the exec channel's stdin to ``consumer`` (bytes, then EOF).

        Only a command started by exec may read input, and only from the
        call that starts it; bytes that came before are replayed at once.
        A consumer that cannot keep up calls :meth:`pause_input` and later
        :meth:`resume_input`.  Returns False when input cannot be read here.
        """
        if (self.shell is not None or self.pipe is not None or self._input_buffer is None
                or self._input is not None):
            return False
        self._input = consumer
        buffered, self._input_buffer = self._input_buffer, []
        for chunk in buffered:
            consumer.data_received(chunk)
        if self._input_eof:
            consumer.eof_received()
        return True

    def pause_input(self) -> None:
        """Back-pressure for an input consumer: the client stops at the SSH window."""
        if self.proto is not None:
            self.proto.session.pause_input()

    def resume_input(self) -> None:
        if self.proto is not None:
            self.proto.session.resume_input()

    def input_received(self, data: bytes) -> None:
        if self._input is not None:
            self._input.data_received(data)
        elif self._input_buffer is not None:
            self._input_size += len(data)
            if self._input_size > INPUT_BUFFER_LIMIT:
                self._input_buffer = None  # nobody asked for that much
            else:
                self._input_buffer.append(data)

    def input_eof(self) -> None:
        self._input_eof = True
        if self._input is not None:
            self._input.eof_received()


class _ChannelInput:
    """The exec channel's stdin as the process protocol's transport."""

    def __init__(self, data: Callable[[bytes], None]) -> None:
        self.write = data

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        pass  # the channel closes; CommandSession.closed does the work


class _LineSink:
    """A command's output sink writing lines to the channel."""

    def __init__(self, write: Callable[[bytes], None], end: bytes) -> None:
        self.write = write
        self.end = end

    def line(self, text: str) -> None:
        self.write(render(text, self.end))


class PipedCommands(LineReceiver):
    """A shell without a terminal (``ssh host < commands``): one command a line.

    Like exec, but for many lines: output on stdout, failures on stderr, no
    prompt and no echo.  Lines are queued and run one after another; at the end
    of input the channel closes with the exit status of the last command.
    """

    delimiter = b"\n"

    def __init__(self, session: CommandSession) -> None:
        self.session = session
        self.MAX_LENGTH = session.avatar.settings.max_line
        self.queue: deque[bytes] = deque()
        self.status = 0
        self.ended = False
        self._draining = False

    def lineReceived(self, line: bytes) -> None:
        self.queue.append(line)
        self._next()

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
            while self.session.running is None and not self.session.is_closed:
                if self.session.closing or (self.ended and not self.queue):
                    self.session.finish(0 if self.session.closing else self.status)
                    return
                if not self.queue:
                    return
                text, error = command_text(self.queue.popleft().removesuffix(b"\r"))
                if error is not None:
                    self._done(TextReply([error], False))
                elif text.strip():
                    out = _LineSink(self.session.write_out, b"\n")
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
    """The interactive shell: prompt, line editing, history, Ctrl-C and Ctrl-D."""

    ps = (PROMPT, PROMPT)

    def __init__(self, session: CommandSession) -> None:
        self.session = session

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

    def keystrokeReceived(self, keyID: Any, modifier: Any) -> None:
        if self.session.running is not None and keyID not in (CTRL_C, CTRL_D):
            return  # one command at a time: typing waits for the prompt
        if keyID in self._printableChars or keyID in self.keyHandlers:
            super().keystrokeReceived(keyID, modifier)

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("ascii", "replace").strip()
        if not text:
            self.drawInputLine()
            return
        self.session.run(text, _LineSink(self.terminal.write, b"\n"), self._reply)

    def _reply(self, reply: TextReply) -> None:
        for text in reply.lines:
            self.terminal.write(render(text, b"\n"))
        if self.session.closing:
            self.session.finish(0)
            return
        self.drawInputLine()

    def handle_INT(self) -> None:
        self.terminal.write(b"^C\n")
        if self.session.running is not None:
            self.session.cancel()  # the reply (Error: cancelled) redraws the prompt
            return
        self.lineBuffer = []
        self.lineBufferIndex = 0
        self.drawInputLine()

    def handle_EOF(self) -> None:
        if self.session.running is not None:
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
