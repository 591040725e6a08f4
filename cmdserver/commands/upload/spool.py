"""The file side of an upload: checks, the hidden temporary file, verification, publishing.

Everything here touches the disk and runs in worker threads, never on the reactor.
The target directory is opened once, through the jail (:meth:`Jail.entry
<cmdserver.jail.Jail.entry>`), and every later step (temporary file, free space,
link or rename) goes through that directory descriptor, so the file lands in the
directory that was checked even if a path component is swapped meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.logger import Logger

from cmdserver.commands.upload.mac import HMAC_SHA256, new_mac
from cmdserver.commands.upload.stream import Countdown, HashThread
from cmdserver.errors import CommandError, Conflict, RootProtected
from cmdserver.jail import (  # noqa: F401 - the temporary files' names live with the jail
    NAME_IN_TEMP,
    TEMP_MARK,
    TEMP_RE,
    open_temp,
    temp_name,
)
from cmdserver.policy import Policy

log = Logger()

IOV_MAX = 512  # buffers per writev call (the kernel's limit is 1024)
FLUSH_STEP = 32 << 20  # bytes written between two writeback kicks
PARALLEL_MIN = 8 << 20  # uploads this large hash in helper threads, beside the writes
DIRECT_MIN = 8 << 20  # uploads this large bypass the page cache (O_DIRECT) where they can
DIRECT_ALIGN = 4096  # offsets, lengths and addresses of direct writes are multiples of it
O_DIRECT = getattr(os, "O_DIRECT", 0)

Chunk = bytes | memoryview
Writer = Callable[[int, Sequence[Chunk]], int]


class HmacMismatchError(CommandError):
    def __init__(self, algorithm: str = HMAC_SHA256) -> None:
        super().__init__("HMAC mismatch, upload discarded" if algorithm == HMAC_SHA256
                         else f"MAC mismatch ({algorithm}), upload discarded")


@dataclass(frozen=True)
class UploadResult:
    """What an upload with its MAC in the command reports: the name as given, its
    size, its SHA-256 (that form always computes it: its answer promises it)."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TrailerUploadResult:
    """What an upload whose MAC followed the content reports: the name as given,
    its size, the MAC that matched (``ALG:HEX``), and the SHA-256 only if the
    client asked for it (else None: no second pass over the bytes)."""

    name: str
    size: int
    mac: str
    sha256: str | None


def new_run_id() -> str:
    """A token for this daemon run; temporary files carrying another one are stale."""
    return secrets.token_hex(4)


def write_all(fd: int, chunks: Sequence[Chunk], writer: Writer = os.writev) -> None:
    """Write every byte of ``chunks``, in as few system calls as the kernel allows."""
    pending = list(chunks)
    while pending:
        group = pending[:IOV_MAX]
        n = writer(fd, group)
        wanted = sum(map(len, group))
        if n == wanted:
            del pending[:IOV_MAX]
            continue
        # A short write: drop what was written, keep the rest of the first buffer.
        while n >= len(pending[0]):
            n -= len(pending.pop(0))
        pending[0] = memoryview(pending[0])[n:]


