"""The SFTP subsystem: ls, get, put, mkdir, rm, rename inside the user's jail.

Conch's ``FileTransferServer`` speaks the protocol; :class:`JailedSFTPServer`
is our ``ISFTPServer``.  A client sees the jail as OpenSSH's ``ChrootDirectory``
shows a directory (:mod:`cmdserver.doors.ssh.sftp_paths`): one root is ``/``;
several are listed in a read-only ``/`` as ``root1``, ``root2`` … and the
session starts in ``/root1``.  No server path reaches the client, in names or
in messages.  Every path goes through the jail (:class:`cmdserver.jail.Jail`):
files are opened and changed relative to a descriptor of their root or their
directory, never by a checked absolute name, and every file operation runs in
a thread.  Uploads never show a partial file: bytes go to an unnamed file in
the target directory (``O_TMPFILE``; where the filesystem has none, a hidden
temporary file named and made like the upload engine's, which the start-up
sweep removes after a crash) that is linked into place on close and dropped if
the session dies first.  Uploads obey the upload engine's rules:
``--max-upload`` and the free space on the disk.  A session holds at most
``--sftp-max-handles`` open files and directories.

OpenSSH's extensions ``posix-rename@openssh.com``, ``statvfs@openssh.com``,
``fstatvfs@openssh.com``, ``fsync@openssh.com`` and ``limits@openssh.com`` are
served; ``hardlink@openssh.com`` is refused (and not advertised).

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
import struct
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.conch.interfaces import ISFTPServer
from twisted.conch.ls import lsLine
from twisted.conch.ssh import filetransfer
from twisted.conch.ssh.common import getNS
from twisted.conch.ssh.filetransfer import (
    FX_BAD_MESSAGE,
    FX_FAILURE,
    FX_FILE_ALREADY_EXISTS,
    FX_NO_SUCH_FILE,
    FX_OP_UNSUPPORTED,
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
from cmdserver.doors.ssh.sftp_files import (
    MAX_DIR_MODE,
    MAX_PACKET,
    MAX_READ,
    MAX_WRITE,
    DirectoryListing,
    ReadFile,
    UploadFile,
    capped_mode,
    os_error,
    stat_attrs,
    unsupported,
)
from cmdserver.doors.ssh.sftp_paths import ClientView, Place, path_in_text
from cmdserver.errors import CommandError, PathOutsideRoots, Refused, RootProtected
from cmdserver.jail import Entry
from cmdserver.text import escaped
from cmdserver.text import shown as displayed

if TYPE_CHECKING:
    from cmdserver.doors.ssh.avatar import SSHAvatar

log = Logger()

DOOR = "sftp"
V3_LAST_STATUS = filetransfer.FX_OP_UNSUPPORTED  # 8: the last status code SFTP v3 defines

# OpenSSH's extensions this server speaks, with their versions (OpenSSH's PROTOCOL).
# hardlink@openssh.com is not among them: a client that asks anyway is refused.
EXTENSIONS = {
    b"posix-rename@openssh.com": b"1",
    b"statvfs@openssh.com": b"2",
    b"fstatvfs@openssh.com": b"2",
    b"fsync@openssh.com": b"1",
    b"limits@openssh.com": b"1",
}
STATVFS_ST_RDONLY = 0x1  # the f_flag bits of the statvfs reply
STATVFS_ST_NOSUID = 0x2
VIRTUAL_ROOT_READ_ONLY = "/ only lists the roots and cannot be changed"
NO_HARD_LINKS = "hard links are not allowed in the jail"


@implementer(ISFTPServer)
class JailedSFTPServer:
    """File operations for one SFTP session, confined to the avatar's roots."""

    def __init__(self, avatar: SSHAvatar) -> None:
        self.avatar = avatar
        self.policy = avatar.policy
        self.jail = avatar.policy.jail
        self.view = ClientView(self.jail.roots)
        self.core = avatar.core
        settings = avatar.settings
        self.run_id = settings.temp_run_id
        self.max_upload = settings.max_upload
        self.max_handles = settings.sftp_max_handles
        self.handles = 0  # open files and directories, and opens under way
        self.ctx = Context(self.core, user=avatar.account.name, peer=avatar.peer, door=DOOR,
                           policy=self.policy, session_id=avatar.session_id)

    # -- helpers -------------------------------------------------------------

    def place(self, raw: bytes) -> Place:
        """Where a path the client sent leads (no disk access, never raises)."""
        return self.view.place(os.fsdecode(raw))

    def _run(self, action: str, f: Callable[[], Any], *places: Place) -> Deferred:
        """Run ``f`` in a thread; jail refusals become (audited) SFTP errors whose
        messages name the client's paths, never the server's."""
        def call() -> Any:
            try:
                for place in places:
                    if "\0" in place.shown:
                        raise CommandError("invalid path: NUL byte")
                return f()
            except Refused as e:
                raise SFTPError(FX_PERMISSION_DENIED, self._message(e.message, places)) from None
            except CommandError as e:
                raise SFTPError(FX_FAILURE, self._message(e.message, places)) from None
            except OSError as e:
                raise os_error(e, places[0].shown if places else "") from None

        d = self.core.in_thread(call, ctx=self.ctx)
        d.addErrback(self._refused, action, places, self.core.reactor.seconds())
        return d

    def _message(self, text: str, places: tuple[Place, ...]) -> str:
        """A message of the jail's (a :class:`CommandError`'s, so escaped) with the
        paths it was given written as the client wrote them, and any other server
        path in the client's view."""
        marks = []
        for n, place in enumerate(sorted(places, key=lambda p: -len(p.jail))):
            if place.jail:
                mark = f"\0{n}\0"
                text = path_in_text(place.jail).sub(mark, text)
                marks.append((mark, place.shown))
        text = self.view.scrub(text)
        for mark, shown in marks:
            text = text.replace(mark, shown)
        return text

    def _refused(self, failure: Any, action: str, places: tuple[Place, ...],
                 started: float) -> Any:
        if failure.check(SFTPError) and failure.value.code == FX_PERMISSION_DENIED:
            self._audit(action, places, "refused", failure.value.message, started)
        return failure

    def _audit(self, action: str, places: Any, outcome: str, error: str | None = None,
               started: float | None = None, result: Any = None) -> None:
        """Report an operation on ``places`` to the core's audit trail; ``result``
        says what it moved."""
        shown = [self._shown(p) for p in places]
        named = dict(zip(("path", "to"), shown, strict=False))
        duration = 0.0 if started is None else self.core.reactor.seconds() - started
        self.core.audit_operation(self.ctx, action, named, outcome, duration, error, result)

    def _shown(self, place: Place) -> str:
        """A path as the audit log shows it: inside the jail relative to it (as the
        other doors' records do), never the server's absolute path; in the virtual
        ``/`` of several roots, as the client sees it."""
        if place.root is None:
            return place.virtual
        return self.policy.jail_path(place.jail) or place.virtual

    def _entry(self, place: Place) -> Entry:
        """The directory entry ``place`` names, held by its directory's descriptor.

        Used to create, remove or rename an entry: a symlink is acted on itself,
        and only its parent directory must resolve inside the jail.  Names of
        upload temporary files are refused: another session's upload in progress
        is not a file yet, and a new one by that name would be swept.  Nothing in
        the virtual ``/`` of several roots can be made or changed.
        """
        if place.in_virtual_root:
            raise SFTPError(FX_PERMISSION_DENIED, VIRTUAL_ROOT_READ_ONLY)
        return self.jail.entry(place.jail)

    @staticmethod
    def _missing(place: Place) -> SFTPError:
        return SFTPError(FX_NO_SUCH_FILE, f"no such file or directory: {place.shown}")

    def _virtual_root_attrs(self) -> dict[str, int]:
        """The virtual ``/`` of several roots: a directory nobody may write to, as
        recent as its newest root."""
        mtime = 0
        for root in self.jail.roots:
            try:
                mtime = max(mtime, int(self.jail.stat(root).st_mtime))
            except (OSError, CommandError):
                continue
        return {"size": 0, "uid": os.getuid(), "gid": os.getgid(),
                "permissions": stat.S_IFDIR | 0o555, "atime": mtime, "mtime": mtime}

    # -- open handles ---------------------------------------------------------

    def _claim_handle(self) -> None:
        """Count one more open file or directory; refuse past the session's cap."""
        if self.handles >= self.max_handles:
            raise SFTPError(FX_FAILURE, f"too many open files and directories (the limit "
                                        f"is {self.max_handles} per session)")
        self.handles += 1

    def release_handle(self) -> None:
        """An open file or directory was closed (each calls this once)."""
        self.handles -= 1

    def _open_handle(self, action: str, f: Callable[[], Any], place: Place) -> Deferred:
        try:
            self._claim_handle()
        except SFTPError:
            return self._audited(action, defer.fail(), place)

        def failed(failure: Failure) -> Failure:
            self.release_handle()
            return failure

        return self._audited(action, self._run(action, f, place).addErrback(failed), place)

    # -- ISFTPServer ---------------------------------------------------------

    def gotVersion(self, otherVersion: int, extData: dict) -> dict:
        return dict(EXTENSIONS)

    def realPath(self, path: bytes) -> Deferred:
        place = self.place(path)

        def resolve() -> bytes:
            if place.in_virtual_root:
                if "/" in place.rel:  # below a name that is no root
                    raise self._missing(place)
                return os.fsencode(place.virtual)  # /, or a name that is not there
            shown = self.view.client_path(self.jail.real_path(place.jail), place.root)
            if shown is None:  # the jail resolves inside the roots only
                raise PathOutsideRoots()
            return os.fsencode(shown)

        return self._run("realpath", resolve, place)

    def getAttrs(self, path: bytes, followLinks: bool) -> Deferred:
        place = self.place(path)

        def stat_path() -> dict:
            if place.in_virtual_root:
                if place.rel:
                    raise self._missing(place)
                return self._virtual_root_attrs()
            if followLinks:
                return stat_attrs(self.jail.stat(place.jail))
            return stat_attrs(self._link_sized(place, self.jail.lstat(place.jail)))

        return self._run("stat", stat_path, place)

    def setAttrs(self, path: bytes, attrs: dict) -> Deferred:
        place = self.place(path)

        def apply() -> None:
            if place.in_virtual_root:
                if place.rel:
                    raise self._missing(place)
                raise SFTPError(FX_PERMISSION_DENIED, VIRTUAL_ROOT_READ_ONLY)
            with self.jail.node(place.jail) as node:
                _apply_attrs(node, attrs)

        return self._run("setstat", apply, place)

    def openDirectory(self, path: bytes) -> Deferred:
        place = self.place(path)

        def listing() -> DirectoryListing:
            if place.in_virtual_root:
                if place.rel:
                    raise self._missing(place)
                found = self._roots_listing()
            else:
                targets: dict[str, str] = {}  # read through the scan's own descriptor
                found = [(name, self._link_sized(self.view.place(f"{place.virtual}/{name}"), st,
                                                 targets.get(name)))
                         for name, st in self.jail.scan_dir(place.jail, targets)]
            # The long name is for display: a name's control characters are shown
            # as U+FFFD there (the short name stays the file's own bytes).
            entries = [(os.fsencode(name), displayed(lsLine(name, st)).encode("utf-8"),
                        stat_attrs(st)) for name, st in found]
            return DirectoryListing(entries, self)

        return self._open_handle("ls", listing, place)

    def _link_sized(self, place: Place, st: os.stat_result,
                    target: str | None = None) -> os.stat_result:
        """``st``, but for a symlink the size of its target as the client sees it
        (0 if it is not shown): a symlink's size is its target's length, and the
        length of a server path is not told either.  ``target`` is the link's,
        if the caller read it already."""
        if not stat.S_ISLNK(st.st_mode):
            return st
        try:
            if target is None:
                target = self._read_link(place)
            shown = self.view.link_target(target, place)
        except (OSError, CommandError, SFTPError):
            shown = None
        size = len(os.fsencode(shown)) if shown is not None else 0
        fields = tuple(st)
        return os.stat_result((*fields[:6], size, *fields[7:]))

    def _read_link(self, place: Place) -> str:
        """The target of the symlink ``place`` names, as it is on disk."""
        with self._entry(place) as entry:
            return os.readlink(entry.name, dir_fd=entry.dir_fd)

    def _roots_listing(self) -> list[tuple[str, os.stat_result]]:
        """The virtual ``/`` of several roots: each root by its name (a root that
        is gone is left out)."""
        found = []
        for name, root in zip(self.view.names, self.jail.roots, strict=True):
            try:
                found.append((name, self.jail.stat(root)))
            except (OSError, CommandError):
                continue
        return found

    def openFile(self, filename: bytes, flags: int, attrs: dict) -> Deferred:
        place = self.place(filename)
        if flags & (FXF_WRITE | FXF_APPEND | FXF_CREAT | FXF_TRUNC):
            if flags & FXF_READ:
                return defer.fail(unsupported("reading and writing one open file"))
            return self._open_handle(
                "put", lambda: self._open_upload(place, flags), place)
        return self._open_handle("get", lambda: self._open_read(place), place)

    def _open_read(self, place: Place) -> ReadFile:
        if place.in_virtual_root:
            if place.rel:
                raise self._missing(place)
            raise SFTPError(FX_FAILURE, f"is a directory: {place.shown}")
        return ReadFile(self, self.jail.open_file(place.jail), place)

    def _open_upload(self, place: Place, flags: int) -> UploadFile:
        shown = place.shown
        with self._entry(place) as entry:
            st = entry.lstat()
            if st is not None and flags & FXF_EXCL:
                raise SFTPError(FX_FILE_ALREADY_EXISTS, f"file exists: {shown}")
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise SFTPError(FX_FAILURE, f"is a directory: {shown}")
            if st is None and not flags & FXF_CREAT:
                raise SFTPError(FX_NO_SUCH_FILE, f"no such file: {shown}")
            replaced = None
            if st is not None and not flags & FXF_TRUNC:
                # Written into without truncating (OpenSSH's scp does) or appended
                # to (its sftp's reput): the upload starts as the file's content
                # and still replaces it whole on close.
                replaced = self._open_replaced(entry)
            try:
                temp = entry.create_temp(self.run_id)
            except BaseException:
                if replaced is not None:
                    os.close(replaced)
                raise
        # The mode the client asks for (OpenSSH's sftp sends the local file's) is
        # ignored: an uploaded file is 0600, as with the upload command.
        return UploadFile(self, temp, exclusive=bool(flags & FXF_EXCL), place=place,
                          base=replaced, append=bool(flags & FXF_APPEND))

    @staticmethod
    def _open_replaced(entry: Entry) -> int:
        """The file an upload writes into, for reading; never through a symlink."""
        try:
            return entry.open_existing()
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise unsupported("writing into a symlink") from None
            raise

    def removeFile(self, filename: bytes) -> Deferred:
        place = self.place(filename)

        def remove() -> None:
            with self._entry(place) as entry:
                entry.unlink()

        return self._audited("rm", self._run("rm", remove, place), place)

    def renameFile(self, oldpath: bytes, newpath: bytes) -> Deferred:
        return self._rename(self.place(oldpath), self.place(newpath), replace=False)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> Deferred:
        """``posix-rename@openssh.com``: a rename that replaces an existing name, as
        rename(2) does; the same checks and the same audit record as a rename."""
        return self._rename(self.place(oldpath), self.place(newpath), replace=True)

    def _rename(self, old: Place, new: Place, replace: bool) -> Deferred:
        def rename() -> None:
            with self._entry(old) as source, self._entry(new) as target:
                try:
                    # SFTP v3: renaming onto an existing name fails; POSIX replaces it.
                    source.rename_to(target, replace=replace)
                except FileExistsError:
                    raise SFTPError(FX_FILE_ALREADY_EXISTS,
                                    f"file exists: {new.shown}") from None

        d = self._run("rename", rename, old, new)
        return self._audited("rename", d, old, new)

    def makeDirectory(self, path: bytes, attrs: dict) -> Deferred:
        place = self.place(path)

        def mkdir() -> None:
            with self._entry(place) as entry:
                entry.mkdir(attrs.get("permissions", MAX_DIR_MODE) & MAX_DIR_MODE)

        return self._audited("mkdir", self._run("mkdir", mkdir, place), place)

    def removeDirectory(self, path: bytes) -> Deferred:
        place = self.place(path)

        def rmdir() -> None:
            with self._entry(place) as entry:
                entry.rmdir()

        return self._audited("rmdir", self._run("rmdir", rmdir, place), place)

    def readLink(self, path: bytes) -> Deferred:
        """A symlink's target, as the client may see it: an absolute target in a
        root in the client's view, a relative one as it is if it stays in its
        root; a target outside the jail is not shown (*Permission denied*)."""
        place = self.place(path)

        def read() -> bytes:
            not_a_link = SFTPError(FX_FAILURE, f"not a symlink: {place.shown}")
            if place.in_virtual_root and place.rel:
                raise self._missing(place)
            try:
                target = self._read_link(place)
            except (RootProtected, SFTPError):  # a root, or the virtual /
                raise not_a_link from None
            except OSError as e:
                if e.errno == errno.EINVAL:
                    raise not_a_link from None
                raise
            shown = self.view.link_target(target, place)
            if shown is None:
                raise SFTPError(FX_PERMISSION_DENIED,
                                f"the symlink leads outside the jail: {place.shown}")
            return os.fsencode(shown)

        return self._run("readlink", read, place)

    def makeLink(self, linkPath: bytes, targetPath: bytes) -> Deferred:
        return defer.fail(unsupported("symlink"))

    def statvfs(self, path: bytes) -> Deferred:
        """``statvfs@openssh.com``: the filesystem ``path`` lies on, through the
        descriptor the jail resolves it to."""
        place = self.place(path)

        def look() -> bytes:
            if place.in_virtual_root:
                if place.rel:
                    raise self._missing(place)
                raise SFTPError(FX_FAILURE, "/ is on no filesystem: it lists the roots; "
                                            "ask about a path inside one of them")
            with self.jail.node(place.jail) as node:
                return statvfs_reply(os.fstatvfs(node.fd))

        return self._run("statvfs", look, place)

    def limits(self) -> bytes:
        """``limits@openssh.com``: the longest packet this server reads, the longest
        read it answers and write it takes, and the session's cap on handles."""
        return struct.pack("!4Q", MAX_PACKET, MAX_READ, MAX_WRITE, self.max_handles)

    def extendedRequest(self, extendedName: bytes, extendedData: bytes) -> Deferred:
        if extendedName == b"hardlink@openssh.com":
            return defer.fail(SFTPError(FX_OP_UNSUPPORTED, NO_HARD_LINKS))
        return defer.fail(unsupported(f"extension {_text(extendedName)}"))

    def _audited(self, action: str, d: Deferred, *places: Place) -> Deferred:
        """Audit a download or a change to the jail once it is done (or failed); a
        file opened for ``get`` or ``put`` is audited when it is closed."""
        started = self.core.reactor.seconds()

        def done(result: Any) -> Any:
            if isinstance(result, (ReadFile, UploadFile)):
                return result  # audited when closed
            if not (hasattr(result, "check") and result.check(SFTPError)
                    and result.value.code == FX_PERMISSION_DENIED):  # already audited
                error = result.getErrorMessage() if hasattr(result, "check") else None
                self._audit(action, places, "error" if error else "ok", error, started)
            return result

        return d.addBoth(done)


