"""SSH session channels: ``ssh host COMMAND`` (exec), the shell and their requests.

A :class:`CommandSession` runs text commands through
:meth:`CommandCore.run_line`, one at a time per channel, and prints the same
text as the line door.  Exec ends with the exit status 0 when the command
succeeded and 1 when it failed, error lines on stderr; the shell itself lives in
:mod:`cmdserver.doors.ssh.shell`.  The exec channel's stdin can be handed to a
command (:meth:`CommandSession.read_input`), with back-pressure.  With a pty
(``ssh -t HOST COMMAND``) lines end with CR LF, as a terminal's line discipline
would make them, error lines go to the terminal's one stream as sshd sends
them, and Ctrl-C typed on that terminal cancels the command.  Exec takes one
command: a line with a shell separator outside quotes is refused in one line.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.conch.insults import insults
from twisted.conch.interfaces import EnvironmentVariableNotPermitted, ISession, ISessionSetEnv
from twisted.conch.ssh import connection, session
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from cmdserver.commands.upload.command import UploadCommand
from cmdserver.commands.upload.mac import TRAILER_MAX
from cmdserver.core import TextReply, split_line
from cmdserver.doors.ssh.shell import LineSink, PipedCommands, ShellProtocol, command_text, render
from cmdserver.errors import CommandError

if TYPE_CHECKING:
    from cmdserver.doors.ssh.avatar import SSHAvatar

log = Logger()

# Answered "no" without a log line: a liveness probe, not a feature we refuse.
QUIET_REQUESTS = frozenset({b"keepalive@openssh.com"})
ALLOWED_ENV = ("LANG", "TERM")  # and LC_*
INPUT_BUFFER_LIMIT = 1 << 20  # stdin bytes kept until the command says whether it reads them
CTRL_C = b"\x03"
ONE_COMMAND = "Error: one command per exec: ';', '&&', '||', '|' and newlines are not supported"


def shell_separator(line: str) -> str | None:
    """The first shell separator (``;``, ``&&``, ``||``, ``|``, newline) outside quotes.

    Quotes and backslashes are read as :func:`cmdserver.core.split_line` reads
    them, so ``comphash "a;b"`` and ``comphash a\\;b`` name a file and have none.
    """
    quote = ""
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if quote == "'":
            if c == "'":
                quote = ""
        elif c == "\\":
            i += 1  # the next character is quoted (inside "…" too)
        elif quote == '"':
            if c == '"':
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in ";\n|" or line.startswith("&&", i):
            return line[i:i + 2] if line.startswith(("||", "&&"), i) else c
        i += 1
    return None


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

    avatar: SSHAvatar  # conch passes the channel's avatar in before any request

    input_paused = False  # while True the connection does not reopen our window

    def pause_input(self) -> None:
        """Stop the client's data at the SSH window (at most one window more arrives)."""
        self.input_paused = True

    def resume_input(self) -> None:
        self.input_paused = False
        missing = self.localWindowSize - self.localWindowLeft
        if missing > 0 and self.conn is not None:
            self.conn.adjustWindow(self, missing)

    # conch calls these when the client's window for our output closes and reopens
    # (a client that does not read): the session stops its sources meanwhile.
    def stopWriting(self) -> None:
        self._output_blocked(True)

    def startWriting(self) -> None:
        self._output_blocked(False)

    def _output_blocked(self, blocked: bool) -> None:
        hook = getattr(self.session, "output_blocked", None)
        if hook is not None:
            hook(blocked)

    def requestReceived(self, requestType: bytes, data: bytes) -> int:
        name = "request_" + requestType.replace(b"-", b"_").decode("ascii", "replace")
        if getattr(self, name, None) is None:
            if requestType not in QUIET_REQUESTS:
                self.avatar.refused("session request", requestType)
            return 0
        return super().requestReceived(requestType, data)

    def eofReceived(self) -> None:
        # A subsystem (sftp) ends at the client's EOF.  conch only closes it when no
        # session object exists, but an earlier env request (OpenSSH sends LANG)
        # creates one, whose EOF handling is for exec and shells.  Requests sent
        # before the EOF are answered first, then the exit status 0 goes out.
        if self.client is not None and getattr(self.session, "proto", None) is None:
            subsystem = getattr(self.client.transport, "proto", None)  # conch's wrapper
            answered = getattr(subsystem, "requests_answered", None)
            d = answered() if answered is not None else defer.succeed(None)
            d.addCallback(lambda _: self.end_subsystem(0))
            return
        super().eofReceived()

    def end_subsystem(self, status: int) -> None:
        """Send the exit status and close the channel once its output is sent."""
        if self.closing or self.localClosed:
            return
        assert self.conn is not None  # an open channel is on a connection
        self.conn.sendRequest(self, b"exit-status", struct.pack(">L", status))
        self.loseConnection()


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
        self.output_paused = False  # the client's window for our output is closed
        self._output_producer: Any = None  # the running command's output source

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
        self.shell = cast(ShellProtocol, terminal.terminalProtocol)  # built just above
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

    # -- output back-pressure: the channel's window -------------------------

    def output_blocked(self, blocked: bool) -> None:
        """The client stopped reading our output (its window closed), or reads again."""
        self.output_paused = blocked
        producer = self._output_producer
        if producer is not None:
            if blocked:
                producer.pauseProducing()
            else:
                producer.resumeProducing()
        if not blocked and self.pipe is not None:
            self.pipe.output_resumed()

    def register_output(self, producer: Any) -> None:
        """A running command's output source, paused while the window is closed."""
        self._output_producer = producer
        if self.output_paused:
            producer.pauseProducing()

    def unregister_output(self) -> None:
        self._output_producer = None

    def cancel(self) -> None:
        """Cancel the running command (Ctrl-C, channel closed)."""
        if self.running is not None:
            running, self.running = self.running, None
            running.cancel()

    def end_session(self) -> None:
        """``exit``: leave once the reply is written."""
        self._closing = True

    @property
    def eol(self) -> bytes:
        """Line end of exec output: CR LF on a pty (no line discipline adds the CR)."""
        return b"\r\n" if self.pty else b"\n"

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
        if shell_separator(cmd.decode("utf-8", "replace")) is not None:
            # `ssh host 'stats; ping'` is two commands for a shell; there is none here.
            self._exec_done(TextReply([ONE_COMMAND], False))
            return
        text, error = command_text(cmd)
        if error is not None:
            self._exec_done(TextReply([error], False))
            return
        self.run(text, LineSink(self.write_out, self.eol, self), self._exec_done)
        if self._input is None:
            if self._reads_input(text):  # it will, once it is ready: hold the client
                self.pause_input()
            else:
                self._input_buffer = None

    def _reads_input(self, text: str) -> bool:
        try:
            words = split_line(text)
        except CommandError:
            return False
        command = self.core.registry.get(words[0]) if words else None
        return bool(command is not None and command.reads_input and self.running is not None)

    def _exec_done(self, reply: TextReply) -> None:
        self.write_reply(reply)
        # 124 for a command stopped at its deadline, as timeout(1) exits.
        self.finish(reply.status if reply.status is not None else 0 if reply.ok else 1)

    def write_reply(self, reply: TextReply) -> None:
        """A reply without a terminal: stdout if it succeeded, else stderr."""
        write = self.write_out if reply.ok else self.write_err
        for text in reply.lines:
            write(render(text, self.eol))

    def write_out(self, data: bytes) -> None:
        if not self._closed:
            self.proto.write(data)

    def write_err(self, data: bytes) -> None:
        if self._closed:
            return
        if self.pty:  # a terminal has one output stream: sshd sends stderr there too
            self.proto.write(data)
        else:
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
        self.resume_input()  # held since exec if the command declared it reads input
        return True

    def raw_input_unavailable(self, usage: str) -> str | None:
        """Why a command that reads raw bytes cannot run here, or None if it can.

        Only exec has a stdin for a command: the shell's input is the user's
        typing (or, without a pty, the next command lines).  Asked before the
        command creates anything.
        """
        if self.shell is None and self.pipe is None:
            return None
        return f"{usage.split()[0]} reads its bytes from stdin: use 'ssh HOST {usage} < FILE'"

    def receive_raw(self, size: int, consumer: Any, trailer: bool = False) -> None:
        """``ssh HOST upload NAME SIZE HMAC < FILE``: the next ``size`` bytes of stdin.

        With ``trailer`` (``upload NAME SIZE -``), stdin then has one more line, the
        MAC, and ends: the line goes to ``consumer.trailer`` at the end of input.
        """
        if size == 0 and not trailer:
            return
        if not self.read_input(_RawInput(self, consumer, size, trailer)):
            consumer.fail(self.raw_input_unavailable(UploadCommand.synopsis)
                          or "upload cannot read its bytes: the input was already taken")

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
        elif self.pty and CTRL_C in data:
            self.cancel()  # `ssh -t HOST COMMAND`: the terminal's interrupt key

    def input_eof(self) -> None:
        self._input_eof = True
        if self._input is not None:
            self._input.eof_received()


