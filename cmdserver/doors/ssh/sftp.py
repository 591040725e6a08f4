"""The SFTP subsystem: ls, get, put, mkdir, rm, rename inside the user's jail.

Conch's ``FileTransferServer`` speaks the protocol; :class:`JailedSFTPServer`
is our ``ISFTPServer``.  Every path goes through :meth:`Policy.resolve` (or, for
operations on a directory entry itself, through its parent), and every file
operation runs in a thread.  Uploads never show a partial file: bytes go to a
temporary file in the target directory that is renamed into place on close
and removed if the session dies first.  The temporary file is named and made
like the upload engine's (:func:`cmdserver.commands.upload.spool.open_temp`), so the
start-up sweep removes those a killed daemon left behind.

Operations are audited through the core (:meth:`CommandCore.audit_operation`),
in the SSH connection's session: ``get`` and ``put`` when the file is closed
(with the bytes read or written), ``ls``, ``rm``, ``rename``, ``mkdir`` and
``rmdir`` when done, and any refusal by the jail; paths as the jail names them
(:meth:`Policy.jail_path`).
"""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.conch.interfaces import ISFTPServer
from twisted.conch.ls import lsLine
from twisted.conch.ssh import filetransfer
from twisted.conch.ssh.filetransfer import (
    FX_BAD_MESSAGE,
    FX_FAILURE,
    FX_FILE_ALREADY_EXISTS,
    FX_PERMISSION_DENIED,
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_ATTRS,
    FXP_DATA,
    FXP_EXTENDED_REPLY,
    FXP_HANDLE,
    FXP_NAME,
    FXP_STATUS,
    SFTPError,
)
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cmdserver.commands.base import Context
from cmdserver.commands.upload.spool import TEMP_RE, open_temp
from cmdserver.doors.ssh.sftp_files import (
    MAX_DIR_MODE,
    DirectoryListing,
    ReadFile,
    UploadFile,
    chmod_capped,
    os_error,
    stat_attrs,
    unsupported,
)
from cmdserver.errors import CommandError, PathOutsideRoots

if TYPE_CHECKING:
    from cmdserver.doors.ssh.avatar import SSHAvatar

log = Logger()

DOOR = "sftp"


