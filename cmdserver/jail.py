"""The file jail: every file operation of every door and command goes through here.

A path is never checked and then opened by name: it is opened relative to a
descriptor of its root, so that what was checked is what is used, whatever a
concurrent rename does.  Two ways to get there:

- ``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS`` where the
  kernel has it (Linux 5.6; called through ``syscall(437)`` on x86_64 and
  aarch64): the kernel resolves the path and refuses anything that would leave
  the root, atomically.
- Else, and whenever the kernel refuses (``EXDEV``: the path leads out, or
  through an absolute symlink, which ``RESOLVE_BENEATH`` never follows), a walk
  one component at a time, each opened ``O_PATH | O_NOFOLLOW`` relative to the
  descriptor of the one before.  ``..`` goes back to the descriptor the walk
  came from and never above the root.  A symlink is read and resolved by the
  walk itself (at most 40 of them): a relative target from the directory it is
  in, an absolute one only if it names a path under a root (by the root's real
  path); anything else is refused.  So symlinks that stay inside the jail keep
  working and none leads out.

Every operation then works on that descriptor (``fstat``, reopening through
``/proc/self/fd``, ``fchmod``-like calls through it) or on a directory
descriptor and one name in it (``unlinkat``, ``renameat``, ``mkdirat``,
``linkat``, ``O_TMPFILE``).  Linux only: ``O_PATH`` and ``/proc/self/fd``.

Paths: relative ones start at the first root; an absolute one must lie under a
root; no path is the first root.  A refusal raises
:class:`~cmdserver.errors.PathOutsideRoots` or
:class:`~cmdserver.errors.RootProtected` (both ``Refused``); a failure of the
system call raises ``OSError`` for the caller to word.  Names of upload
temporary files (:data:`TEMP_RE`) are not part of the jail: they are left out of
listings and refused (:class:`ReservedName`) as paths.

Everything here touches the disk: call it from a thread, never the reactor.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import posixpath
import re
import secrets
import stat
from collections.abc import Sequence
from typing import Any

from cmdserver.errors import CommandError, PathOutsideRoots, RootProtected

# -- upload temporary files ---------------------------------------------------

TEMP_MARK = ".cmdserver-upload-"
# .NAME.cmdserver-upload-RUNID-RANDOM: RUNID tells this run's files from a dead run's.
TEMP_RE = re.compile(r"\A\..*\.cmdserver-upload-([0-9a-f]{8})-[0-9a-f]{8}\Z", re.DOTALL)
NAME_IN_TEMP = 100  # characters of the target name kept in the temporary name


def temp_name(name: str, run_id: str) -> str:
    """``.NAME.cmdserver-upload-RUNID-RANDOM``, with NAME cut to keep it a legal name."""
    short = os.fsencode(name)[:NAME_IN_TEMP].decode("utf-8", "ignore")
    return f".{short}{TEMP_MARK}{run_id}-{secrets.token_hex(4)}"


def is_reserved(name: str) -> bool:
    """True for a name of the upload temporary files' form."""
    return TEMP_RE.match(name) is not None