def status_message(message: bytes | str) -> bytes:
    """A status message as SFTP version 3 sends it: UTF-8 (ISO-10646).

    It may name a path the client sent, which ``os.fsdecode`` made of any bytes:
    a byte that is not UTF-8 is written ``\\xNN``, and an unprintable character
    (one that could drive a terminal or reorder the line) as its escape
    (:func:`cmdserver.text.escaped`), since a client may print the message."""
    if isinstance(message, bytes):
        raw = message
    else:
        try:
            raw = os.fsencode(message)  # a name's own bytes
        except UnicodeEncodeError:  # a lone surrogate that no name decodes to (escaped)
            return escaped(message).encode("utf-8")
    return escaped(raw.decode("utf-8", "backslashreplace")).encode("utf-8")


def statvfs_reply(st: os.statvfs_result) -> bytes:
    """The reply to ``statvfs@openssh.com`` and ``fstatvfs@openssh.com`` (OpenSSH's
    PROTOCOL, 4.4): eleven uint64."""
    flag = ((STATVFS_ST_RDONLY if st.f_flag & os.ST_RDONLY else 0)
            | (STATVFS_ST_NOSUID if st.f_flag & os.ST_NOSUID else 0))
    return struct.pack("!11Q", st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, st.f_bavail,
                       st.f_files, st.f_ffree, st.f_favail, st.f_fsid & (2**64 - 1), flag,
                       st.f_namemax)


