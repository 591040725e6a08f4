"""The line door: a ``LineReceiver`` a person drives with netcat or telnet.

Commands from one connection run one after another and their output never
interleaves; lines that arrive meanwhile wait in a short queue, commands wait
while the client is not reading our output (the protocol is the transport's
push producer), and reading stops while the queue is full.  A running command's
own output source (``lastlog``'s child, registered on its sink) is paused while
the client does not read.  One connection runs
at most ``LINES_PER_TURN`` lines per reactor turn, so a flood of short lines
cannot starve the others.  A client that goes away cancels its running command.
A command may take over the byte stream for a while (``receive_raw``: the bytes
of an upload, and the trailer line after them), then lines resume; a trailer
line that is not one closes the connection instead (the stream is out of step:
what follows may be more of the file, never commands to run).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from cmdserver.auth.tls import handshake_failure
from cmdserver.commands.base import Context
from cmdserver.commands.upload.mac import BadTrailer, parse_trailer
from cmdserver.commands.upload.stream import direct_reads, widen_reads
from cmdserver.core import CommandCore, TextReply
from cmdserver.doors.idle import IdleClock
from cmdserver.doors.limits import TOO_MANY_CONNECTIONS, format_peer
from cmdserver.text import shown

if TYPE_CHECKING:
    from twisted.internet.interfaces import IConsumer, ITCPTransport

    class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
        """What the line door uses of its transport (TCP, TLS, UNIX all provide it)."""

log = Logger()

QUEUE_HIGH = 64  # queued lines at which reading stops
QUEUE_LOW = 16  # queued lines at which it starts again
BATCH_LIMIT = 16384  # output bytes gathered before they are handed to the transport
LINES_PER_TURN = 256  # lines one connection may run before the others get a turn
INCOMPLETE = "upload incomplete: the client closed the stream early"
NO_TRAILER = "upload incomplete: the client closed the stream before the MAC trailer"


def refusal(reason: str) -> bytes:
    """The one line a refused connection reads (the connection limits, a login penalty)."""
    return f"{reason}. bye !\r\n".encode()


TOO_MANY = refusal(TOO_MANY_CONNECTIONS)


@dataclass(frozen=True)
class LineSettings:
    max_line: int = 4096
    idle_timeout: float = 300
    greeting: str = ""  # a line sent on connect, before any reply (--greeting); none if empty
    login: str = "off"  # "required", "optional" or "off" (see docs/security.md)
    # Called once, before the first command, with (ctx, transport): TLS client-cert login.
    peer_login: Callable[[Context, Any], None] | None = None


@implementer(IHalfCloseableProtocol, IPushProducer)
class LineProtocol(LineReceiver):
    delimiter = b"\n"
    door = "line"
    transport: IStreamTransport  # set in makeConnection, before any other callback

    # State a connection rarely changes starts on the class: an instance gets its
    # own value only once it changes, so an idle connection stays small.
    ctx: Context | None = None
    _running: Deferred | None = None  # the command being run
    _draining = False
    _write_paused = False
    _reading = True
    _closing = False
    _connected = False
    _eof = False  # the client closed its sending side (nc -N, shutdown(SHUT_WR))
    _shutting_down = False  # the daemon is stopping: replies are no longer written
    _peer_login: Callable[[Context, Any], None] | None = None
    _raw: Any = None  # the consumer of raw bytes (an upload), if any
    _raw_paused = False
    _trailer: Any = None  # the upload that takes the next line (its MAC), if any
    _yielding = False  # reading stopped until the next turn
    _out_producer: Any = None  # the running command's output source (a child)
    _probe: PeerProbe | None = None  # is a client that sent a FIN still there?
    # Lines waiting for the running command (at most QUEUE_HIGH, so a list); made
    # when the first one waits: most connections never queue a line.
    _queue: list[bytes] | None = None

    def __init__(self, core: CommandCore, settings: LineSettings,
                 idle: IdleClock | None = None) -> None:
        self.core = core
        self.settings = settings
        if idle is None and settings.idle_timeout:  # a connection made outside a factory
            idle = IdleClock(core.reactor, settings.idle_timeout)
        self._idle = idle  # the door's idle timeouts (None: none)
        self.MAX_LENGTH = settings.max_line
        # Set by every read, so set here: CPython shares one key table among a class's
        # instances only for names its first instances set; a name first set after
        # many connections opened gives each instance a dictionary of its own.
        self._batch: list[bytes] | None = None  # output gathered during one dataReceived
        self._batch_size = 0
        self._turn_lines = 0  # lines taken since this reactor turn began
        self._buffer = b""  # LineReceiver's
        self._busyReceiving = False  # LineReceiver's

    # -- connection life --------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True
        peer = format_peer(self.transport.getPeer())
        # The connection's session in the core: audited from here to connectionLost.
        self.audit_session = self.core.open_session(self.door, peer, self.transport)
        self.ctx = Context(self.core, user="anonymous", peer=peer,
                           door=self.door, out=self, session=self,
                           login=self.settings.login, session_id=self.audit_session.id)
        if self.settings.peer_login is not None:
            self._peer_login = self.settings.peer_login
        self.transport.registerProducer(self, True)
        self.resetTimeout()
        if self.settings.login == "required":
            self.core.gate.login_deadline(self.audit_session, self._login_expired)
        if self.settings.greeting:
            self.line(self.settings.greeting)

    def _login_expired(self) -> None:
        """The login deadline passed (the gate's grace time) without a login."""
        if not self._connected or self._closing:
            return
        self._closing = True
        self._queue = None
        grace = self.core.gate.settings.login_grace
        self.line(f"Timeout: not logged in within {grace:g} s, closing the connection.")
        self._close()

    def connectionLost(self, reason: Any = None) -> None:
        if self._peer_login is not None and self.ctx is not None:
            # A TLS client-certificate door whose handshake never let a line through.
            if handshake_failure(reason):
                failed = getattr(self._peer_login, "handshake_failed", None)
                if failed is not None:
                    failed(self.ctx, reason)
        self._connected = False
        if self._idle is not None:
            self._idle.forget(self)
        if self._probe is not None:
            self._probe.stop()
        self._queue = None
        self._raw = None
        if self._trailer is not None:  # (set on the instance only by a trailer upload)
            self._trailer = None
        if self._running is not None:
            running, self._running = self._running, None
            running.cancel()
        if self.ctx is not None:
            self.core.close_session(self.audit_session)

    def readConnectionLost(self) -> None:
        """The client sent all it will send (a FIN): answer it all, then close.

        A FIN alone does not say whether the client still reads (``nc -N``,
        ``shutdown(SHUT_WR)``) or is gone (Ctrl-C in ``nc``: it closed its
        socket).  If there is still work to answer, the door asks the client's
        TCP once (:class:`PeerProbe`): a closed socket answers with a reset,
        which ends the connection and cancels the running command.
        """
        self._eof = True
        if self._trailer is not None and self._raw is None:
            self._trailer_at_end()
        if self._raw is not None:  # the raw bytes can never be complete now
            self._closing = True
            self.line(f"Error: {INCOMPLETE}")
            self._close()  # connectionLost cancels the upload
            return
        if self._running is None:
            self._last_line()
        # Else the bytes after the running command's line may be raw content it will
        # ask for (`upload NAME SIZE HMAC`, the bytes, EOF): they wait for it (_reply).
        self._close_if_done()
        if not self._closing:
            self._probe = PeerProbe.of(self.transport, self.core.reactor, self._peer_gone)
            if self._probe is not None:
                self._probe.start()

    def _peer_gone(self) -> None:
        """The client closed its socket after its FIN: nobody will read the answers."""
        if self._connected:
            log.info("line: {peer} closed its connection; cancelling what it still runs",
                     peer=self.audit_session.peer)
            self.transport.abortConnection()  # connectionLost cancels the running command

    def _trailer_at_end(self) -> None:
        """The client sent all it will send while an upload waits for its trailer:
        a trailer line without its newline still counts; no line fails the upload."""
        self._last_line()
        if self._trailer is not None:
            consumer, self._trailer = self._trailer, None
            consumer.fail(NO_TRAILER)

    def _last_line(self) -> None:
        """What the client sent is complete: a last line counts without its newline."""
        rest = self.clearLineBuffer()  # lines not delivered yet, while reading was stopped
        if rest and not rest.endswith(self.delimiter):
            rest += self.delimiter
        self._receive(rest)  # delivered now, or when reading starts again

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    def _close_if_done(self) -> None:
        if (self._eof and self._running is None and not self._queue and not self._closing
                and not self._buffer):  # LineReceiver's: lines not delivered yet
            self._closing = True
            self._close()

    def timeoutConnection(self) -> None:
        # A long command is not idleness, unless it waits for the client's bytes: the
        # content while it reads them (not while the upload paused reading, its disk
        # behind), or the trailer line once the content is in.
        if self._raw is not None:
            waiting = not self._raw_paused
        else:
            waiting = self._trailer is not None
        if self._running is not None and not waiting:
            self.resetTimeout()
            return
        self.line(f"Timeout: idle for {self.settings.idle_timeout:g} s, closing the connection.")
        self._close()

    def resetTimeout(self) -> None:
        """The client did something: idleness counts from now."""
        if self._idle is not None:
            self._idle.touch(self)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._queue = None
        self._closing = True
        self.line(f"Error: line too long (the limit is {self.MAX_LENGTH} bytes)")
        self._close()

    # -- input --------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self._turn_lines = 0
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        """Run the lines in ``data``; their replies leave in one write.

        While reading is stopped (``self.paused``), ``LineReceiver`` keeps the
        lines not yet delivered in its buffer, as bytes: at most one read.
        """
        if self._batch is not None:  # already receiving: LineReceiver buffers it
            super().dataReceived(data)
            return
        self._batch = []
        try:
            super().dataReceived(data)
        finally:
            self._flush()
            self._batch = None

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        if self._trailer is not None:  # the line after an upload's content: its MAC
            self._take_trailer(line)
            return
        self._turn_lines += 1
        if self._turn_lines >= LINES_PER_TURN and not self._yielding:
            # A flood of lines in one read: let the other connections have a turn.
            self._yielding = True
            self.core.reactor.callLater(0, self._next_turn)
            self._update_reading()
        if self._running is not None or self._queue or self._write_paused:
            if self._queue is None:
                self._queue = []
            self._queue.append(line)
            self._update_reading()
            return
        self._handle(line)

    def _take_trailer(self, line: bytes) -> None:
        """The line after an upload's content goes to the upload, never to the commands.

        A line that is not ``MAC <64 hex digits>`` says the stream is out of step
        with the upload: more than SIZE bytes came (a file that grew while it was
        sent), and what follows may be more of the file.  Nothing after it runs:
        the upload's one ``Error: …`` line, then the connection closes, as after a
        line too long.  A well-formed trailer (the right MAC or not) keeps the
        connection reading commands.
        """
        consumer, self._trailer = self._trailer, None
        try:
            parse_trailer(line)
        except BadTrailer:
            # Before the upload hears of it: its error may be answered at once (_reply).
            self._closing = True
            self._queue = None
        consumer.trailer(line)
        if not self._closing:
            self._drain()  # lines that came meanwhile, if the upload is already over
        elif self._running is None:  # answered, or over before (a disk error): close now
            self._close()

    def rawDataReceived(self, data: bytes) -> None:
        consumer = self._raw
        if consumer is None:
            return
        n = consumer.remaining
        if len(data) < n:
            consumer.write(data)
            return
        consumer.write(data if len(data) == n else data[:n])
        self._end_raw(data[n:])

    def _raw_read(self) -> None:
        """Bytes went from the socket straight into the raw consumer (``direct_reads``)."""
        self.resetTimeout()
        if self._raw is not None and not self._raw.remaining:
            self._end_raw(b"")

    def _end_raw(self, rest: bytes) -> None:
        consumer, self._raw, self._raw_paused = self._raw, None, False
        self._narrow_reads()
        consumer.unregisterProducer()
        self.setLineMode(rest)  # bytes after the content are command lines again
        self._drain()

    def receive_raw(self, size: int, consumer: Any, trailer: bool = False) -> None:
        """Hand the next ``size`` bytes to ``consumer.write``, then read lines again.

        The consumer gets a producer through ``registerProducer`` and may pause
        reading with it while it is behind.  With ``trailer`` the line after the
        bytes goes to ``consumer.trailer`` (without its newline), not to the
        command queue.
        """
        if not self._connected:
            return
        if trailer:
            self._trailer = consumer
        if size == 0:
            if self._eof and self._trailer is consumer:
                self._trailer_at_end()
            return
        self._raw = consumer
        self._narrow_reads: Callable[[], None] = lambda: None
        consumer.registerProducer(_RawReading(self), True)
        self.setRawMode()
        self.dataReceived(b"")  # bytes that arrived with the command line
        if self._raw is consumer and self._eof:
            # The client closed its sending side (before `Ready`): no more can come.
            self._raw = self._trailer = None
            consumer.unregisterProducer()
            self.setLineMode()
            consumer.fail(INCOMPLETE)
            return
        if self._raw is consumer:  # the socket's bytes go to the consumer from now on
            direct = None
            if hasattr(consumer, "read_into") and not self._buffer:
                direct = direct_reads(self.transport, self, consumer, self._raw_read)
            self._narrow_reads = direct or widen_reads(self.transport)
        elif self._eof and self._trailer is consumer:  # all came before `Ready`
            self._trailer_at_end()

    def _pause_raw(self, paused: bool) -> None:
        self._raw_paused = paused
        self._update_reading()

    def _handle(self, raw: bytes) -> None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.line("Error: the command is not valid UTF-8")
            return
        if not text.isprintable():
            text = text.replace("\t", " ")
            if not text.isprintable():
                self.line("Error: control characters are not allowed in a command")
                return
        assert self.ctx is not None  # set in connectionMade
        if self._peer_login is not None:  # the TLS handshake is done once a line arrives
            peer_login, self._peer_login = self._peer_login, None
            peer_login(self.ctx, self.transport)
        reply = self.core.run_text(self.ctx, text)
        if type(reply) is TextReply:
            # Answered at once (ping, help, refusals): no time has passed since the
            # read reset the idle timer, and the caller goes on with the next line.
            for reply_line in reply.lines:
                self.line(reply_line)
            if self._closing:
                self._close()
            elif self._eof:
                self._close_if_done()
        else:
            self._running = reply
            reply.addCallback(self._reply)

    def _reply(self, reply: TextReply) -> None:
        self._running = None
        if not self._connected or self._shutting_down:
            return
        self.resetTimeout()  # idleness counts from the end of the last command
        self.lines(reply.lines)
        if self._closing:
            self._close()
            return
        if self._eof and self._raw is None:
            self._last_line()  # what came after this command's line, if anything
        self._drain()

    def _close(self) -> None:
        self._flush()
        self.transport.loseConnection()

    def _drain(self) -> None:
        """Run queued lines one by one (a loop, not recursion: replies may be synchronous)."""
        if self._draining:
            return
        self._draining = True
        try:
            while (self._queue and self._running is None and not self._write_paused
                   and not self._closing and self._raw is None and self._trailer is None):
                self._handle(self._queue.pop(0))
        finally:
            self._draining = False
        self._update_reading()
        self._close_if_done()

    def _next_turn(self) -> None:
        self._yielding = False
        self._turn_lines = 0
        self._update_reading()

    def _update_reading(self) -> None:
        """Stop or restart reading: lines are taken only while they can be run soon.

        A paused writer stops commands, not reading: lines queue, and reading stops
        when the queue is full (a TLS transport pauses its producer until its
        handshake is done, which needs reading).  An upload that is behind stops it too.
        """
        if self._closing or not self._connected:
            return  # the transport is going away; leave it be
        want = (not self._yielding and not self._raw_paused
                and len(self._queue or ()) < (QUEUE_LOW if not self._reading else QUEUE_HIGH))
        if want != self._reading:
            self._reading = want
            self.paused = not want  # LineReceiver stops delivering lines too
            if want:
                self.transport.resumeProducing()
                self._receive(b"")  # the lines that arrived before reading stopped
            else:
                self.transport.pauseProducing()

    # -- output (the command core's sink) ----------------------------------

    def line(self, text: str) -> None:
        if not text.isprintable():
            text = shown(text)
        data = text.encode("utf-8", "backslashreplace") + b"\r\n"
        if self._batch is None:
            self.transport.write(data)
            return
        self._batch.append(data)
        self._batch_size += len(data)
        if self._batch_size >= BATCH_LIMIT:  # let the transport's back-pressure see it
            self._flush()

    def _flush(self) -> None:
        if self._batch:
            self.transport.writeSequence(self._batch)
            self._batch.clear()
            self._batch_size = 0

    def lines(self, texts: list[str]) -> None:
        for text in texts:
            self.line(text)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """The running command's output source: paused while the client does not
        read (``lastlog``'s child waits at its pipe), resumed when it does."""
        self._out_producer = producer
        if self._write_paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._out_producer = None

    def server_shutdown(self) -> None:
        """The daemon is stopping: cancel the running command, say why, close."""
        if not self._connected or self._shutting_down:
            return
        self._closing = self._shutting_down = True  # the cancelled command stays silent
        self._queue = None
        if self._running is not None:
            self._running.cancel()
        self.line("Error: the server is shutting down")
        self._close()

    def end_session(self) -> None:
        """``exit``: close once the reply is written; later input is ignored."""
        self._closing = True
        self._queue = None

    # -- IPushProducer: the transport tells us when the client stops reading --

    def pauseProducing(self) -> None:
        self._write_paused = True
        if self._out_producer is not None:
            self._out_producer.pauseProducing()
        self._update_reading()

    def resumeProducing(self) -> None:
        self._write_paused = False
        if self._out_producer is not None:
            self._out_producer.resumeProducing()
        if self._connected:
            self._drain()

    def stopProducing(self) -> None:
        self._write_paused = True


class PeerProbe:
    """Asks a TCP client that sent a FIN whether its socket is still open.

    One byte of urgent data (``MSG_OOB``) goes out.  A client that still reads
    never sees it (urgent data is kept out of the byte stream unless the client
    asks for it with ``SO_OOBINLINE``; only one is ever sent, as a second could
    push the first into the stream on Linux), and its TCP acknowledges it.  A
    client that closed its socket (Ctrl-C in ``nc``) answers with a reset; the
    reactor no longer reads the socket after the FIN, so the socket's error is
    looked at a few times over ``CHECKS`` seconds, and ``gone()`` is called
    when it has one.  Only on plain TCP: not through TLS, not on a UNIX socket.
    """

    CHECKS = (0.05, 0.2, 1.0, 4.0)  # seconds after the probe; a reset takes one round trip

    def __init__(self, sock: socket.socket, reactor: Any, gone: Callable[[], None]) -> None:
        self.sock = sock
        self.reactor = reactor
        self.gone = gone
        self.call: Any = None

    @classmethod
    def of(cls, transport: Any, reactor: Any, gone: Callable[[], None]) -> PeerProbe | None:
        """A probe for the TCP socket under ``transport`` (through the limits'
        wrapper), or None where there is none to ask."""
        hop = transport
        while hop is not None:
            if isinstance(hop, TLSMemoryBIOProtocol) or ISSLTransport.providedBy(hop):
                return None
            if isinstance(hop, tcp.Connection):
                sock = hop.socket
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    return None
                return cls(sock, reactor, gone)
            hop = getattr(hop, "transport", None)
        return None

    def start(self) -> None:
        try:
            self.sock.send(b"\0", socket.MSG_OOB)
        except OSError:  # reset already
            self.gone()
            return
        self._wait(0)

    def stop(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None

    def _wait(self, i: int) -> None:
        before = self.CHECKS[i - 1] if i else 0.0
        self.call = self.reactor.callLater(self.CHECKS[i] - before, self._check, i)

    def _check(self, i: int) -> None:
        self.call = None
        try:
            error = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError:
            error = 1  # closed under us
        if error:
            self.gone()
        elif i + 1 < len(self.CHECKS):
            self._wait(i + 1)


class _RawReading:
    """The producer a raw-byte consumer uses to pause and resume reading."""

    def __init__(self, protocol: LineProtocol) -> None:
        self.protocol = protocol

    def pauseProducing(self) -> None:
        self.protocol._pause_raw(True)

    def resumeProducing(self) -> None:
        self.protocol._pause_raw(False)

    def stopProducing(self) -> None:
        self.protocol.transport.loseConnection()


def build(env: Any, endpoint: str) -> Any:
    """The line door on ``endpoint``: its login mode and TLS client certificates."""
    from cmdserver.doors import Door
    from cmdserver.doors.line.login import line_door_login

    options = env.options
    settings = LineSettings(max_line=options["max-line"], idle_timeout=options["idle-timeout"],
                            greeting=options["greeting"] or "")
    settings, made = line_door_login(settings, endpoint, options["line-auth"],
                                     options["tls-client-ca"], env.credentials, env.reactor)
    return Door(LineFactory(env.core, settings), refusal, made)


class LineFactory(Factory):
    """Builds a :class:`LineProtocol` per connection, all sharing one core."""

    noisy = False

    def __init__(self, core: CommandCore, settings: LineSettings) -> None:
        self.core = core
        self.settings = settings
        # One timer for the idle timeouts of all its connections.
        self.idle = IdleClock(core.reactor, settings.idle_timeout) \
            if settings.idle_timeout else None

    def buildProtocol(self, addr: Any) -> LineProtocol:
        p = LineProtocol(self.core, self.settings, self.idle)
        p.factory = self
        return p
