"""The upload engine: bytes in from any door, a verified file out, or nothing at all.

A door (line, SSH exec, PB writer) gets an :class:`Upload` from
:meth:`Uploads.begin` and feeds it on the reactor thread: the line door reads
its socket straight into the upload's page-aligned blocks
(:meth:`Upload.read_into`, :meth:`Upload.commit`), other doors copy into them
with :meth:`Upload.write`.  Each full block (2 MiB) goes to the upload's
worker thread, which writes it into a hidden temporary file (``O_DIRECT`` when
large) while another thread computes the MAC, and one more the SHA-256 when
that is wanted (see :mod:`cmdserver.commands.upload.spool`); the block comes
back to be filled again when all of them are done with it.  When more than
``HIGH_WATER`` bytes wait for them the door's producer is paused, and resumed
below ``LOW_WATER``: memory stays flat whatever the size.

The MAC comes with the request (``upload NAME SIZE HMAC``) or after the content
(``upload NAME SIZE -``: the door hands the trailer line to
:meth:`Upload.trailer`, PB the MAC to :meth:`Upload.finish`).  Once the last
byte is hashed and the MAC is known, the worker checks it in constant time,
fsyncs and moves the file into place; on a mismatch, an error or a cancel it
removes the temporary file.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cmdserver.commands.upload.mac import (
    ALGORITHMS,
    HMAC_SHA256,
    BadTrailer,
    mac_error,
    parse_hex,
    parse_trailer,
)
from cmdserver.commands.upload.spool import (
    Spool,
    TrailerUploadResult,
    UploadResult,
    Writer,
    new_run_id,
    open_spool,
    remove_stale,
    write_error,
)
from cmdserver.commands.upload.stream import Block, name_thread
from cmdserver.errors import CommandError, TooLarge, UsageError
from cmdserver.text import escape
from cmdserver.workers import background

if TYPE_CHECKING:
    from cmdserver.commands.base import Context

log = Logger()

BATCH = 2 << 20
HIGH_WATER = 12 << 20
LOW_WATER = 6 << 20
DEFAULT_MAX_UPLOAD = 1 << 30
NO_THREAD = "upload failed: the server cannot start a thread now, upload discarded"
TRAILER = "-"  # the HMAC argument that says: the MAC follows the content
_FINISH = object()

__all__ = ["TRAILER", "TrailerUploadResult", "Upload", "UploadResult", "UploadSettings",
           "Uploads", "check_request"]


@dataclass(frozen=True)
class UploadSettings:
    """Server-wide upload policy: the size limit, whether uploads may replace files,
    and the MAC algorithms a client may ask for."""

    max_upload: int = DEFAULT_MAX_UPLOAD
    overwrite: bool = False
    macs: tuple[str, ...] = ALGORITHMS


_SIZE = re.compile(r"\A\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*\Z", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def byte_size(value: Any) -> int:
    """A size option: a whole number of bytes, or with a binary suffix (``512M``, ``1GiB``)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        number = value
    else:
        m = _SIZE.match(str(value))
        if m is None:
            raise ValueError(f"{value!r} is not a size in bytes (e.g. 1048576, 512M, 1G)")
        number = int(m.group(1)) * _UNITS[m.group(2).upper()]
    if number < 0:
        raise ValueError(f"{value!r} is negative")
    return number