@implementer(ISFTPServer)
class JailedSFTPServer:
    """File operations for one SFTP session, confined to the avatar's roots."""

    def __init__(self, avatar: SSHAvatar) -> None:
        self.avatar = avatar
        self.policy = avatar.policy
        self.core = avatar.core
        self.run_id = avatar.settings.temp_run_id
        self.ctx = Context(self.core, user=avatar.account.name, peer=avatar.peer, door=DOOR,
                           policy=self.policy, session_id=avatar.session_id)

    # -- helpers -------------------------------------------------------------

    def _run(self, action: str, f: Callable[[], Any], *paths: bytes) -> Deferred:
        """Run ``f`` in a thread; jail refusals become (audited) SFTP errors."""
        def call() -> Any:
            try:
                return f()
            except PathOutsideRoots as e:
                raise SFTPError(FX_PERMISSION_DENIED, e.message) from None
            except CommandError as e:
                raise SFTPError(FX_FAILURE, e.message) from None

        d = self.core.in_thread(call, ctx=self.ctx)
        d.addErrback(self._refused, action, paths, self.core.reactor.seconds())
        return d

    def _refused(self, failure: Any, action: str, args: tuple, started: float) -> Any:
        if failure.check(SFTPError) and failure.value.code == FX_PERMISSION_DENIED:
            self._audit(action, args, "refused", failure.value.message, started)
        return failure

    def _audit(self, action: str, args: Any, outcome: str, error: str | None = None,
               started: float | None = None, result: Any = None) -> None:
        """Report an operation on the paths ``args`` (raw, as the client sent
        them) to the core's audit trail; ``result`` says what it moved."""
        shown = [self._shown(a) for a in args]
        named = dict(zip(("path", "to"), shown, strict=False))
        duration = 0.0 if started is None else self.core.reactor.seconds() - started
        self.core.audit_operation(self.ctx, action, named, outcome, duration, error, result)

    def _shown(self, raw: bytes) -> str:
        """A path as the audit log shows it: inside the jail relative to it, never
        the server's absolute path; outside it (refused) as the client sent it."""
        path = _text(raw)
        return self.policy.jail_path(path) or path

    def _resolve(self, raw: bytes) -> str:
        """The real path for ``raw``, following symlinks; inside the jail or refused."""
        return self.policy.resolve(os.fsdecode(raw))

    def _entry(self, raw: bytes) -> str:
        """The path of the directory entry ``raw`` names, without following it.

        Used to remove, rename or create an entry: a symlink is acted on itself,
        and only its parent directory must resolve inside the jail.
        """
        path = os.fsdecode(raw)
        if "\0" in path:
            raise CommandError("invalid path: NUL byte")
        full = os.path.normpath(os.path.join(self.policy.roots[0], path))
        head, name = os.path.split(full)
        if name in ("", ".", ".."):
            raise PathOutsideRoots()
        return os.path.join(self.policy.resolve(head), name)

    @staticmethod
    def _not_reserved(entry: str, raw: bytes) -> None:
        """Refuse a file named like a temporary file: another session's upload in
        progress is not a file yet, and a new one by that name would be swept."""
        if TEMP_RE.match(os.path.basename(entry)):
            raise SFTPError(FX_FAILURE, "reserved name (upload temporary files look like "
                                        f"it): {os.fsdecode(raw)}")

    # -- ISFTPServer ---------------------------------------------------------

    def gotVersion(self, otherVersion: int, extData: dict) -> dict:
        return {}

    def realPath(self, path: bytes) -> Deferred:
        return self._run("realpath", lambda: os.fsencode(self._resolve(path)), path)

    def getAttrs(self, path: bytes, followLinks: bool) -> Deferred:
        def stat_path() -> dict:
            if followLinks:
                real = self._resolve(path)
                try:
                    return stat_attrs(os.stat(real))
                except OSError as e:
                    raise os_error(e, os.fsdecode(path)) from None
            entry = self._entry(path)
            try:
                return stat_attrs(os.lstat(entry))
            except OSError as e:
                raise os_error(e, os.fsdecode(path)) from None

        return self._run("stat", stat_path, path)

    def setAttrs(self, path: bytes, attrs: dict) -> Deferred:
        def apply() -> None:
            real = self._resolve(path)
            try:
                _apply_attrs(real, attrs)
            except OSError as e:
                raise os_error(e, os.fsdecode(path)) from None

        return self._run("setstat", apply, path)

    def openDirectory(self, path: bytes) -> Deferred:
        def listing() -> DirectoryListing:
            real = self._resolve(path)
            try:
                names = sorted(os.listdir(real))
            except OSError as e:
                raise os_error(e, os.fsdecode(path)) from None
            entries = []
            for name in names:
                if TEMP_RE.match(name):
                    continue  # an upload in progress is not a file yet
                try:
                    st = os.lstat(os.path.join(real, name))
                except OSError:
                    continue  # removed meanwhile
                entries.append((os.fsencode(name), lsLine(name, st).encode("utf-8", "replace"),
                                stat_attrs(st)))
            return DirectoryListing(entries)

        return self._audited("ls", self._run("ls", listing, path), path)

    def openFile(self, filename: bytes, flags: int, attrs: dict) -> Deferred:
        if flags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC):
            if flags & (FXF_READ | FXF_APPEND):
                return defer.fail(unsupported("reading and appending to an upload"))
            d = self._run("put", lambda: self._open_upload(filename, flags, attrs), filename)
            return self._audited("put", d, filename)
        d = self._run("get", lambda: self._open_read(filename), filename)
        return self._audited("get", d, filename)

    def _open_read(self, filename: bytes) -> ReadFile:
        real = self._resolve(filename)
        self._not_reserved(real, filename)
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise os_error(e, os.fsdecode(filename)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # FIFOs and devices could block a thread
            os.close(fd)
            raise SFTPError(FX_FAILURE, f"not a regular file: {os.fsdecode(filename)}")
        return ReadFile(self, fd, filename)

    def _open_upload(self, filename: bytes, flags: int, attrs: dict) -> UploadFile:
        target = self._entry(filename)
        shown = os.fsdecode(filename)
        self._not_reserved(target, filename)
        exists = os.path.lexists(target)
        if exists and flags & FXF_EXCL:
            raise SFTPError(FX_FILE_ALREADY_EXISTS, f"file exists: {shown}")
        if exists and os.path.isdir(target):
            raise SFTPError(FX_FAILURE, f"is a directory: {shown}")
        if not exists and not flags & FXF_CREAT:
            raise SFTPError(filetransfer.FX_NO_SUCH_FILE, f"no such file: {shown}")
        replaced = None
        if exists and not flags & FXF_TRUNC:
            # Written into without truncating (OpenSSH's scp does): the upload
            # starts as the file's content and still replaces it whole on close.
            replaced = self._open_replaced(target, shown)
        directory, base = os.path.split(target)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                name, fd = open_temp(base, self.run_id, dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            if replaced is not None:
                os.close(replaced)
            raise os_error(e, shown) from None
        temp = os.path.join(directory, name)
        # The mode the client asks for (OpenSSH's sftp sends the local file's) is
        # ignored: an uploaded file is 0600, as with the upload command.
        return UploadFile(self, fd, temp, target, exclusive=bool(flags & FXF_EXCL),
                          name=filename, base=replaced)

    @staticmethod
    def _open_replaced(target: str, shown: str) -> int:
        """The file an upload writes into, for reading; never through a symlink."""
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise unsupported("writing into a symlink") from None
            raise os_error(e, shown) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SFTPError(FX_FAILURE, f"not a regular file: {shown}")
        return fd

    def removeFile(self, filename: bytes) -> Deferred:
        def remove() -> None:
            entry = self._entry(filename)
            self._not_reserved(entry, filename)
            try:
                if os.path.isdir(entry) and not os.path.islink(entry):
                    raise SFTPError(FX_FAILURE, f"is a directory: {os.fsdecode(filename)}")
                os.unlink(entry)
            except OSError as e:
                raise os_error(e, os.fsdecode(filename)) from None

        return self._audited("rm", self._run("rm", remove, filename), filename)

    def renameFile(self, oldpath: bytes, newpath: bytes) -> Deferred:
        def rename() -> None:
            old, new = self._entry(oldpath), self._entry(newpath)
            self._not_reserved(old, oldpath)
            self._not_reserved(new, newpath)
            if os.path.lexists(new):  # SFTP v3: renaming onto an existing name fails
                raise SFTPError(FX_FILE_ALREADY_EXISTS, f"file exists: {os.fsdecode(newpath)}")
            try:
                os.rename(old, new)
            except OSError as e:
                raise os_error(e, os.fsdecode(oldpath)) from None

        d = self._run("rename", rename, oldpath, newpath)
        return self._audited("rename", d, oldpath, newpath)

    def makeDirectory(self, path: bytes, attrs: dict) -> Deferred:
        def mkdir() -> None:
            entry = self._entry(path)
            try:
                os.mkdir(entry, attrs.get("permissions", MAX_DIR_MODE) & MAX_DIR_MODE)
            except OSError as e:
                raise os_error(e, os.fsdecode(path)) from None

        return self._audited("mkdir", self._run("mkdir", mkdir, path), path)

    def removeDirectory(self, path: bytes) -> Deferred:
        def rmdir() -> None:
            entry = self._entry(path)
            if entry in self.policy.roots:
                raise SFTPError(FX_PERMISSION_DENIED, "a root cannot be removed")
            try:
                os.rmdir(entry)
            except OSError as e:
                raise os_error(e, os.fsdecode(path)) from None

        return self._audited("rmdir", self._run("rmdir", rmdir, path), path)

    def readLink(self, path: bytes) -> Deferred:
        return defer.fail(unsupported("readlink"))

    def makeLink(self, linkPath: bytes, targetPath: bytes) -> Deferred:
        return defer.fail(unsupported("symlink"))

    def extendedRequest(self, extendedName: bytes, extendedData: bytes) -> Deferred:
        return defer.fail(unsupported(f"extension {_text(extendedName)}"))

    def _audited(self, action: str, d: Deferred, *args: bytes) -> Deferred:
        """Audit a download or a change to the jail once it is done (or failed); a
        file opened for ``get`` or ``put`` is audited when it is closed."""
        started = self.core.reactor.seconds()

        def done(result: Any) -> Any:
            if isinstance(result, (ReadFile, UploadFile)):
                return result  # audited when closed
            if not (hasattr(result, "check") and result.check(SFTPError)
                    and result.value.code == FX_PERMISSION_DENIED):  # already audited
                error = result.getErrorMessage() if hasattr(result, "check") else None
                self._audit(action, args, "error" if error else "ok", error, started)
            return result

        return d.addBoth(done)


class JailedFileTransferServer(filetransfer.FileTransferServer):
    """Conch's SFTP protocol, except that a lost session aborts open uploads and
    that it knows which requests are not answered yet.

    The session ends at the client's EOF, but only once every request received
    before it is answered (:meth:`requests_answered`): a client may send its
    last reads, writes or closes and its EOF without waiting for the replies.
    """

    def __init__(self, server: JailedSFTPServer) -> None:
        super().__init__(avatar=server)
        self._unanswered: Counter[bytes] = Counter()  # request id -> requests
        self._waiting: list[Deferred] = []
        self._dispatching = False

    def requests_answered(self) -> Deferred:
        """A Deferred that fires once every request received so far is answered."""
        d: Deferred = Deferred()
        self._waiting.append(d)
        self._maybe_idle()
        return d

    def _dispatch(self, handler: Callable[..., None], data: bytes, *args: Any) -> None:
        """Run conch's handler for one request, which is unanswered until its reply."""
        if self._dispatching:  # conch's handlers call each other: LSTAT calls STAT
            handler(self, data, *args)
            return
        request_id = data[:4]
        self._unanswered[request_id] += 1
        count = self._unanswered[request_id]
        self._dispatching = True
        try:
            handler(self, data, *args)
        except Exception:
            # A malformed request (conch logs it), which conch would never answer.
            if self._unanswered[request_id] >= count:
                self._sendStatus(request_id, FX_BAD_MESSAGE, b"bad request")
            raise
        finally:
            self._dispatching = False

    def sendPacket(self, kind: int, data: bytes) -> None:
        super().sendPacket(kind, data)
        if kind in _REPLIES:  # every reply starts with its request's id
            request_id = data[:4]
            if self._unanswered[request_id] > 1:
                self._unanswered[request_id] -= 1
            else:
                self._unanswered.pop(request_id, None)
            self._maybe_idle()

    def _maybe_idle(self) -> None:
        if self._waiting and not self._unanswered:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        files = list(self.openFiles.values())
        self.openFiles = {}
        for open_file in files:
            d = open_file.abort() if isinstance(open_file, UploadFile) else open_file.close()
            d.addErrback(lambda f: log.failure("sftp: cleaning up an open file failed", f))
        super().connectionLost(reason)


def _counted(name: str) -> Callable[..., None]:
    handler = getattr(filetransfer.FileTransferServer, name)

    def handle(self: JailedFileTransferServer, data: bytes, *args: Any) -> None:
        self._dispatch(handler, data, *args)

    handle.__name__ = name
    return handle


# conch dispatches a request of type T to packet_T; each but INIT has a request id.
for _name in dir(filetransfer.FileTransferServer):
    if _name.startswith("packet_") and _name != "packet_INIT":
        setattr(JailedFileTransferServer, _name, _counted(_name))

_REPLIES = frozenset({FXP_STATUS, FXP_HANDLE, FXP_DATA, FXP_NAME, FXP_ATTRS,
                      FXP_EXTENDED_REPLY})


def _apply_attrs(path: str, attrs: dict) -> None:
    if "uid" in attrs:
        raise unsupported("changing owner")
    # A file changes only by a whole upload; a size it already has changes nothing.
    if "size" in attrs and attrs["size"] != os.stat(path).st_size:
        raise unsupported("changing the size of a file (upload it again)")
    if "permissions" in attrs:  # narrowed, never widened: see capped_mode
        chmod_capped(path, attrs["permissions"])
    if "atime" in attrs:
        os.utime(path, (attrs["atime"], attrs["mtime"]))


def _text(value: Any) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)
