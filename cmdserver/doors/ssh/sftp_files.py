"""Open files of the SFTP subsystem: reads, atomic uploads and directory listings.

Every operation on a descriptor runs in a thread, one after the other in the
order the requests came, and is answered in that order; closing waits for the
reads or writes before it.  An upload is a :class:`cmdserver.jail.TempFile` in
the target directory (unnamed where the filesystem allows) that
:meth:`UploadFile.close` fsyncs and links into place, and
:meth:`UploadFile.abort` drops when the session ends first.  Writes past
``--max-upload`` or past the free space on the disk fail and discard the
upload.  An upload opened to append (OpenSSH's ``reput``, ``put -a``) starts as
the file it appends to and writes each chunk at its end; it too replaces the
file whole on close, within the same limits.  A file is audited (``get``,
``put``) when it is closed or abandoned, with the bytes read or written.  Each
open file or listing counts against the session's cap on handles until it is
closed.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
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

from cmdserver.text import escape

if TYPE_CHECKING:
    from cmdserver.doors.ssh.sftp import JailedSFTPServer
    from cmdserver.doors.ssh.sftp_paths import Place
    from cmdserver.jail import TempFile

log = Logger()

# The bounds limits@openssh.com announces, as OpenSSH's sftp-server has them: a
# longer packet ends the session; a read is answered with at most MAX_READ bytes.
MAX_PACKET = 256 * 1024
MAX_READ = MAX_PACKET - 1024  # room for the DATA reply's header
MAX_WRITE = MAX_PACKET - 1024  # room for the WRITE request's header and handle
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


def unsupported(what: str) -> SFTPError:
    """The status for what this server deliberately does not do."""
    return SFTPError(FX_OP_UNSUPPORTED, f"{what} is not supported here")


class DirectoryListing:
    """A directory's entries, read in full by a thread, handed out by conch."""

    def __init__(self, entries: list[tuple[bytes, bytes, dict]],
                 server: JailedSFTPServer | None = None) -> None:
        self.entries = entries
        self.server = server

    def __iter__(self) -> Iterator[tuple[bytes, bytes, dict]]:
        return iter(self.entries)

    def close(self) -> None:
        self.entries = []
        server, self.server = self.server, None
        if server is not None:
            server.release_handle()