def flag(value: Any) -> bool:
    """A yes/no setting from the TOML file: true or false only."""
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def mac_names(value: Any) -> tuple[str, ...]:
    """The MAC algorithms uploads may use: ``hmac-sha256,blake2b`` (or a TOML list)."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{value!r} is not a list of MAC names")
    chosen = tuple(dict.fromkeys(n.strip() for n in names if n.strip()))
    unknown = [n for n in chosen if n not in ALGORITHMS]
    if unknown or not chosen:
        raise ValueError(f"{value!r}: give one or more of {', '.join(ALGORITHMS)}")
    return chosen


# usage.Options reads a coerce function's coerceDoc attribute for --help.
byte_size.coerceDoc = "Bytes; K, M, G, T suffixes are powers of 1024."  # type: ignore[attr-defined]


def check_request(name: str, size: int, mac_hex: str, max_upload: int) -> bytes | None:
    """Validate an upload request without touching the disk; returns the MAC bytes,
    or None when the MAC follows the content (``mac_hex`` is ``-``)."""
    if not isinstance(name, str) or not name:
        raise CommandError("upload needs a file name")
    if "\0" in name:
        raise CommandError("invalid path: NUL byte")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise CommandError(f"SIZE must be a whole number of bytes: {size}")
    if size > max_upload:
        raise TooLarge(f"upload too large: {size} bytes (the limit is {max_upload} bytes)")
    if mac_hex == TRAILER:
        return None
    try:
        return parse_hex(mac_hex)
    except BadTrailer:
        raise UsageError("HMAC must be 64 hex digits (the MAC of the content), "
                         "or - to send it after the content") from None


def check_mac(algorithm: str, key: bytes, accepted: tuple[str, ...]) -> None:
    """Refuse, in one line, a MAC algorithm the server does not take: the client
    named it, and nothing else is used in its place."""
    if algorithm not in accepted:
        raise CommandError(f"MAC {str(algorithm)[:32]} is not accepted here "
                           f"(this server accepts: {', '.join(accepted)})")
    problem = mac_error(algorithm, key)
    if problem is not None:
        raise CommandError(problem)


class Upload:
    """One upload in progress: a consumer for exactly ``size`` bytes.

    ``done`` fires with an :class:`UploadResult` (a :class:`TrailerUploadResult`
    when the MAC follows the content) once the file is in place, or fails (MAC
    mismatch, disk full, ...); cancelling it aborts the upload.  ``closed``
    fires (never fails) when the worker has finished and no temporary file is
    left behind.  ``write`` and the producer calls happen on the reactor thread
    only.  With ``expected_mac`` None the MAC comes after the content
    (``wants_trailer``): through :meth:`trailer` or :meth:`finish`.
    """

    def __init__(self, spool: Spool, expected_mac: bytes | None, reactor: Any) -> None:
        self.name = spool.name
        self.size = spool.size
        self.remaining = spool.size
        self.spool = spool
        self.done: Deferred = Deferred(self._cancel)
        self.closed: Deferred = Deferred()
        self.wants_trailer = expected_mac is None
        self._expected = expected_mac
        self._reactor = reactor
        self._block: Block | None = None  # being filled
        self._spare: list[Block] = []  # written, ready to be filled again
        self._in_flight = 0  # bytes handed to the worker and not yet written
        self._producer: IPushProducer | None = None
        self._paused = False
        self._over = False  # the worker has stopped (finished, failed or aborted)
        self._abort = threading.Event()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=background(self._work),
                                        name=f"upload {self.name}", daemon=True)
        self._thread.start()  # RuntimeError when the system is out of threads: see begin()
        if self.size == 0 and not self.wants_trailer:
            self._inbox.put(_FINISH)

    # -- the door's side (reactor thread) -----------------------------------

    def write(self, data: bytes) -> None:
        """Take the next bytes of the content (no more than ``remaining``)."""
        n = len(data)
        if n > self.remaining:
            raise ValueError(f"{n} bytes offered, {self.remaining} expected")
        view, pos = memoryview(data), 0
        while pos < n:
            space = self.read_into()
            k = min(len(space), n - pos)
            space[:k] = view[pos:pos + k]
            pos += k
            self.commit(k)

    def read_into(self) -> memoryview:
        """Where the next bytes go: free space in a block, no more than ``remaining``.

        A door that can read its socket into it (``recv_into``) then calls
        :meth:`commit`: the kernel copies them there, and nothing copies them again.
        """
        block = self._block
        if block is None:
            block = self._block = self._spare.pop() if self._spare else Block(BATCH)
        return block.view[block.fill:block.fill + min(BATCH - block.fill, self.remaining)]

    def commit(self, n: int) -> None:
        """``n`` bytes were put where :meth:`read_into` said."""
        if n > self.remaining:
            raise ValueError(f"{n} bytes offered, {self.remaining} expected")
        self.remaining -= n
        block = self._block
        if block is None:
            return  # size 0, or nothing asked for
        if self._over:  # failed or aborted: the rest of the stream is only drained
            block.fill = 0
            return
        block.fill += n
        if block.fill == BATCH or not self.remaining:
            self._block = None
            self._in_flight += block.fill
            self._inbox.put(block)
            if not self.remaining and not self.wants_trailer:
                self._inbox.put(_FINISH)
            elif self._in_flight >= HIGH_WATER and not self._paused:
                self._set_paused(True)

    def trailer(self, line: bytes) -> None:
        """The line that came after the content (without its newline): ``MAC <hex>``.

        A bad line fails the upload with why; a good one finishes it.  An upload
        that is already over (a disk error before the last byte) ignores it: the
        door only had to take the line off the stream.
        """
        if self._over or self.done.called:
            return
        try:
            mac = parse_trailer(line)
        except BadTrailer as e:
            self.fail(f"{e}, upload discarded")
            return
        self.finish(mac)

    def finish(self, mac: bytes) -> None:
        """The MAC that followed the content: check it once the last byte is hashed."""
        if not self.wants_trailer:
            raise ValueError("this upload's MAC came with the request")
        if self.remaining:
            raise ValueError(f"{self.remaining} bytes of the content are still missing")
        if self._over or self.done.called or self._expected is not None:
            return
        self._expected = mac
        self._inbox.put(_FINISH)  # after the last block: the worker hashes it first

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """The door's reading side, paused while the worker is behind."""
        self._producer = producer

    def unregisterProducer(self) -> None:
        self._producer = None
        self._paused = False

    def abort(self) -> None:
        """Give up: the worker removes the temporary file; ``closed`` fires after."""
        if not self.done.called:
            self.done.cancel()
        else:
            self._stop_worker()

    def fail(self, message: str) -> None:
        """Give up with a reason the user sees (the stream ended early, ...)."""
        if not self.done.called:
            self._stop_worker()
            self.done.errback(CommandError(message))

    def _cancel(self, d: Deferred) -> None:
        self._stop_worker()

    def _stop_worker(self) -> None:
        self._over = True
        self._block, self._spare = None, []
        self._abort.set()
        self._inbox.put(_FINISH)  # wakes the worker; it sees the abort flag first

    def _set_paused(self, paused: bool) -> None:
        self._paused = paused
        if self._producer is not None:
            if paused:
                self._producer.pauseProducing()
            else:
                self._producer.resumeProducing()

    # -- reports from the worker (run on the reactor thread) ---------------

    def _written(self, block: Block) -> None:
        self._in_flight -= block.fill
        block.fill = 0
        if not self._over:
            self._spare.append(block)
        if self._paused and self._in_flight <= LOW_WATER:
            self._set_paused(False)

    def _finished(self, outcome: UploadResult | TrailerUploadResult | Failure) -> None:
        if isinstance(outcome, Failure) and not outcome.check(CommandError, CancelledError):
            log.failure("upload of {name} failed", outcome, name=escape(self.name))
            outcome = Failure(CommandError("upload failed (see the server log), "
                                           "upload discarded"))
        self._over = True
        self._block, self._spare = None, []
        if self._paused:
            self._set_paused(False)  # let the door drain what the client still sends
        if not self.done.called:
            if isinstance(outcome, Failure):
                self.done.errback(outcome)
            else:
                self.done.callback(outcome)
        self.closed.callback(None)

    # -- the worker thread ----------------------------------------------------

    def _work(self) -> None:
        name_thread("upload-write")
        spool, inbox, abort = self.spool, self._inbox, self._abort
        call = self._reactor.callFromThread
        outcome: UploadResult | TrailerUploadResult | Failure
        try:
            while True:
                item = inbox.get()
                if abort.is_set():
                    raise CancelledError()
                if item is _FINISH:
                    assert self._expected is not None  # set before _FINISH was queued
                    mac, sha256 = spool.publish(self._expected)
                    if self.wants_trailer:
                        outcome = TrailerUploadResult(self.name, self.size,
                                                      f"{spool.algorithm}:{mac}", sha256)
                    else:
                        assert sha256 is not None  # this form always computes it
                        outcome = UploadResult(self.name, self.size, sha256)
                    break
                try:
                    spool.write(item.view[:item.fill], partial(call, self._written, item))
                except OSError as e:
                    raise write_error(e) from None
        except BaseException:
            outcome = Failure()
            spool.discard()
        finally:
            spool.close()
        call(self._finished, outcome)