def open_temp(base: str, run_id: str, dir_fd: int) -> tuple[str, int]:
    """Create a hidden temporary file for ``base`` in the directory ``dir_fd``.

    Every door that spools a file before publishing it (upload, SFTP put) names
    it with :func:`temp_name` through here, so the one start-up sweep removes
    what a dead run left of either.  Returns the name and a descriptor open for
    writing (mode 0600, never an existing file or a symlink); raises ``OSError``.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(5):
        tmp = temp_name(base, run_id)
        try:
            return tmp, os.open(tmp, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "too many name clashes")


class ReservedName(CommandError):
    """A path names an upload temporary file: not a file of the jail yet."""

    def __init__(self, path: str) -> None:
        super().__init__(f"reserved name (upload temporary files look like it): {path}")


# -- the system calls ctypes gives us -------------------------------------------

RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_BENEATH = 0x08
_SYSCALLS = {  # machine -> (openat2, renameat2)
    "x86_64": (437, 316),
    "aarch64": (437, 276),
}
RENAME_NOREPLACE = 1
MAX_LINKS = 40  # symlinks followed in one resolution, as the kernel's MAXSYMLINKS
PROC_FD = "/proc/self/fd"
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


def _numbers() -> tuple[int, int] | None:
    return _SYSCALLS.get(platform.machine())


def openat2(dir_fd: int, path: str, flags: int, resolve: int) -> int:
    """``openat2(2)``; raises ``OSError`` (``ENOSYS`` where there is none)."""
    numbers = _numbers()
    if numbers is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    how = _OpenHow(flags, 0, resolve)
    fd = _syscall(ctypes.c_long(numbers[0]), ctypes.c_int(dir_fd),
                  ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                  ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(fd)


def have_openat2() -> bool:
    """True if the kernel (and any seccomp filter) lets us call ``openat2``."""
    try:
        root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.close(openat2(root, ".", os.O_PATH | os.O_CLOEXEC,
                         RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS))
    except OSError:
        return False
    finally:
        os.close(root)
    return True


def rename_noreplace(src: str, dst: str, dir_fd: int, dst_dir_fd: int) -> None:
    """Rename without replacing an existing ``dst`` (``FileExistsError`` then).

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and filesystem have it, else
    a check and a rename (both inside the jail: the worst a race does is replace
    a name that appeared in between).
    """
    numbers = _numbers()
    if numbers is not None:
        result = _syscall(ctypes.c_long(numbers[1]), ctypes.c_int(dir_fd),
                          ctypes.c_char_p(os.fsencode(src)), ctypes.c_int(dst_dir_fd),
                          ctypes.c_char_p(os.fsencode(dst)), ctypes.c_uint(RENAME_NOREPLACE))
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code))
    if _lstat_at(dst, dst_dir_fd) is not None:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
    os.rename(src, dst, src_dir_fd=dir_fd, dst_dir_fd=dst_dir_fd)


def _lstat_at(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _proc(fd: int) -> str:
    return f"{PROC_FD}/{fd}"


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


# -- the jail --------------------------------------------------------------------

class Jail:
    """The roots a user's file operations are confined to, and those operations.

    ``use_openat2`` and ``use_tmpfile`` say whether the kernel's ``openat2`` and
    unnamed temporary files (``O_TMPFILE``) are used where they work; tests turn
    them off to exercise the walk and named temporary files.
    """

    use_openat2: bool = have_openat2()
    use_tmpfile: bool = hasattr(os, "O_TMPFILE") and os.path.isdir(PROC_FD)

    def __init__(self, roots: Sequence[str], *, openat2: bool | None = None,
                 tmpfile: bool | None = None) -> None:
        if not roots:
            raise ValueError("at least one root is needed")
        self.roots = [os.path.realpath(r) for r in roots]
        self._root_parts = [[p for p in r.split("/") if p] for r in self.roots]
        if openat2 is not None:
            self.use_openat2 = openat2
        if tmpfile is not None:
            self.use_tmpfile = tmpfile

    # -- resolution ---------------------------------------------------------

    def _locate(self, path: str | None) -> tuple[int, list[str]]:
        """The root a path starts at (its index) and the components below it."""
        if not path:
            return 0, []
        if "\0" in path:
            raise CommandError("invalid path: NUL byte")
        if not path.startswith("/"):
            return 0, path.split("/")
        return self._under_root(path)

    def _under_root(self, absolute: str) -> tuple[int, list[str]]:
        """The outermost root an absolute path lies under, by its components."""
        parts = [p for p in absolute.split("/") if p and p != "."]
        best: int | None = None
        for n, root in enumerate(self._root_parts):
            if parts[:len(root)] == root and (
                    best is None or len(root) < len(self._root_parts[best])):
                best = n
        if best is None:
            raise PathOutsideRoots()
        return best, parts[len(self._root_parts[best]):]

    def _open_root(self, index: int) -> int:
        return os.open(self.roots[index], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def _resolve(self, index: int, parts: list[str], follow: bool = True) -> int:
        """An ``O_PATH`` descriptor of what ``parts`` name below root ``index``.

        ``follow``: a symlink as the last component is followed (inside the jail
        only), else the descriptor is of the link itself.
        """
        if self.use_openat2 and any(p not in ("", ".") for p in parts):
            flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
            root = self._open_root(index)
            try:
                for _ in range(3):
                    try:
                        return openat2(root, "/".join(parts), flags,
                                       RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
                    except BlockingIOError:  # EAGAIN: a rename raced the lookup of ..
                        continue
                    except OSError as e:
                        if e.errno != errno.EXDEV:
                            raise
                        break  # out of the root, or an absolute symlink: the walk decides
            finally:
                os.close(root)
        return self._walk(index, parts, follow)

    def _walk(self, index: int, parts: list[str], follow: bool) -> int:
        """Resolve one component at a time, each relative to the one before."""
        stack = [self._open_root(index)]
        pending = list(reversed(parts))
        links = 0
        try:
            while pending:
                part = pending.pop()
                if part in ("", "."):
                    continue
                if part == "..":
                    if len(stack) == 1:
                        raise PathOutsideRoots()
                    os.close(stack.pop())
                    continue
                fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
                try:
                    mode = os.fstat(fd).st_mode
                    if stat.S_ISLNK(mode) and (pending or follow):
                        target = os.readlink("", dir_fd=fd)  # this link, whatever the name is now
                    elif pending and not stat.S_ISDIR(mode):
                        raise _error(errno.ENOTDIR)
                    else:
                        stack.append(fd)
                        fd = -1
                        continue
                finally:
                    if fd >= 0:
                        os.close(fd)
                links += 1
                if links > MAX_LINKS:
                    raise _error(errno.ELOOP)
                if target.startswith("/"):
                    start, rest = self._under_root(target)
                    old, stack = stack, []
                    for f in old:
                        os.close(f)
                    stack.append(self._open_root(start))
                    pending.extend(reversed(rest))
                else:
                    pending.extend(reversed(target.split("/")))
            return stack.pop()
        finally:
            for f in stack:
                os.close(f)

    def _open(self, path: str | None, follow: bool = True) -> int:
        index, parts = self._locate(path)
        return self._resolve(index, parts, follow)

    def _root_ids(self) -> set[tuple[int, int]]:
        ids = set()
        for root in self.roots:
            try:
                st = os.stat(root)
            except OSError:
                continue
            ids.add((st.st_dev, st.st_ino))
        return ids

    @staticmethod
    def _check_name(path: str | None) -> None:
        if path and is_reserved(posixpath.basename(path.rstrip("/"))):
            raise ReservedName(path)

    # -- looking -------------------------------------------------------------

    def real_path(self, path: str | None) -> str:
        """The real path of ``path`` inside the jail, for a program that needs a name
        (SFTP's REALPATH, a declared command's argument).  The last component may
        be missing (a name about to be created); the rest must exist.

        Only a name: whoever opens it later walks it again, unchecked.  Never open
        it here; use the other methods.
        """
        self._check_name(path)
        try:
            fd = self._open(path)
        except FileNotFoundError as missing:
            try:
                entry = self.entry(path or ".")
            except (CommandError, OSError):
                raise missing from None
            with entry:
                return posixpath.join(os.readlink(_proc(entry.dir_fd)), entry.name)
        try:
            return os.readlink(_proc(fd))
        finally:
            os.close(fd)

    def stat(self, path: str | None) -> os.stat_result:
        """``stat``: a symlink inside the jail is followed."""
        self._check_name(path)
        fd = self._open(path)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def lstat(self, path: str | None) -> os.stat_result:
        """``lstat``: a symlink as the last component is looked at itself."""
        self._check_name(path)
        fd = self._open(path, follow=False)
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def open_file(self, path: str) -> int:
        """A regular file opened for reading (blocking reads).

        Its type is checked on the resolved descriptor before it is opened, so a
        FIFO or a device is never opened at all; a temporary file of an upload in
        progress is refused, also through a symlink.
        """
        self._check_name(path)
        fd = self._open(path)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise _error(errno.EISDIR)
            if not stat.S_ISREG(mode):
                raise CommandError(f"not a regular file: {path}")
            if is_reserved(posixpath.basename(os.readlink(_proc(fd)))):
                raise ReservedName(path)
            return os.open(_proc(fd), os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(fd)

    def open_dir(self, path: str | None) -> int:
        """A directory opened for reading its entries."""
        fd = self._open(path)
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise _error(errno.ENOTDIR)
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)

    def list_dir(self, path: str | None) -> list[str]:
        """The sorted names in a directory, without upload temporary files."""
        fd = self.open_dir(path)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        return sorted(n for n in names if not is_reserved(n))

    def scan_dir(self, path: str | None, targets: dict[str, str] | None = None
                 ) -> list[tuple[str, os.stat_result]]:
        """The sorted names in a directory with their ``lstat``, without upload
        temporary files (and without entries removed while it was read).

        ``targets``, if given, gets each symlink's target by its name, read
        through the directory's descriptor (none for a link replaced meanwhile).
        """
        fd = self.open_dir(path)
        entries = []
        try:
            with os.scandir(fd) as it:
                for item in it:
                    if is_reserved(item.name):
                        continue
                    try:
                        st = item.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed meanwhile
                    entries.append((item.name, st))
                    if targets is not None and stat.S_ISLNK(st.st_mode):
                        try:
                            targets[item.name] = os.readlink(item.name, dir_fd=fd)
                        except OSError:
                            continue  # removed or replaced meanwhile
        finally:
            os.close(fd)
        return sorted(entries, key=lambda e: e[0])

    def node(self, path: str | None) -> Node:
        """What ``path`` names (a symlink inside the jail followed), held open to
        be looked at and changed through one descriptor.  Close it (``with``)."""
        self._check_name(path)
        return Node(self, self._open(path), path or ".")

    # -- entries: a name in a directory ---------------------------------------

    def entry(self, path: str) -> Entry:
        """The directory entry ``path`` names, for operations on the name itself:
        create, remove, rename.  The parent directory is resolved in the jail (its
        symlinks followed inside); the last component is never followed.  ``..``
        and ``.`` are folded first, by name.  The root itself is not an entry
        (:class:`RootProtected`).  Close it (``with``).
        """
        if "\0" in path:
            raise CommandError("invalid path: NUL byte")
        index, parts = self._locate(posixpath.normpath(path) if path else ".")
        parts = [p for p in parts if p not in ("", ".")]
        if not parts:
            raise RootProtected("a root cannot be changed")
        *head, name = parts
        if name == "..":  # normpath leaves .. only in front: above the root
            raise PathOutsideRoots()
        if is_reserved(name):
            raise ReservedName(path)
        fd = self._resolve(index, head)
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                raise _error(errno.ENOTDIR)
        except BaseException:
            os.close(fd)
            raise
        return Entry(self, fd, name, path)


class Node:
    """A resolved file or directory, held by an ``O_PATH`` descriptor."""

    def __init__(self, jail: Jail, fd: int, path: str) -> None:
        self.jail = jail
        self.fd = fd
        self.path = path

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def stat(self) -> os.stat_result:
        return os.fstat(self.fd)

    def is_root(self) -> bool:
        st = self.stat()
        return (st.st_dev, st.st_ino) in self.jail._root_ids()

    def chmod(self, mode: int) -> None:
        """Set the permission bits (never of a root: :class:`RootProtected`)."""
        if self.is_root():
            raise RootProtected("the mode of a root cannot be changed")
        # fchmod refuses O_PATH descriptors; the /proc link reaches the same inode.
        os.chmod(_proc(self.fd), mode)

    def utime(self, times: tuple[int, int]) -> None:
        os.utime(_proc(self.fd), times)


class Entry:
    """One name in a directory of the jail, held by the directory's descriptor.

    ``dir_fd`` is an ``O_PATH`` descriptor: every operation is a ``*at`` call on
    it and :attr:`name`, so a rename of the directory (or of anything above it)
    meanwhile changes nothing about where the operation happens.
    """

    def __init__(self, jail: Jail, dir_fd: int, name: str, path: str) -> None:
        self.jail = jail
        self.dir_fd = dir_fd
        self.name = name
        self.path = path  # as the caller gave it, for messages

    def __enter__(self) -> Entry:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def lstat(self) -> os.stat_result | None:
        """The entry's own ``lstat``; None if there is no such name."""
        return _lstat_at(self.name, self.dir_fd)

    def _not_a_root(self, what: str) -> None:
        st = self.lstat()
        if st is not None and (st.st_dev, st.st_ino) in self.jail._root_ids():
            raise RootProtected(f"a root cannot be {what}")

    def unlink(self) -> None:
        """Remove a file or a symlink (never what it points to); ``EISDIR`` for a
        directory."""
        os.unlink(self.name, dir_fd=self.dir_fd)

    def rmdir(self) -> None:
        self._not_a_root("removed")
        os.rmdir(self.name, dir_fd=self.dir_fd)

    def mkdir(self, mode: int) -> None:
        os.mkdir(self.name, mode, dir_fd=self.dir_fd)

    def rename_to(self, other: Entry, replace: bool = False) -> None:
        """Rename this entry to ``other``'s name; an existing one is replaced only
        with ``replace`` (else ``FileExistsError``)."""
        self._not_a_root("renamed")
        other._not_a_root("replaced")
        if replace:
            os.rename(self.name, other.name, src_dir_fd=self.dir_fd, dst_dir_fd=other.dir_fd)
        else:
            rename_noreplace(self.name, other.name, self.dir_fd, other.dir_fd)

    def open_existing(self) -> int:
        """The regular file under this name, opened for reading; never through a
        symlink (``ELOOP``), and a FIFO or device is refused (``CommandError``)
        without being opened."""
        fd = os.open(self.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dir_fd)
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                raise _error(errno.ELOOP)
            if not stat.S_ISREG(mode):
                raise CommandError(f"not a regular file: {self.path}")
            return os.open(_proc(fd), os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(fd)

    def directory(self) -> int:
        """A descriptor of the directory the caller owns, open for reading (so
        ``fsync``, ``fstatvfs`` and ``fpathconf`` work on it)."""
        try:
            return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except PermissionError:  # a directory we may write to but not read
            return os.dup(self.dir_fd)

    def create_temp(self, run_id: str) -> TempFile:
        """A new, empty file (mode 0600) to be published under this name later.

        Unnamed (``O_TMPFILE``) where the filesystem has it: nobody sees it, and
        nothing is left behind whatever happens.  Else a hidden temporary file
        named by :func:`temp_name` next to the target, which the start-up sweep
        removes after a crash.
        """
        if self.jail.use_tmpfile:
            try:
                fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o600,
                             dir_fd=self.dir_fd)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
            else:
                return TempFile(os.dup(self.dir_fd), fd, None, self.name, run_id)
        name, fd = open_temp(self.name, run_id, self.dir_fd)
        return TempFile(os.dup(self.dir_fd), fd, name, self.name, run_id)


