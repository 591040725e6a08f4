"""PB uploads: a remote writer object in front of an upload engine.

``upload(name, size, hmac, mac=ALG, sha256=False)`` on the PB avatar starts an
upload through an *engine starter* and hands the client an
:class:`UploadWriter` (a ``pb.Referenceable``): the client calls
``write(chunk)`` until SIZE bytes are sent, then ``close()``, which answers
with the engine's result.  With ``hmac`` ``"-"`` the MAC follows the content:
``close(MAC)`` carries it (the client hashes the file while it sends it).  The
engine owns the file: it streams bytes into a temporary file, checks the MAC
and renames the file into place only when it matches; the writer only bounds
what the client may send and turns every ending (close, abort, disconnect,
cancel) into exactly one engine call.

The seam is small on purpose::

    starter(ctx, name, size, hmac, mac, sha256) -> Deferred[UploadEngine]  # refusals: CommandError
    engine.feed(chunk) -> Deferred | None    # fires once the chunk is taken
    engine.finish([mac]) -> Deferred[result] # MAC checked, file in place, or CommandError
    engine.abort() -> None                   # discard everything, temp file removed

The whole upload runs as one command (``upload``) through the core, so it is
audited and counted like every other command, and cancelled when the caller
goes away.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb

from cmdserver.commands.base import Command, Context
from cmdserver.commands.upload.command import UploadCommand
from cmdserver.commands.upload.command import audit_args as upload_audit_args
from cmdserver.commands.upload.engine import TRAILER
from cmdserver.commands.upload.mac import HMAC_SHA256, BadTrailer, parse_hex
from cmdserver.doors.pb.errors import BadArguments, CommandFailed, UnknownMethod, to_remote
from cmdserver.errors import CommandError

log = Logger()

MAX_CHUNK = 64 * 1024  # bytes per write() call
MAX_PENDING_WRITES = 16  # writes the engine has not taken yet, per upload


class UploadEngine(Protocol):
    """One upload in progress, as the PB writer drives it."""

    def feed(self, chunk: bytes) -> Deferred | None: ...

    def finish(self, mac: bytes | None = None) -> Deferred: ...

    def abort(self) -> None: ...


class UploadStarter(Protocol):
    """Starts an upload: fires with an :class:`UploadEngine`, or fails (a refusal)."""

    def __call__(self, ctx: Context, name: str, size: int, mac_hex: str,
                 mac: str = HMAC_SHA256, sha256: bool = False, /) -> Deferred: ...


class ConsumerEngine:
    """Adapts a consumer-style upload to :class:`UploadEngine`.

    The upload takes bytes with ``write(data)``, reports through its ``done``
    Deferred (fires with the result once the last byte is checked and in place,
    fails on an HMAC mismatch; cancelled by ``abort()``), and pauses its
    producer while its disk writer is behind.  This adapter is that producer:
    while paused, ``feed`` answers only on resume, so the client's ``write``
    calls wait and nothing piles up in memory.
    """

    def __init__(self, upload: Any) -> None:
        self.upload = upload
        self.paused = False
        self._fed: list[Deferred] = []  # write() answers held back while paused
        self._finishing: list[Deferred] = []
        self._outcome: Any = None
        self._over = False
        upload.registerProducer(self, True)
        upload.done.addBoth(self._ended)

    def feed(self, chunk: bytes) -> Deferred | None:
        self.upload.write(chunk)
        if self.paused and not self._over:
            d: Deferred = Deferred()
            self._fed.append(d)
            return d
        return None

    def finish(self, mac: bytes | None = None) -> Deferred:
        if mac is not None and not self._over:
            self.upload.finish(mac)
        if self._over:
            return _settle(self._outcome)
        d: Deferred = Deferred()
        self._finishing.append(d)
        return d

    def abort(self) -> None:
        self.upload.abort()

    # IPushProducer, as the upload sees it
    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        fed, self._fed = self._fed, []
        for d in fed:
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def _ended(self, outcome: Any) -> None:
        self._over = True
        self._outcome = outcome
        self.upload.unregisterProducer()
        self.resumeProducing()
        finishing, self._finishing = self._finishing, []
        for d in finishing:
            _settle(outcome).chainDeferred(d)


def _settle(outcome: Any) -> Deferred:
    """The engine's outcome as PB can send it: a failure, or plain values."""
    if isinstance(outcome, Failure):
        return defer.fail(outcome)
    if dataclasses.is_dataclass(outcome) and not isinstance(outcome, type):
        outcome = dataclasses.asdict(outcome)
    return defer.succeed(outcome)


def consumer_starter(begin: Callable[..., Deferred]) -> UploadStarter:
    """An :data:`UploadStarter` from a function that starts a consumer-style upload
    (``begin(ctx, name, size, hmac, mac, sha256) -> Deferred[upload]``)."""

    def start(ctx: Context, name: str, size: int, mac_hex: str, mac: str = HMAC_SHA256,
              sha256: bool = False) -> Deferred:
        return begin(ctx, name, size, mac_hex, mac, sha256).addCallback(ConsumerEngine)

    return start


