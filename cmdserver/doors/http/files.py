"""Files in the jail over HTTP: ``GET /v1/files/PATH`` (with ``Range``) and ``PUT``.

A download opens the file through the jail in a worker thread
(:func:`open_for_reading`, the one function that touches the path) and sends
it from the open descriptor with ``pread`` in the thread pool, one chunk at a
time, while the client keeps up (a push producer: the socket's back-pressure
pauses the reads).  It is audited as a ``file`` record (``get``, with the
bytes sent), as SFTP's are.

An upload is the ``upload`` command with the body for its bytes: ``PUT
/v1/files/NAME`` with ``Content-Length`` (the size) and ``X-Cmdserver-HMAC``
(the hex HMAC-SHA256 of the content; ``X-Cmdserver-MAC-Algorithm: blake2b``
for a keyed BLAKE2b MAC instead).  The MAC stays in a header: HTTP has no
trailer line after the body that every client can send.  The body is read straight into the
upload engine (:class:`UploadBody`): first the Host, the login and the
upload's checks (the same as every door's: jail, size, existing target, free
space), then the bytes, with the engine's back-pressure; the file appears only
once its HMAC matched.  A refusal is answered before the body is read, and the
connection is closed (a client that sent ``Expect: 100-continue`` has sent
nothing).  A client that goes away aborts the upload: nothing is left behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from email.utils import formatdate, parsedate_to_datetime
from typing import IO, Any
from urllib.parse import quote, unquote_to_bytes

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from cmdserver.commands.base import Command, Context
from cmdserver.commands.files import os_error
from cmdserver.commands.upload.command import UploadCommand
from cmdserver.commands.upload.command import audit_args as upload_audit_args
from cmdserver.commands.upload.engine import UploadResult
from cmdserver.commands.upload.mac import HMAC_SHA256, BadTrailer, parse_hex
from cmdserver.core import INTERNAL_ERROR
from cmdserver.doors.http.door import HTTPDoor, answer, prepare
from cmdserver.doors.http.errors import (
    BAD_REQUEST,
    INTERNAL,
    LENGTH_REQUIRED,
    NOT_FOUND,
    RANGE_NOT_SATISFIABLE,
    HTTPError,
    message_of,
    status_of,
)
from cmdserver.doors.http.login import Login, authenticate
from cmdserver.errors import CommandError, Refused, UsageError
from cmdserver.policy import Policy

log = Logger()

PREFIX = b"/v1/files/"
CHUNK = 256 << 10  # bytes read (in a thread) and written at a time
HOLD = 256 << 10  # bytes of an upload's body kept while its checks run; then reading stops
HMAC_HEADER = b"x-cmdserver-hmac"
MAC_ALGORITHM_HEADER = b"x-cmdserver-mac-algorithm"
OCTETS = b"application/octet-stream"
_RANGE = re.compile(rb"bytes=(\d*)-(\d*)\Z")


def file_path(request: Any) -> str:
    """The jail path a request names (``/v1/files/a/b%20c`` → ``a/b c``)."""
    raw = unquote_to_bytes(request.target[len(PREFIX):])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(BAD_REQUEST, "the path is not UTF-8") from None


def open_for_reading(policy: Policy, path: str) -> tuple[IO[bytes], os.stat_result]:
    """Open a regular file inside the jail for reading (blocking: call it in a thread).

    Through the jail's descriptor-relative open (:meth:`Jail.open_file`): FIFOs
    and devices are refused without being opened, upload temporary files are
    not served; a missing file is a 404.
    """
    try:
        fd = policy.jail.open_file(path)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise HTTPError(NOT_FOUND, os_error(e, path).message) from None
    except OSError as e:
        raise os_error(e, path) from None
    return os.fdopen(fd, "rb", buffering=0), os.fstat(fd)


def byte_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` of a single ``Range: bytes=…`` within ``size`` bytes; None
    for the whole file (no header, or one this server does not take: several
    ranges, another unit); 416 for a range outside the file."""
    if header is None:
        return None
    match = _RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == b"":
        return None
    first, last = match.groups()
    if first == b"":  # the last N bytes
        n = int(last)
        if n == 0:
            raise _unsatisfiable(size)
        return max(0, size - n), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        raise _unsatisfiable(size)
    return start, end