class _OpenFile:
    """An open descriptor whose operations run in threads, one at a time, in order.

    The requests on one handle are carried out and answered in the order they
    came.  SFTP allows a server to answer in any order, but OpenSSH 9.0 to 9.3's
    ``scp`` writes a download in place and cuts it at the last byte before the
    first reply that came out of order (an upload too, through FSETSTAT): reads
    run side by side in threads finished in any order and lost data.  In turn,
    overlapping writes also land in the order they were sent, as SFTP requires.
    Closing is the last operation in that line, so it waits for the others.
    """

    def __init__(self, server: JailedSFTPServer, fd: int) -> None:
        self.server = server
        self.fd: int | None = fd
        self._queue: deque[tuple[Callable[[], Any], Deferred]] = deque()
        self._busy = False
        self.started = server.core.reactor.seconds()  # for the audit record's duration
        self.moved = 0  # bytes read or written
        self._holds_handle = True

    def _release(self) -> None:
        """Give the session's handle back (once), when the file is closed or dropped."""
        if self._holds_handle:
            self._holds_handle = False
            self.server.release_handle()

    def _op(self, f: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``f(*args)`` in turn; a closed file fails in turn too."""
        if self.fd is None:
            return self._in_turn(_closed)
        return self._in_turn(lambda: f(*args))

    def _in_turn(self, f: Callable[[], Any]) -> Deferred:
        """Run ``f`` in a thread once every operation queued before it is answered."""
        d: Deferred = Deferred()
        self._queue.append((f, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        if not self._queue:
            self._busy = False
            return
        self._busy = True
        f, d = self._queue.popleft()

        def answer(result: Any) -> None:
            # The caller's callbacks (conch's reply) run now, before the next
            # operation starts: the replies leave in the order of the requests.
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
            self._next()

        self.server.core.in_thread(f, ctx=self.server.ctx).addBoth(answer)

    def getAttrs(self) -> Deferred:
        fd = self.fd
        # _op refuses a closed file (fd None) before the lambda can run.
        return self._op(lambda: stat_attrs(os.fstat(cast(int, fd))))

    def fsync(self) -> Deferred:
        """``fsync@openssh.com``: in turn, after the writes before it."""
        return self._op(os.fsync, self.fd)

    def statvfs(self) -> Deferred:
        """``fstatvfs@openssh.com``: the filesystem the file is on."""
        return self._op(os.fstatvfs, self.fd)


@implementer(ISFTPFile)
class ReadFile(_OpenFile):
    """A jailed file opened for ``get``."""

    def __init__(self, server: JailedSFTPServer, fd: int, place: Place) -> None:
        super().__init__(server, fd)
        self.place = place

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
        self._release()
        self.server._audit("get", [self.place], "ok", None, self.started, {"bytes": self.moved})
        return self._in_turn(lambda: os.close(fd))


@implementer(ISFTPFile)
class UploadFile(_OpenFile):
    """An upload: written to a temporary file, linked into place on close.

    The temporary file (:class:`cmdserver.jail.TempFile`) holds its directory by
    a descriptor: renaming the directory meanwhile neither loses the file nor
    sends it elsewhere; it is published in that directory, under its new name.

    Opened on an existing file without truncating it (OpenSSH's ``scp`` does
    that), the upload starts as that file's content: ``base`` is the file, and
    the bytes the client does not write come from it.  They are copied only
    when needed: not at all when the client writes from the start and then
    sets the size it wrote, as ``scp`` does.  Opened to ``append``, every write
    lands at the end of the upload, whatever its offset says (OpenSSH's
    ``reput`` sends the offsets from the file's size, which is that end).
    """

    def __init__(self, server: JailedSFTPServer, temp: TempFile, exclusive: bool,
                 place: Place, base: int | None = None, append: bool = False) -> None:
        super().__init__(server, temp.fd)
        self.base = base  # until its bytes are copied in or cut off
        self.base_size = os.fstat(base).st_size if base is not None else 0
        self.prefix = 0  # the client wrote all of [0, prefix) (while base is kept)
        self.end = 0  # the end of the bytes the client wrote
        self.temp = temp
        self.mode = FILE_MODE  # an FSETSTAT may narrow it before close
        self.exclusive = exclusive
        self.append = append
        self.place = place
        self.times: tuple[int, int] | None = None
        self.failed: str | None = None  # why a write failed: the upload is discarded

    def readChunk(self, offset: int, length: int) -> Deferred:
        return defer.fail(unsupported("reading an upload before it is closed"))

    def writeChunk(self, offset: int, data: bytes) -> Deferred:
        self.moved += len(data)
        fd = self.fd
        return self._op(self._write, fd, data, offset)

    def _write(self, fd: int, data: bytes, offset: int) -> None:
        if self.failed is not None:
            raise SFTPError(FX_FAILURE, f"an earlier write failed ({self.failed})")
        if self.append:
            offset = self._size(fd)
        try:
            self._check_room(fd, offset + len(data))
            if self.base is not None and offset > self.prefix:
                self._copy_base(fd)  # the gap before offset keeps the file's bytes
            _pwrite_all(fd, data, offset)
        except SFTPError as e:
            self.failed = e.message
            raise
        except OSError as e:
            error = os_error(e, self.place.shown)
            self.failed = error.message
            raise error from None
        if self.base is not None:
            self.prefix = max(self.prefix, offset + len(data))
        self.end = max(self.end, offset + len(data))

    def _check_room(self, fd: int, end: int) -> None:
        """The upload engine's rules for a write that ends at ``end``: not past
        ``--max-upload`` (so no write at a huge offset either), and not past the
        free space on the disk (a hole counts as written, as an upload's whole
        size does)."""
        limit = self.server.max_upload
        if end > limit:
            raise SFTPError(FX_FAILURE, f"upload too large: {end} bytes "
                                        f"(the limit is {limit} bytes)")
        size = max(end, self.base_size if self.base is not None else 0)
        grow = size - os.fstat(fd).st_size
        if grow > 0:
            fs = os.fstatvfs(fd)
            free = fs.f_bavail * fs.f_frsize
            if grow > free:
                raise SFTPError(FX_FAILURE, f"not enough disk space: {grow} bytes needed, "
                                            f"{free} available")

    def _copy_base(self, fd: int) -> None:
        """Copy the replaced file's bytes the client has not written (beyond the
        prefix) into the upload."""
        base, self.base = self.base, None
        if base is not None:
            try:
                _copy_range(base, fd, self.prefix, self.base_size)
            finally:
                os.close(base)

    def _drop_base(self) -> None:
        base, self.base = self.base, None
        if base is not None:
            os.close(base)

    def _size(self, fd: int) -> int:
        if self.base is not None:
            return max(self.prefix, self.base_size)
        return os.fstat(fd).st_size

    def getAttrs(self) -> Deferred:
        fd = self.fd

        def attrs() -> dict[str, int]:
            found = stat_attrs(os.fstat(cast(int, fd)))
            found["size"] = self._size(cast(int, fd))
            return found

        return self._op(attrs)

    def setAttrs(self, attrs: dict) -> Deferred:
        """FSETSTAT, in turn after the writes before it.

        The mode (narrowed, see :func:`capped_mode`) and the times are set on
        close.  A size is accepted as the upload has it, or at the end of the
        bytes the client wrote (OpenSSH's ``scp`` sends the size it wrote): that
        cuts off only what is left of a file written into.  Another size would
        change the data the client sent and is refused.
        """
        fd = self.fd
        return self._op(self._set_attrs, fd, attrs)

    def _set_attrs(self, fd: int, attrs: dict) -> None:
        if "uid" in attrs:
            raise unsupported("changing owner")
        if "size" in attrs and attrs["size"] != self._size(fd):
            if attrs["size"] != self.end:
                raise unsupported("changing the size of an upload")
            self._drop_base()
            try:
                os.ftruncate(fd, self.end)
            except OSError as e:
                error = os_error(e, self.place.shown)
                self.failed = error.message  # what is left of the file may be in it
                raise error from None
        if "permissions" in attrs:
            self.mode = capped_mode(stat.S_IFREG, attrs["permissions"])
        if "atime" in attrs:
            self.times = (attrs["atime"], attrs["mtime"])

    def close(self) -> Deferred:
        """Make the upload visible under its name, whole, or not at all."""
        if self.fd is None:
            return defer.fail(SFTPError(FX_FAILURE, "file is closed"))
        fd, self.fd = self.fd, None
        self._release()
        d = self._in_turn(lambda: self._commit(fd))
        server = self.server

        def audit_ok(_: Any) -> None:
            server._audit("put", [self.place], "ok", None, self.started, {"bytes": self.moved})

        def audit_error(f: Failure) -> Failure:
            server._audit("put", [self.place], "error", f.getErrorMessage(), self.started,
                          {"bytes": self.moved})
            return f

        d.addCallbacks(audit_ok, audit_error)
        return d

    def _commit(self, fd: int) -> None:
        temp = self.temp
        if self.failed is not None:  # a file with a hole in it is never made visible
            self._drop_base()
            temp.discard()
            raise SFTPError(FX_FAILURE, f"upload discarded: a write failed ({self.failed})")
        try:
            self._copy_base(fd)
            os.fchmod(fd, self.mode)
            if self.times is not None:
                os.utime(fd, self.times)
            os.fsync(fd)
            temp.publish(replace=not self.exclusive)  # exclusive: fails if the name appeared
        except OSError as e:
            temp.discard()
            raise os_error(e, self.place.shown) from None

    def abort(self) -> Deferred:
        """The session ended before close: drop the temporary file."""
        if self.fd is None:
            return defer.succeed(None)
        self.fd = None
        self._release()

        def drop() -> None:
            self._drop_base()
            self.temp.discard()

        log.info("sftp: upload of {name} abandoned, temporary file removed",
                 name=escape(self.place.shown))
        self.server._audit("put", [self.place], "error", "the session ended before the upload "
                           "was closed", self.started, {"bytes": self.moved})
        return self._in_turn(drop)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    """Copy the bytes from ``start`` to ``end`` of ``src`` to the same place in ``dst``."""
    offset = start
    while offset < end:
        try:
            copied = os.copy_file_range(src, dst, end - offset, offset, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            chunk = os.pread(src, min(end - offset, MAX_READ), offset)
            _pwrite_all(dst, chunk, offset)
            copied = len(chunk)
        if not copied:
            return  # the file got shorter meanwhile
        offset += copied


def _closed() -> None:
    raise SFTPError(FX_FAILURE, "file is closed")