class UploadWriter(pb.Referenceable):
    """The client's handle on one upload: ``write(chunk)``, ``close()`` (``close(MAC)``
    when the MAC follows the content: ``trailer``), ``abort()``."""

    def __init__(self, engine: UploadEngine, size: int, done: Deferred,
                 max_chunk: int = MAX_CHUNK, trailer: bool = False) -> None:
        self.engine = engine
        self.size = size
        self.trailer = trailer
        self.received = 0
        self.max_chunk = max_chunk
        self.pending = 0
        self.ended = False
        self._done = done  # the upload command's Deferred: fires with the result

    def remoteMessageReceived(self, broker: pb.Broker, message: str | bytes, args: Any,
                              kw: Any) -> Any:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        method = _WRITER_METHODS.get(message)
        if method is None:
            raise UnknownMethod(f"no such method: {message[:64]}")
        args = broker.unserialize(args)
        kw = broker.unserialize(kw)
        code = method.__code__
        optional = len(method.__defaults__ or ())
        if kw or not code.co_argcount - 1 - optional <= len(args) <= code.co_argcount - 1:
            raise BadArguments(f"{message}: wrong arguments")
        return broker.serialize(method(self, *args))

    def remote_write(self, chunk: bytes) -> Deferred | None:
        if self.ended:
            raise CommandFailed("upload is already closed")
        if not isinstance(chunk, bytes):
            self.fail("write takes bytes")
        if len(chunk) > self.max_chunk:
            self.fail(f"chunk of {len(chunk)} bytes is over the {self.max_chunk}-byte limit")
        if self.received + len(chunk) > self.size:
            self.fail(f"more than the announced {self.size} bytes")
        if self.pending >= MAX_PENDING_WRITES:
            self.fail(f"more than {MAX_PENDING_WRITES} writes in flight")
        self.received += len(chunk)
        d = defer.maybeDeferred(self.engine.feed, chunk)
        if d.called and not isinstance(d.result, Failure):
            return None
        self.pending += 1

        def taken(result: Any) -> Any:
            self.pending -= 1
            if isinstance(result, Failure):
                self._end(result)
                return to_remote(result, "upload write", True)
            return None

        return d.addBoth(taken)

    def remote_close(self, mac: Any = None) -> Deferred:
        if self.ended:
            raise CommandFailed("upload is already closed")
        if self.received != self.size:
            self.fail(f"short upload: {self.received} of {self.size} bytes")
        digest = None
        if self.trailer:
            if mac is None:
                self.fail("the MAC is missing: close(MAC) ends an upload whose MAC "
                          "follows the content")
            try:
                digest = parse_hex(mac)
            except BadTrailer as e:
                self.fail(str(e))
        elif mac is not None:
            self.fail("the MAC came with upload(): close() takes none")
        self.ended = True
        if digest is None:
            d = defer.maybeDeferred(self.engine.finish)
        else:
            d = defer.maybeDeferred(self.engine.finish, digest)
        d.addBoth(self._finished)
        return d.addErrback(to_remote, "upload", True)

    def remote_abort(self) -> None:
        if not self.ended:
            self._end(Failure(CommandError("upload aborted by the client")))

    def fail(self, reason: str) -> None:
        """Refuse the current call and discard the upload."""
        message = f"{reason}, upload discarded"
        self._end(Failure(CommandError(message)))
        raise CommandFailed(message)

    def stop(self) -> None:
        """The command was cancelled (caller gone): discard without a word."""
        if not self.ended:
            self.ended = True
            self.engine.abort()

    def _end(self, failure: Failure) -> None:
        if self.ended:
            return
        self.ended = True
        self.engine.abort()
        if not self._done.called:
            self._done.errback(failure)

    def _finished(self, result: Any) -> Any:
        """The engine's outcome ends the upload command (audit) and goes to the client."""
        if not self._done.called:
            if isinstance(result, Failure):
                self._done.errback(result)
            else:
                self._done.callback(result)
        return result


_WRITER_METHODS: dict[str, Callable[..., Any]] = {
    "write": UploadWriter.remote_write,
    "close": UploadWriter.remote_close,
    "abort": UploadWriter.remote_abort,
}


class PBUpload(Command):
    """The whole PB upload as one command: runs from ``upload()`` until the writer ends.

    Not in the registry (the text doors' ``upload`` reads raw bytes instead); the
    PB door runs it through :meth:`CommandCore.run_command` for audit and stats.
    """

    name = "upload"
    summary = "Upload a file whose HMAC the server checks before it becomes visible."
    params = UploadCommand.params  # the same arguments, checked the same way

    def __init__(self, starter: UploadStarter, ready: Deferred) -> None:
        self.starter = starter
        self.ready = ready  # fires with the writer once the engine accepted the upload

    def run(self, ctx: Context, name: str, size: int, hmac: str, mac: str = HMAC_SHA256,
            sha256: bool = False) -> Deferred:
        writer: list[UploadWriter] = []

        def cancel(_: Deferred) -> None:
            if writer:
                writer[0].stop()
            else:
                starting.cancel()

        done: Deferred = Deferred(cancel)
        starting = self.starter(ctx, name, size, hmac, mac, sha256)

        def started(engine: UploadEngine) -> None:
            if done.called:  # cancelled while the engine was starting
                engine.abort()
                return
            writer.append(UploadWriter(engine, size, done, trailer=hmac == TRAILER))
            self.ready.callback(writer[0])

        def refused(failure: Failure) -> None:
            if not done.called:
                done.errback(failure)

        starting.addCallbacks(started, refused)
        return done

    def audit_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return upload_audit_args(kwargs)