def _unsatisfiable(size: int) -> HTTPError:
    return HTTPError(RANGE_NOT_SATISFIABLE, f"range outside the file ({size} bytes)",
                     ((b"Content-Range", b"bytes */%d" % size),))


def etag(st: os.stat_result) -> bytes:
    digest = hashlib.blake2b(b"%d-%d-%d" % (st.st_ino, st.st_size, st.st_mtime_ns),
                             digest_size=8).hexdigest()
    return b'"%s"' % digest.encode()


def range_applies(request: Any, st: os.stat_result, tag: bytes) -> bool:
    """``If-Range``: a range only if the file is still the one the client names."""
    condition = request.requestHeaders.getRawHeaders(b"if-range")
    if not condition:
        return True
    value = condition[0].strip()
    if value.startswith(b'"') or value.startswith(b"W/"):
        return value == tag
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp() >= int(st.st_mtime)
    except (TypeError, ValueError):
        return False


@implementer(IPushProducer)
class FileSender:
    """Sends ``length`` bytes of an open file from ``offset``: a read in the thread
    pool, then a write, then the next read, while the client keeps up."""

    def __init__(self, door: HTTPDoor, request: Any, file: IO[bytes], offset: int,
                 length: int) -> None:
        self.core = door.core
        self.request = request
        self.file = file
        self.offset = offset
        self.left = length
        self.sent = 0
        self.paused = False
        self.reading = False
        self.stopped = False
        self.done: Deferred = Deferred()  # fires with the bytes sent, or an error line

    def start(self) -> Deferred:
        self.request.registerProducer(self, True)
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._read()
        return self.done

    def _read(self) -> None:
        if self.paused or self.reading or self.stopped:
            return
        if not self.left:
            self._end(None)
            return
        self.reading = True
        fd = self.file.fileno()
        self.core.in_thread(os.pread, fd, min(CHUNK, self.left), self.offset).addCallbacks(
            self._got, self._failed)

    def _got(self, data: bytes) -> None:
        self.reading = False
        if self.stopped:
            self._close()
            return
        if not data:  # the file shrank after the answer promised its length
            self._end(f"file changed while it was being read: {self.left} bytes short")
            return
        self.offset += len(data)
        self.left -= len(data)
        self.sent += len(data)
        self.request.write(data)
        self._read()

    def _failed(self, failure: Failure) -> None:
        self.reading = False
        log.failure("http: reading a download failed", failure)
        self._end(f"read failed: {failure.getErrorMessage()}")

    def _end(self, error: str | None) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._close()
        self.request.unregisterProducer()
        if error is None:
            self.request.finish()
        else:  # too late for a status: the client sees a short body
            self.request.channel.transport.loseConnection()
        self.done.callback(error)

    def _close(self) -> None:
        if not self.reading:
            self.file.close()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._read()

    def stopProducing(self) -> None:
        if not self.stopped:
            self.stopped = True
            self._close()
            self.done.callback("the client went away")


class HTTPUpload(Command):
    """An upload over HTTP as one command: audited and counted as ``upload`` by the
    core, from its checks until the file is in place."""

    name = "upload"
    summary = UploadCommand.summary
    params = UploadCommand.params  # the same arguments, checked the same way
    timeout = 0  # as the upload command: a stalled sender meets the idle timeout

    def __init__(self, body: UploadBody) -> None:
        self.body = body

    def run(self, ctx: Context, name: str, size: int, hmac: str, mac: str = HMAC_SHA256,
            sha256: bool = False) -> Deferred:
        try:
            parse_hex(hmac)  # no trailer after the body here: no "-"
        except BadTrailer:
            raise UsageError("HMAC must be 64 hex digits (HMAC-SHA256 of the content)") from None
        begun = self.body.uploads.begin(ctx, name, size, hmac, mac)
        upload: list[Any] = []

        def cancel(_: Deferred) -> None:
            if upload:
                upload[0].abort()
            else:
                begun.cancel()

        done: Deferred = Deferred(cancel)

        def started(engine: Any) -> None:
            if done.called:  # cancelled while the upload began
                engine.abort()
                return
            upload.append(engine)
            engine.done.chainDeferred(done)
            self.body.begun(engine)

        def refused(failure: Failure) -> None:
            if not done.called:
                done.errback(failure)

        begun.addCallbacks(started, refused)
        return done

    def audit_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return upload_audit_args(kwargs)