class Uploads:
    """The door-independent entry point: settings, keys and the uploads in flight.

    ``key_for(user)`` gives the HMAC key for an authenticated user: the user's
    own key when ``user_keys`` knows one, else the server key.
    """

    def __init__(self, settings: UploadSettings, server_key: bytes,
                 user_keys: Callable[[str], bytes | None] | None = None,
                 writer: Writer = os.writev) -> None:
        self.settings = settings
        self.server_key = server_key
        self.user_keys = user_keys
        self.run_id = new_run_id()
        self.writer = writer
        self.active: set[Upload] = set()
        self.files = 0  # uploads published since start (counted for /metrics)
        self.bytes = 0  # and their bytes

    def key_for(self, user: str) -> bytes:
        """The HMAC key uploads from ``user`` are checked against."""
        if self.user_keys is not None:
            key = self.user_keys(user)
            if key:
                return key
        return self.server_key

    def begin(self, ctx: Context, name: str, size: int, mac_hex: str,
              algorithm: str = HMAC_SHA256, sha256: bool = False) -> Deferred:
        """Check the request and create the temporary file; fires with an :class:`Upload`.

        ``mac_hex`` is the MAC in hex, or ``-``: it follows the content.  The
        server hashes each byte once for the MAC (``algorithm``, which the
        client named: refused, never replaced, if this server does not take it)
        and once more for a SHA-256 only when the answer promises one: always
        with the MAC in the request (that form's answer has it), else with
        ``sha256``.  Fails with ``CommandError`` (nothing created) if the upload
        may not start.  Cancelling it before it fires leaves nothing behind either.
        """
        expected = check_request(name, size, mac_hex, self.settings.max_upload)
        key = self.key_for(ctx.user)
        check_mac(algorithm, key, self.settings.macs)
        with_sha256 = sha256 or expected is not None
        cancelled = []
        outer: Deferred = Deferred(lambda _: cancelled.append(True))
        inner = ctx.core.in_thread(open_spool, ctx.policy, name, size, key,
                                   self.settings.overwrite, self.run_id, self.writer,
                                   algorithm, with_sha256, ctx=ctx)

        def opened(spool: Spool) -> None:
            if cancelled:  # nobody waits: remove the file we just made
                discard(ctx, spool)
                return
            try:
                upload = Upload(spool, expected, ctx.reactor)
            except RuntimeError as e:  # "can't start new thread"
                log.error("upload of {name}: no worker thread ({error}), upload discarded",
                          name=escape(name), error=str(e))
                discard(ctx, spool)
                outer.errback(CommandError(NO_THREAD))
                return
            self.active.add(upload)
            upload.closed.addCallback(lambda _: self.active.discard(upload))
            upload.done.addCallback(self._published)
            outer.callback(upload)

        def refused(failure: Failure) -> None:
            if not cancelled:
                outer.errback(failure)

        inner.addCallbacks(opened, refused)
        return outer

    def _published(self, result: UploadResult) -> UploadResult:
        self.files += 1
        self.bytes += result.size
        return result

    def abort_all(self) -> Deferred:
        """Abort every upload in flight; fires once their temporary files are gone."""
        uploads = list(self.active)
        for upload in uploads:
            upload.abort()
        return defer.gatherResults([u.closed for u in uploads])