class Spool:
    """A hidden temporary file in the target directory, hashed as it is written.

    Owned by one worker thread from :func:`open_spool` to :meth:`publish` or
    :meth:`discard`; it is never visible under the target name until the MAC
    matched and the bytes are on disk.  Each byte is hashed once per digest:
    the MAC (``algorithm``), and the SHA-256 only with ``sha256``.
    """

    def __init__(self, name: str, size: int, dir_fd: int, base: str, tmp: str, fd: int,
                 key: bytes, overwrite: bool, writer: Writer, algorithm: str = HMAC_SHA256,
                 sha256: bool = True) -> None:
        self.name = name
        self.size = size
        self.base = base
        self.overwrite = overwrite
        self._dir_fd: int | None = dir_fd
        self._tmp: str | None = tmp
        self._fd: int | None = fd
        self._writer = writer
        self.algorithm = algorithm
        self._mac = new_mac(algorithm, key)
        self._sha = hashlib.sha256() if sha256 else None
        self._digests = [d for d in (self._mac, self._sha) if d is not None]
        self._helpers: list[HashThread] = []
        self._written = self._flushed = self._dropped = 0
        self._direct = False
        if size >= PARALLEL_MIN:
            label = "upload-hmac" if algorithm == HMAC_SHA256 else f"upload-{algorithm}"
            self._helpers = [HashThread(self._mac, label)]
            if self._sha is not None:
                self._helpers.append(HashThread(self._sha, "upload-sha256"))
        if size >= DIRECT_MIN and O_DIRECT:
            self._set_direct(True)

    @property
    def temp_path(self) -> str | None:
        """Where the bytes are spooled (for logs and tests); None once gone."""
        return self._tmp

    def write(self, data: memoryview, then: Callable[[], None]) -> None:
        """Hash and write the next bytes; ``then()`` once the hashes and the disk have them.

        ``data`` starts on a page boundary (a :class:`Block`), so every whole block
        of a large upload goes to the disk directly: no copy into the page cache,
        no dirty-page bookkeeping or writeback by the kernel, little left for fsync.
        The hash threads may still be busy with it when this returns: ``data``
        must stay as it is until ``then`` is called.  An ``OSError`` such as
        ENOSPC propagates.
        """
        assert self._fd is not None
        helpers = self._helpers
        if helpers:
            then = Countdown(len(helpers) + 1, then)
            for helper in helpers:
                helper.start(data, then)
        else:
            for digest in self._digests:
                digest.update(data)
        try:
            self._write_block(data)
        finally:
            then()
        self._written += len(data)
        if not self._direct and self._written - self._flushed >= FLUSH_STEP:
            self._start_writeback()

    def _write_block(self, data: memoryview) -> None:
        fd = self._fd
        assert fd is not None  # called from write(), which checked it
        if self._direct and len(data) % DIRECT_ALIGN:
            self._set_direct(False)  # the last, short block goes through the page cache
        done, size = 0, len(data)
        while done < size:
            if not self._direct:
                write_all(fd, (data[done:],), self._writer)
                return
            try:
                n = self._writer(fd, (data[done:],))
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._set_direct(False)  # not for this file after all: write it buffered
                continue
            done += n
            if n % DIRECT_ALIGN:  # a short write left the offset unaligned
                self._set_direct(False)

    def _set_direct(self, on: bool) -> None:
        """Turn ``O_DIRECT`` on or off for the file (stays off if the filesystem refuses)."""
        assert self._fd is not None
        self._direct = False
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL,
                        flags | O_DIRECT if on else flags & ~O_DIRECT)
        except OSError:
            return
        self._direct = on

    def _start_writeback(self) -> None:
        """Start writing the last window to disk now, and drop the window before it.

        ``POSIX_FADV_DONTNEED`` starts asynchronous writeback of dirty pages and
        evicts clean ones: the final fsync has little left to do, and a large
        upload does not fill the page cache.
        """
        assert self._fd is not None  # called from write(), which checked it
        start = self._dropped
        try:
            os.posix_fadvise(self._fd, start, self._written - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            return
        self._dropped, self._flushed = self._flushed, self._written

    def publish(self, expected_mac: bytes) -> tuple[str, str | None]:
        """Check the MAC in constant time, fsync, and move the file into place.

        Returns the hex MAC and the hex SHA-256 (None if it was not computed).
        Raises :class:`HmacMismatchError` or another ``CommandError``; the caller then
        calls :meth:`discard`.
        """
        assert self._fd is not None and self._dir_fd is not None and self._tmp is not None
        for helper in self._helpers:
            helper.drain()
        mac = self._mac.digest()
        if not hmac.compare_digest(mac, expected_mac):
            raise HmacMismatchError(self.algorithm)
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise write_error(e) from None
        os.close(self._fd)
        self._fd = None
        self._move_into_place()
        self._tmp = None
        try:
            os.fsync(self._dir_fd)  # make the new name durable too
        except OSError:
            pass  # some filesystems cannot fsync a directory; the data is safe anyway
        return mac.hex(), None if self._sha is None else self._sha.hexdigest()

    def _move_into_place(self) -> None:
        dfd, tmp, base = self._dir_fd, self._tmp, self.base
        assert dfd is not None and tmp is not None  # called from publish(), which checked
        try:
            if self.overwrite:
                os.rename(tmp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
                return
            try:
                # link() never replaces: of two uploads to one name, exactly one wins.
                os.link(tmp, base, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                # No hard links here (vfat, some FUSE): check, then rename.
                if _exists(base, dfd):
                    raise FileExistsError(errno.EEXIST, "File exists") from None
                os.rename(tmp, base, src_dir_fd=dfd, dst_dir_fd=dfd)
                return
            os.unlink(tmp, dir_fd=dfd)
        except FileExistsError:
            raise Conflict(f"target exists: {self.name}, upload discarded") from None
        except IsADirectoryError:
            raise CommandError(f"is a directory: {self.name}, upload discarded") from None
        except OSError as e:
            raise CommandError(
                f"cannot save {self.name} ({(e.strerror or str(e)).lower()}), "
                "upload discarded") from None

    def discard(self) -> None:
        """Remove the temporary file (if it is still there) and release everything."""
        tmp, self._tmp = self._tmp, None
        if tmp is not None and self._dir_fd is not None:
            try:
                os.unlink(tmp, dir_fd=self._dir_fd)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.error("cannot remove upload temporary file {tmp}: {error}",
                          tmp=tmp, error=e)
        self.close()

    def close(self) -> None:
        """Release the descriptors and the helper thread (idempotent)."""
        helpers, self._helpers = self._helpers, []
        for helper in helpers:
            helper.stop()
        for attr in ("_fd", "_dir_fd"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                os.close(fd)


def write_error(e: OSError) -> CommandError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CommandError("disk full, upload discarded")
    return CommandError(f"write failed ({(e.strerror or str(e)).lower()}), upload discarded")


def _exists(base: str, dir_fd: int) -> bool:
    try:
        os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def open_spool(policy: Policy, name: str, size: int, key: bytes, overwrite: bool,
               run_id: str, writer: Writer = os.writev, algorithm: str = HMAC_SHA256,
               sha256: bool = True) -> Spool:
    """Check that ``name`` may receive ``size`` bytes, then create its temporary file.

    Runs in a thread.  Every refusal raises ``CommandError`` before anything is
    created: outside the jail, no such directory, target exists (without
    ``overwrite``) or is a directory, not enough free space.
    """
    if name.endswith("/") or name.endswith("/.") or name.endswith("/.."):
        raise CommandError(f"not a file name: {name}")
    try:
        entry = policy.jail.entry(name)
    except RootProtected:
        raise CommandError(f"is a directory: {name}") from None
    except (FileNotFoundError, NotADirectoryError):
        raise CommandError(f"no such directory: {os.path.dirname(name) or '.'}") from None
    except OSError as e:
        raise CommandError(f"cannot open the directory of {name}: "
                           f"{(e.strerror or str(e)).lower()}") from None
    with entry:
        base = entry.name
        try:
            dir_fd = entry.directory()
        except OSError as e:
            raise CommandError(f"cannot open the directory of {name}: "
                               f"{(e.strerror or str(e)).lower()}") from None
    try:
        return _create(name, size, dir_fd, base, key, overwrite, run_id, writer, algorithm,
                       sha256)
    except BaseException:
        os.close(dir_fd)
        raise


def _create(name: str, size: int, dir_fd: int, base: str, key: bytes, overwrite: bool,
            run_id: str, writer: Writer, algorithm: str, sha256: bool) -> Spool:
    if TEMP_RE.match(base):
        raise CommandError(f"reserved name (upload temporary files look like it): {name}")
    try:
        name_max = os.fpathconf(dir_fd, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(base)) > name_max:
        raise CommandError(f"file name too long: {name}")
    try:
        st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode):
            raise CommandError(f"is a directory: {name}")
        if not overwrite:
            raise Conflict(f"target exists: {name}")
    fs = os.fstatvfs(dir_fd)
    free = fs.f_bavail * fs.f_frsize
    if size > free:
        raise CommandError(f"not enough disk space: {size} bytes needed, {free} available")
    try:
        tmp, fd = open_temp(base, run_id, dir_fd)
    except OSError as e:
        raise CommandError(f"cannot create a file next to {name}: "
                           f"{(e.strerror or str(e)).lower()}") from None
    return Spool(name, size, dir_fd, base, tmp, fd, key, overwrite, writer, algorithm, sha256)


def remove_stale(roots: Sequence[str], run_id: str) -> list[str]:
    """Delete temporary upload files left by an earlier run (a crash, kill -9).

    Walks the roots by directory descriptors (``os.fwalk``), without following
    symlinks, and removes relative to them: a directory renamed meanwhile cannot
    send the sweep outside the roots.  Only regular files whose name has the
    upload temporary form and another run's token are removed.
    """
    removed = []
    for root in roots:
        for dirpath, _dirs, files, dir_fd in os.fwalk(root):
            for filename in files:
                m = TEMP_RE.match(filename)
                if m is None or m.group(1) == run_id:
                    continue
                path = os.path.join(dirpath, filename)
                try:
                    if stat.S_ISREG(os.stat(filename, dir_fd=dir_fd,
                                            follow_symlinks=False).st_mode):
                        os.unlink(filename, dir_fd=dir_fd)
                        removed.append(path)
                except OSError as e:
                    log.error("cannot remove stale upload file {path}: {error}",
                              path=path, error=e)
    return removed