@implementer(IPushProducer)
class UploadBody:
    """``request.content`` of ``PUT /v1/files/NAME``: the body goes to the upload
    engine as it comes in (and is held, at most ``HOLD`` bytes, while the upload's
    checks run).  Also the producer the engine pauses while the disk is behind.

    ``outcome`` fires with the upload's :class:`UploadResult`, or fails with why
    not, for the request's handler (:meth:`Files.put`) once the body is in; a
    refusal before then is answered at once (:meth:`HTTPRequest.answer_early`).
    """

    def __init__(self, request: Any, length: int | None) -> None:
        self.request = request
        self.channel = request.channel
        self.door: HTTPDoor = request.channel.door
        self.uploads = self.door.uploads
        self.length = length
        self.held: list[bytes] = []
        self.held_size = 0
        self.received = 0
        self.upload: Any = None  # the engine's Upload, once begun
        self.reading_paused = False  # held bytes are waiting for the upload to begin
        self.engine_paused = False  # the engine's disk is behind
        self.refused = False
        self.running: Deferred | None = None  # the upload command, once it runs
        self.outcome: Deferred = Deferred()
        # Gone before its handler asked: nobody will read the outcome.
        request.notifyFinish().addErrback(lambda _: self.outcome.addErrback(lambda _: None))
        self._begin()

    # -- the checks, then the upload -------------------------------------------

    def _begin(self) -> None:
        request = self.request
        try:
            self.door.check_host(request)
            if self.length is None:
                raise HTTPError(LENGTH_REQUIRED, "an upload needs a Content-Length (its size)")
            login = authenticate(self.channel, request)
        except HTTPError as e:
            self._refuse(e)
            return
        if isinstance(login, Login):
            self._start(login)
        else:
            login.addCallbacks(self._start, lambda f: self._refuse(f.value))
            login.addErrback(self._broken)

    def _broken(self, failure: Failure) -> None:
        log.failure("http: starting an upload failed", failure)
        self._refuse(HTTPError(INTERNAL, INTERNAL_ERROR))

    def _start(self, login: Login) -> None:
        try:
            self._run(login)
        except Exception:
            self._broken(Failure())

    def _run(self, login: Login) -> None:
        request = self.request
        if request.gone:
            return
        ctx = login.ctx
        mac = request.requestHeaders.getRawHeaders(HMAC_HEADER)
        algorithm = request.requestHeaders.getRawHeaders(MAC_ALGORITHM_HEADER)
        given = {"name": file_path(request), "size": self.length,
                 "hmac": mac[0].decode("ascii", "replace").strip() if mac else None,
                 "mac": algorithm[0].decode("ascii", "replace").strip() if algorithm else None}
        command = HTTPUpload(self)
        try:
            kwargs = self.door.core.bind(ctx, command, {k: v for k, v in given.items()
                                                        if v is not None})
        except CommandError as e:
            message = e.message if mac else ("an upload needs the X-Cmdserver-HMAC header "
                                             "(hex HMAC-SHA256 of the content)")
            self._refuse(HTTPError(BAD_REQUEST, message))
            return
        except HTTPError as e:
            self._refuse(e)
            return
        d = self.running = self.door.core.run_command(ctx, command, **kwargs)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addCallbacks(self.outcome.callback, self._failed)

    def _failed(self, failure: Failure) -> None:
        if failure.check(CancelledError):  # the client went away: nobody to tell
            return
        if self.upload is None:  # refused before it began
            self._refuse(failure.value)
        else:
            self.outcome.errback(failure)

    def _refuse(self, error: BaseException | None) -> None:
        """No upload: say why now if the body is still coming (and close), else
        through ``outcome`` to the request's handler."""
        self.refused = True
        self.held, self.held_size = [], 0
        self._resume_reading()
        if not isinstance(error, HTTPError):
            error = HTTPError(status_of(error), message_of(error))
        if self.request.processing:
            self.outcome.errback(error)
        else:
            self.request.answer_early(error)

    def begun(self, upload: Any) -> None:
        """The upload engine took it: hand over what is held, then the rest as it comes."""
        self.upload = upload
        upload.registerProducer(self, True)
        held, self.held, self.held_size = self.held, [], 0
        for data in held:
            upload.write(data)
        self._resume_reading()
        self.request.send_continue()

    # -- the body, as twisted.web hands it over -----------------------------------

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self.refused:
            return  # drained: the answer is out
        if self.upload is not None:
            self.upload.write(data)
            return
        self.held.append(data)
        self.held_size += len(data)
        if self.held_size >= HOLD and not self.reading_paused:
            self.reading_paused = True
            self.channel.transport.pauseProducing()

    def _resume_reading(self) -> None:
        if self.reading_paused:
            self.reading_paused = False
            if not self.request.gone:
                self.channel.transport.resumeProducing()

    def tell(self) -> int:
        return self.received

    def seek(self, *args: Any) -> None:
        pass

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass

    # -- IPushProducer: the engine pauses us while its disk is behind -------------

    def pauseProducing(self) -> None:
        if not self.request.gone and not self.engine_paused:
            self.engine_paused = True
            self.channel.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.engine_paused:
            self.engine_paused = False
            if not self.request.gone:
                self.channel.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class Files:
    """``/v1/files/PATH``: GET (and HEAD) download, PUT upload."""

    def __init__(self, door: HTTPDoor) -> None:
        self.door = door
        self.core = door.core

    # -- download ----------------------------------------------------------------

    def get(self, request: Any, login: Login) -> int:
        path = file_path(request)
        ctx = login.ctx
        started = time.monotonic()
        shown = ctx.policy.jail_path(path) or path
        d = self.core.in_thread(open_for_reading, ctx.policy, path)

        def opened(result: tuple[IO[bytes], os.stat_result]) -> Any:
            file, st = result
            if request.gone:
                file.close()
                return None
            try:
                return self._send(request, file, st)
            except HTTPError:
                file.close()
                raise

        def sent(error: str | None | int) -> None:
            if isinstance(error, int):  # HEAD, or a range of nothing: done already
                error = None
            outcome = "ok" if error is None else "error"
            self.core.audit_operation(ctx, "get", {"path": shown}, outcome,
                                      time.monotonic() - started, error)

        def refused(failure: Failure) -> None:
            error = failure.value
            outcome = "refused" if isinstance(error, Refused) else "error"
            self.core.audit_operation(ctx, "get", {"path": shown}, outcome,
                                      time.monotonic() - started, message_of(error))
            answer(request, status_of(error), {"error": message_of(error)},
                   error.headers if isinstance(error, HTTPError) else ())

        d.addCallback(opened).addCallbacks(sent, refused)
        d.addErrback(request.processingFailed)
        return NOT_DONE_YET

    def _send(self, request: Any, file: IO[bytes], st: os.stat_result) -> Deferred | int:
        size = st.st_size
        tag = etag(st)
        span = None
        ranges = request.requestHeaders.getRawHeaders(b"range")
        if ranges and range_applies(request, st, tag):
            span = byte_range(ranges[0], size)
        status = 200
        first, length = 0, size
        prepare(request, 200, OCTETS)
        headers = request.responseHeaders
        if span is not None:
            status = 206
            first, last = span
            length = last - first + 1
            headers.setRawHeaders(b"Content-Range", [b"bytes %d-%d/%d" % (first, last, size)])
        request.setResponseCode(status)
        name = os.path.basename(file_path(request)) or "download"
        headers.setRawHeaders(b"Content-Disposition",
                              [b"attachment; filename*=UTF-8''" + quote(name).encode()])
        headers.setRawHeaders(b"Content-Security-Policy", [b"sandbox"])
        headers.setRawHeaders(b"Accept-Ranges", [b"bytes"])
        headers.setRawHeaders(b"ETag", [tag])
        headers.setRawHeaders(b"Last-Modified", [formatdate(st.st_mtime, usegmt=True).encode()])
        request.setHeader(b"Content-Length", b"%d" % length)
        if request.method == b"HEAD" or length == 0:
            file.close()
            request.write(b"")
            request.finish()
            return 0
        return FileSender(self.door, request, file, first, length).start()

    # -- upload --------------------------------------------------------------------

    def put(self, request: Any) -> bytes | int:
        """The body is in: answer once the upload is in place (or why not)."""
        body = request.content
        if not isinstance(body, UploadBody):  # a door without an upload engine
            raise HTTPError(NOT_FOUND, "uploads are not served here")

        def done(value: UploadResult) -> None:
            answer(request, 201, {"result": value})

        def failed(failure: Failure) -> None:
            answer(request, status_of(failure.value), {"error": message_of(failure.value)})

        body.outcome.addCallbacks(done, failed).addErrback(request.processingFailed)
        return NOT_DONE_YET