def discard(ctx: Context, spool: Spool) -> None:
    """Remove an upload's temporary file and close its descriptors, off the reactor;
    on the reactor only when no thread can be had (the system is out of them)."""

    def here(failure: Failure) -> None:
        if failure.check(CommandError):  # the work never started: no thread for it
            spool.discard()
        else:
            log.failure("discarding {name}", failure, name=escape(spool.name))

    ctx.core.in_thread(spool.discard, ctx=ctx).addErrback(here)


class UploadService(Service):
    """Removes a dead run's temporary files at start; aborts uploads at stop."""

    name = "uploads"

    def __init__(self, uploads: Uploads, roots: list[str], reactor: Any) -> None:
        self.uploads = uploads
        self.roots = roots
        self.reactor = reactor
        self.cleaned: Deferred | None = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet.threads import deferToThreadPool

        pool = self.reactor.getThreadPool()
        d = deferToThreadPool(self.reactor, pool, remove_stale, self.roots,
                              self.uploads.run_id)
        d.addCallback(self._cleaned)
        d.addErrback(lambda f: log.failure("cleaning stale upload files", f))
        self.cleaned = d

    def _cleaned(self, removed: list[str]) -> list[str]:
        for path in removed:
            log.info("removed stale upload file {path}", path=path)
        return removed

    def stopService(self) -> Deferred:
        super().stopService()
        return self.uploads.abort_all()