class _RawInput:
    """Feeds exactly ``size`` bytes of stdin to an upload, with back-pressure.

    With ``trailer`` the rest of stdin must be one line, the MAC: it is handed
    over at the end of input, so that bytes after it (a file that grew while
    it was sent) discard the upload before its file can appear.
    """

    def __init__(self, session: CommandSession, consumer: Any, size: int,
                 trailer: bool = False) -> None:
        self.session = session
        self.consumer = consumer
        self.size = size
        self.trailer = trailer
        self.line = bytearray()  # the trailer line so far
        self.line_ended = False  # its newline came
        self.over = False  # the trailer is handed over or refused
        consumer.registerProducer(self, True)

    def data_received(self, data: bytes) -> None:
        wanted = self.consumer.remaining
        if wanted:
            self.consumer.write(data[:wanted])
            if self.consumer.remaining:
                return
            self.consumer.unregisterProducer()
            if self.trailer:
                self.session.resume_input()  # the trailer is small: let it in
            data = data[wanted:]
        if not self.trailer or self.over or not data:
            return  # the form with the MAC in the command: bytes past SIZE are ignored
        if self.line_ended:
            self._refuse("extra bytes after the MAC trailer, upload discarded")
            return
        line, newline, rest = data.partition(b"\n")
        self.line += line
        if len(self.line) > TRAILER_MAX:  # no trailer is that long: let it say why
            self.over = True
            self.consumer.trailer(bytes(self.line[:TRAILER_MAX]))
        elif newline:
            self.line_ended = True
            if rest:
                self._refuse("extra bytes after the MAC trailer, upload discarded")

    def eof_received(self) -> None:
        if self.consumer.remaining:
            got = self.size - self.consumer.remaining
            self.consumer.fail(f"upload incomplete: the input ended after {got} of "
                               f"{self.size} bytes, upload discarded")
        elif self.trailer and not self.over:
            self.over = True
            if self.line_ended or self.line:  # a last line counts without its newline
                self.consumer.trailer(bytes(self.line))
            else:
                self.consumer.fail("upload incomplete: the input ended before the MAC "
                                   "trailer, upload discarded")

    def _refuse(self, reason: str) -> None:
        self.over = True
        self.consumer.fail(reason)

    # IPushProducer, for the upload's back-pressure
    def pauseProducing(self) -> None:
        self.session.pause_input()

    def resumeProducing(self) -> None:
        self.session.resume_input()

    def stopProducing(self) -> None:
        self.session.pause_input()


class _ChannelInput:
    """The exec channel's stdin as the process protocol's transport."""

    def __init__(self, data: Callable[[bytes], None]) -> None:
        self.write = data

    def writeSequence(self, seq: list[bytes]) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        pass  # the channel closes; CommandSession.closed does the work