class _RequestKinds(dict):
    """The packet kinds a server is asked (conch's names for them); any other kind
    (a reply's, or one no version defines) is ``UNSUPPORTED``.  Conch drops an
    unknown kind unanswered and fails on a reply's kind, where OpenSSH's
    sftp-server answers both with OP_UNSUPPORTED."""

    def get(self, kind: int, default: Any = None) -> str:
        return super().get(kind, "UNSUPPORTED")


class JailedFileTransferServer(filetransfer.FileTransferServer):
    """Conch's SFTP protocol, except that a lost session aborts open uploads, that
    it knows which requests are not answered yet, that it serves OpenSSH's
    extensions, that it answers a packet of a kind it does not serve with
    OP_UNSUPPORTED, and that a packet longer than :data:`MAX_PACKET` ends the session.

    The session ends at the client's EOF, but only once every request received
    before it is answered (:meth:`requests_answered`): a client may send its
    last reads, writes or closes and its EOF without waiting for the replies.
    """

    packetTypes = _RequestKinds(
        (kind, name) for kind, name in filetransfer.FileTransferBase.packetTypes.items()
        if hasattr(filetransfer.FileTransferServer, f"packet_{name}"))

    def __init__(self, server: JailedSFTPServer) -> None:
        super().__init__(avatar=server)
        self.server = server
        self._unanswered: Counter[bytes] = Counter()  # request id -> requests
        self._waiting: list[Deferred] = []
        self._dispatching = False
        self._severed = False

    def dataReceived(self, data: bytes) -> None:
        if self._severed:
            return
        super().dataReceived(data)
        if len(self.buf) >= 4:
            (length,) = struct.unpack("!L", self.buf[:4])
            if length > MAX_PACKET:
                # OpenSSH's sftp-server does the same: limits@openssh.com says so.
                self._severed = True
                self.buf = b""
                log.info("sftp: {user}@{peer} sent a packet of {length} bytes (the limit "
                         "is {limit}): session closed", user=self.server.ctx.user,
                         peer=self.server.ctx.peer, length=length, limit=MAX_PACKET)
                if self.transport is not None:
                    self.transport.loseConnection()

    def _ebStatus(self, reason: Failure, requestId: bytes,
                  msg: bytes = b"request failed") -> None:
        # conch encodes an SFTPError's message as ASCII: one that names a path with
        # other characters would raise there, and the request would never be answered.
        error = reason.value
        if isinstance(error, SFTPError):
            self._sendStatus(requestId, error.code, error.message)
        else:
            super()._ebStatus(reason, requestId, msg)

    def _sendStatus(self, requestId: bytes, code: int, message: bytes | str,
                    lang: bytes = b"") -> None:
        # The session speaks SFTP version 3 (conch's), which defines status codes
        # 0 to 8: a later version's code (FILE_ALREADY_EXISTS, 11) reads as
        # "Unknown status" in a v3 client such as OpenSSH's; its message says it all.
        if code > V3_LAST_STATUS:
            code = FX_FAILURE
        super()._sendStatus(requestId, code, status_message(message), lang)

    def packet_UNSUPPORTED(self, data: bytes) -> None:
        """A packet of a kind this server does not serve: answered, in turn."""
        def refuse(self: JailedFileTransferServer, data: bytes) -> None:
            self._sendStatus(data[:4], FX_OP_UNSUPPORTED, b"operation unsupported")

        self._dispatch(refuse, data)

    # -- OpenSSH's extensions ---------------------------------------------------

    def packet_EXTENDED(self, data: bytes) -> None:
        """An extension request.  conch answers whatever the server returns as an
        EXTENDED_REPLY; the extensions that answer a STATUS are handled here."""
        request_id = data[:4]
        name, payload = getNS(data[4:])
        if name == b"posix-rename@openssh.com":
            old, rest = getNS(payload)
            new, _ = getNS(rest)
            self._status(self.server.posix_rename(old, new), request_id, name)
        elif name == b"fsync@openssh.com":
            handle, _ = getNS(payload)
            self._status(self._on_file(handle, "fsync"), request_id, name)
        elif name == b"statvfs@openssh.com":
            path, _ = getNS(payload)
            self._reply(self.server.statvfs(path), request_id, name)
        elif name == b"fstatvfs@openssh.com":
            handle, _ = getNS(payload)
            self._reply(self._on_file(handle, "statvfs"), request_id, name)
        elif name == b"limits@openssh.com":
            self._reply(defer.succeed(self.server.limits()), request_id, name)
        else:  # hardlink@openssh.com and the unknown: refused
            super().packet_EXTENDED(data)

    def _on_file(self, handle: bytes, operation: str) -> Deferred:
        """Run ``fsync`` or ``statvfs`` on an open file, in turn after the requests
        on it before this one."""
        open_file = self.openFiles.get(handle)
        if not isinstance(open_file, (ReadFile, UploadFile)):
            if handle in self.openDirs:
                return defer.fail(SFTPError(FX_FAILURE, f"{operation} needs an open file, "
                                                        f"not a directory listing"))
            return defer.fail(SFTPError(FX_FAILURE, "invalid handle"))
        if operation == "fsync":
            return open_file.fsync()
        return open_file.statvfs().addCallback(statvfs_reply)

    def _status(self, d: Deferred, request_id: bytes, name: bytes) -> None:
        d.addCallback(self._cbStatus, request_id)
        d.addErrback(self._ebStatus, request_id, b"extended " + name + b" failed")

    def _reply(self, d: Deferred, request_id: bytes, name: bytes) -> None:
        d.addCallback(self._cbExtended, request_id)
        d.addErrback(self._ebStatus, request_id, b"extended " + name + b" failed")

    # -- answering every request ------------------------------------------------

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
    handler = (JailedFileTransferServer.__dict__.get(name)
               or getattr(filetransfer.FileTransferServer, name))

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


def _apply_attrs(node: Any, attrs: dict) -> None:
    """SETSTAT on a resolved file or directory (a :class:`cmdserver.jail.Node`)."""
    if "uid" in attrs:
        raise unsupported("changing owner")
    st = node.stat()
    # A file changes only by a whole upload; a size it already has changes nothing.
    if "size" in attrs and attrs["size"] != st.st_size:
        raise unsupported("changing the size of a file (upload it again)")
    if "permissions" in attrs:  # narrowed, never widened; never a root's
        node.chmod(capped_mode(st.st_mode, attrs["permissions"]))
    if "atime" in attrs:
        node.utime((attrs["atime"], attrs["mtime"]))


def _text(value: Any) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)
