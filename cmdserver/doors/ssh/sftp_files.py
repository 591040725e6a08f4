"""Open files of the SFTP subsystem: reads, atomic uploads and directory listings.

Every operation on a descriptor runs in a thread; closing waits for the reads
or writes still in flight.  An upload is a temporary file in the target
directory that :meth:`UploadFile.close` fsyncs and renames over the target,
and :meth:`UploadFile.abort` removes when the session ends first.  A file is
audited (``get``, ``put``) when it is closed or abandoned, with the bytes read
or written.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from twisted.conch.interfaces import ISFTPFile
from twisted.conch.ssh import filetransfer
from twisted.conch.ssh.filetransfer import (
    FX_FAILURE,
    FX_FILE_ALREADY_EXISTS,
    FX_OP_UNSUPPORTED,
    FX_PERMISSION_DENIED,
    SFTPError,
)
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cmdserver.logtext import escape

if TYPE_CHECKING:
    from cmdserver.doors.ssh.sftp import JailedSFTPServer

log = Logger()

MAX_READ = 256 * 1024  # bytes per read request; clients ask for 32 KiB anyway
FILE_MODE = 0o600  # every file SFTP creates, whatever mode the client asks for
MAX_DIR_MODE = 0o755  # the most a directory may be given (mkdir's default)


def stat_attrs(st: os.stat_result) -> dict[str, int]:
    """SFTP attributes of a stat result."""
    return {"size": st.st_size, "uid": st.st_uid, "gid": st.st_gid,
            "permissions": st.st_mode, "atime": int(st.st_atime), "mtime": int(st.st_mtime)}


def os_error(e: OSError, path: str) -> SFTPError:
    """An SFTP status for an OS error: a short reason, never a traceback."""
    codes: dict[int | None, int] = {  # e.errno may be None
        errno.ENOENT: filetransfer.FX_NO_SUCH_FILE, errno.EACCES: FX_PERMISSION_DENIED,
        errno.EPERM: FX_PERMISSION_DENIED, errno.EEXIST: FX_FILE_ALREADY_EXISTS}
    reason = e.strerror or str(e)
    return SFTPError(codes.get(e.errno, FX_FAILURE), f"{reason.lower()}: {path}")


def capped_mode(st_mode: int, requested: int) -> int:
    """The permission bits a request may set: a client can narrow a mode, never widen it.

    Files keep at most :data:`FILE_MODE` (0600, like the ``upload`` command's),
    directories at most :data:`MAX_DIR_MODE`; set-id and sticky bits are dropped.
    """
    return requested & (MAX_DIR_MODE if stat.S_ISDIR(st_mode) else FILE_MODE)


def chmod_capped(path: str, requested: int) -> None:
    """Set ``path``'s mode to ``requested`` as :func:`capped_mode` allows.

    The type is read from, and the mode set through, one descriptor (``O_PATH``,
    without following a last-moment symlink), so an entry swapped for another
    between the two steps cannot get a directory's mode on a file.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = capped_mode(os.fstat(fd).st_mode, requested)
        # fchmod refuses O_PATH descriptors; the /proc link reaches the same inode.
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def unsupported(what: str) -> SFTPError:
    """The status for what this server deliberately does not do."""
    return SFTPError(FX_OP_UNSUPPORTED, f"{what} is not supported here")


class DirectoryListing:
    """A directory's entries, read in full by a thread, handed out by conch."""

    def __init__(self, entries: list[tuple[bytes, bytes, dict]]) -> None:
        self.entries = entries

    def __iter__(self) -> Iterator[tuple[bytes, bytes, dict]]:
        return iter(self.entries)

    def close(self) -> None:
        self.entries = []


class _OpenFile:
    """An open descriptor whose operations run in threads; close waits for them."""

    def __init__(self, server: JailedSFTPServer, fd: int) -> None:
        self.server = server
        self.fd: int | None = fd
        self._pending: set[Deferred] = set()
        self.started = server.core.reactor.seconds()  # for the audit record's duration
        self.moved = 0  # bytes read or written

    def _op(self, f: Callable[..., Any], *args: Any) -> Deferred:
        if self.fd is None:
            return defer.fail(SFTPError(FX_FAILURE, "file is closed"))
        d = self.server.core.in_thread(f, *args)
        self._pending.add(d)

        def settled(result: Any) -> Any:
            self._pending.discard(d)
            return result

        return d.addBoth(settled)

    def _after_pending(self, f: Callable[[], Any]) -> Deferred:
        """Run ``f`` in a thread once every read or write in flight is done."""
        pending = [_quiet(d) for d in self._pending]
        d = defer.DeferredList(pending) if pending else defer.succeed(None)
        d.addCallback(lambda _: self.server.core.in_thread(f))
        return d

    def getAttrs(self) -> Deferred:
        fd = self.fd
        # _op refuses a closed file (fd None) before the lambda can run.
        return self._op(lambda: stat_attrs(os.fstat(cast(int, fd))))


@implementer(ISFTPFile)
class ReadFile(_OpenFile):
    """A jailed file opened for ``get``."""

    def __init__(self, server: JailedSFTPServer, fd: int, name: bytes) -> None:
        super().__init__(server, fd)
        self.name = name

    def readChunk(self, offset: int, length: int) -> Deferred:
        fd = self.fd
        return self._op(os.pread, fd, min(length, MAX_READ), offset).addCallback(self._read)

    def _read(self, data: bytes) -> bytes:
        self.moved += len(data)
        return data

    def writeChunk(self, offset: int, data: bytes) -> Deferred:
        return defer.fail(SFTPError(FX_PERMISSION_DENIED, "file is not open for writing"))

    def setAttrs(self, attrs: dict) -> Deferred:
        return defer.fail(unsupported("changing a file opened for reading"))

    def close(self) -> Deferred:
        if self.fd is None:
            return defer.succeed(None)
        fd, self.fd = self.fd, None
        self.server._audit("get", [self.name], "ok", None, self.started, {"bytes": self.moved})
        return self._after_pending(lambda: os.close(fd))


@implementer(ISFTPFile)
class UploadFile(_OpenFile):
    """An upload: written to a temporary file, renamed into place on close."""

    def __init__(self, server: JailedSFTPServer, fd: int, temp: str, target: str,
                 exclusive: bool, name: bytes) -> None:
        super().__init__(server, fd)
        self.temp = temp
        self.target = target
        self.mode = FILE_MODE  # an FSETSTAT may narrow it before close
        self.exclusive = exclusive
        self.name = name
        self.times: tuple[int, int] | None = None

    def readChunk(self, offset: int, length: int) -> Deferred:
        return defer.fail(unsupported("reading an upload before it is closed"))

    def writeChunk(self, offset: int, data: bytes) -> Deferred:
        self.moved += len(data)
        return self._op(_pwrite_all, self.fd, data, offset)

    def setAttrs(self, attrs: dict) -> Deferred:
        if "uid" in attrs or "size" in attrs:
            return defer.fail(unsupported("changing owner or size"))
        if "permissions" in attrs:
            self.mode = capped_mode(stat.S_IFREG, attrs["permissions"])
        if "atime" in attrs:
            self.times = (attrs["atime"], attrs["mtime"])
        return defer.succeed(None)

    def close(self) -> Deferred:
        """Make the upload visible under its name, whole, or not at all."""
        if self.fd is None:
            return defer.fail(SFTPError(FX_FAILURE, "file is closed"))
        fd, self.fd = self.fd, None
        d = self._after_pending(lambda: self._commit(fd))
        server = self.server

        def audit_ok(_: Any) -> None:
            server._audit("put", [self.name], "ok", None, self.started, {"bytes": self.moved})

        def audit_error(f: Failure) -> Failure:
            server._audit("put", [self.name], "error", f.getErrorMessage(), self.started,
                          {"bytes": self.moved})
            return f

        d.addCallbacks(audit_ok, audit_error)
        return d

    def _commit(self, fd: int) -> None:
        try:
            os.fchmod(fd, self.mode)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            if self.times is not None:
                os.utime(self.temp, self.times)
            if self.exclusive:
                os.link(self.temp, self.target)  # fails if the name appeared meanwhile
                os.unlink(self.temp)
            else:
                os.replace(self.temp, self.target)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            _remove(self.temp)
            raise os_error(e, os.fsdecode(self.name)) from None

    def abort(self) -> Deferred:
        """The session ended before close: drop the temporary file."""
        if self.fd is None:
            return defer.succeed(None)
        fd, self.fd = self.fd, None

        def drop() -> None:
            os.close(fd)
            _remove(self.temp)

        log.info("sftp: upload of {name} abandoned, temporary file removed",
                 name=escape(self.name))
        self.server._audit("put", [self.name], "error", "the session ended before the upload "
                           "was closed", self.started, {"bytes": self.moved})
        return self._after_pending(drop)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _quiet(d: Deferred) -> Deferred:
    """A Deferred that fires when ``d`` does, without taking its result or error."""
    waiter: Deferred = Deferred()

    def fire(result: Any) -> Any:
        waiter.callback(None)
        return result

    d.addBoth(fire)
    return waiter