class TempFile:
    """A file being written, invisible until :meth:`publish` gives it its name.

    ``name`` is None for an unnamed (``O_TMPFILE``) file, else the hidden
    temporary name.  The directory is held by a descriptor: renaming it, or
    anything above it, meanwhile does not lose the file.
    """

    def __init__(self, dir_fd: int, fd: int, name: str | None, base: str, run_id: str) -> None:
        self.dir_fd = dir_fd
        self.fd = fd
        self.name = name
        self.base = base
        self.run_id = run_id

    @property
    def unnamed(self) -> bool:
        return self.name is None

    def publish(self, replace: bool) -> None:
        """Give the file its name ``base``: atomically, whole, replacing a file
        there only if ``replace`` (else ``FileExistsError``), then close it.  If
        it raises, the file is still there to :meth:`discard`."""
        if self.name is None:
            self._link_unnamed(replace)
        else:
            self._move_named(self.name, replace)
            self.name = None
        self.close()

    def _link_unnamed(self, replace: bool) -> None:
        dfd, source = self.dir_fd, _proc(self.fd)
        if not replace:  # linkat never replaces: of two uploads to one name, one wins
            os.link(source, self.base, dst_dir_fd=dfd)
            return
        # Linked under a temporary name first, then renamed over the target.
        for _ in range(5):
            name = temp_name(self.base, self.run_id)
            try:
                os.link(source, name, dst_dir_fd=dfd)
                break
            except FileExistsError:
                continue
        else:
            raise _error(errno.EEXIST)
        try:
            os.rename(name, self.base, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            _unlink_quietly(name, dfd)
            raise

    def _move_named(self, name: str, replace: bool) -> None:
        dfd = self.dir_fd
        if replace:
            os.rename(name, self.base, src_dir_fd=dfd, dst_dir_fd=dfd)
            return
        try:
            os.link(name, self.base, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # No hard links here (vfat, some FUSE): rename, never over a file.
            rename_noreplace(name, self.base, dfd, dfd)
        else:
            os.unlink(name, dir_fd=dfd)

    def discard(self) -> None:
        """Drop the file: close it and remove its temporary name (if it has one)."""
        name, self.name = self.name, None
        try:
            if name is not None and self.dir_fd >= 0:
                _unlink_quietly(name, self.dir_fd)
        finally:
            self.close()

    def close(self) -> None:
        for attr in ("fd", "dir_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                os.close(fd)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
