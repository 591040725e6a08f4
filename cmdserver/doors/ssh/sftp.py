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

import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.conch.interfaces import ISFTPServer
from twisted.conch.ls import lsLine
from twisted.conch.ssh import filetransfer
from twisted.conch.ssh.filetransfer import (
    FX_FAILURE,
    FX_FILE_ALREADY_EXISTS,
    FX_PERMISSION_DENIED,
    FXF_APPEND,
    FXF_CREAT,
    FXF_EXCL,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
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

        d = self.core.in_thread(call)
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
        if exists and not flags & FXF_TRUNC:
            raise unsupported("writing into an existing file (uploads replace it whole)")
        if not exists and not flags & FXF_CREAT:
            raise SFTPError(filetransfer.FX_NO_SUCH_FILE, f"no such file: {shown}")
        directory, base = os.path.split(target)
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                name, fd = open_temp(base, self.run_id, dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise os_error(e, shown) from None
        temp = os.path.join(directory, name)
        # The mode the client asks for (OpenSSH's sftp sends the local file's) is
        # ignored: an uploaded file is 0600, as with the upload command.
        return UploadFile(self, fd, temp, target, exclusive=bool(flags & FXF_EXCL),
                          name=filename)

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
    """Conch's SFTP protocol, except that a lost session aborts open uploads."""

    def __init__(self, server: JailedSFTPServer) -> None:
        super().__init__(avatar=server)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        files = list(self.openFiles.values())
        self.openFiles = {}
        for open_file in files:
            d = open_file.abort() if isinstance(open_file, UploadFile) else open_file.close()
            d.addErrback(lambda f: log.failure("sftp: cleaning up an open file failed", f))
        super().connectionLost(reason)


def _apply_attrs(path: str, attrs: dict) -> None:
    if "uid" in attrs or "size" in attrs:
        raise unsupported("changing owner or size")
    if "permissions" in attrs:  # narrowed, never widened: see capped_mode
        chmod_capped(path, attrs["permissions"])
    if "atime" in attrs:
        os.utime(path, (attrs["atime"], attrs["mtime"]))


def _text(value: Any) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)
