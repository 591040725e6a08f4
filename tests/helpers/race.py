"""The rename race against the jail: a directory inside a root is swapped, by plain
renames (what any SFTP user may do), with a symlink inside the root that leads
out, while file operations run on paths through that directory.

Layout (everything below one temporary directory)::

    root/d/          the real directory: secret ("inside"), x, victim
    root/out  ->     ../outside (a symlink inside the root that points out)
    outside/         secret ("OUTSIDE SECRET"), x, victim, only-outside

The :class:`Swapper` thread renames ``d`` aside, ``out`` to ``d``, back, and so
on, until stopped.  :meth:`RaceLayout.outside_unchanged` says whether anything
outside was created, removed, renamed, written, or had its mode or times
changed.  The fixture writes inside ``d`` only through a descriptor of the real
directory, never by a name that the swapper may have pointed outside.
"""

from __future__ import annotations

import importlib
import os
import stat
import threading
import time
from typing import Any

OUTSIDE_SECRET = b"OUTSIDE SECRET"
INSIDE_SECRET = b"inside"
OUTSIDE_ONLY = "only-outside"
OUTSIDE_NAMES = ("secret", "x", "victim", OUTSIDE_ONLY)


class RaceLayout:
    def __init__(self, base: str) -> None:
        self.base = base
        self.root = os.path.join(base, "root")
        self.outside = os.path.join(base, "outside")
        os.makedirs(os.path.join(self.root, "d"))
        os.makedirs(self.outside)
        for name in OUTSIDE_NAMES:
            path = os.path.join(self.outside, name)
            with open(path, "wb") as f:
                f.write(OUTSIDE_SECRET if name == "secret" else b"OUTSIDE " + name.encode())
            os.chmod(path, 0o644)
            os.utime(path, (1_000_000, 1_000_000))
        os.symlink("../outside", os.path.join(self.root, "out"))
        self.real_dir = os.open(os.path.join(self.root, "d"), os.O_RDONLY | os.O_DIRECTORY)
        self.put_inside("secret", INSIDE_SECRET)
        self.put_inside("x", b"x")
        self.put_inside("victim", b"victim")
        self.before = self.snapshot()

    def put_inside(self, name: str, data: bytes) -> None:
        """Create ``d/name`` through the real directory's descriptor (if missing)."""
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                         dir_fd=self.real_dir)
        except FileExistsError:
            return
        try:
            os.write(fd, data)
        finally:
            os.close(fd)

    def inside(self) -> list[str]:
        return sorted(os.listdir(self.real_dir))

    def snapshot(self) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for name in sorted(os.listdir(self.outside)):
            st = os.lstat(os.path.join(self.outside, name))
            content = None
            if stat.S_ISREG(st.st_mode):
                with open(os.path.join(self.outside, name), "rb") as f:
                    content = f.read()
            seen[name] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_mtime_ns,
                          st.st_ino, content)
        return seen

    def outside_unchanged(self) -> bool:
        return self.snapshot() == self.before

    def close(self) -> None:
        os.close(self.real_dir)


class Swapper(threading.Thread):
    """Swaps ``root/d`` and the symlink ``root/out`` by renames until stopped.

    After each swap back it leaves the real directory in place for a moment
    (``rest`` seconds): a check has to pass before a swap can fool the use after
    it, and operations must get through now and then for the race to mean
    anything.
    """

    def __init__(self, layout: RaceLayout, rest: float = 0.0002) -> None:
        super().__init__(name="swapper", daemon=True)
        self.layout = layout
        self.rest = rest
        self.stop_event = threading.Event()
        self.swaps = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        root = self.layout.root
        d, hold, out = (os.path.join(root, n) for n in ("d", "d.hold", "out"))
        try:
            while not self.stop_event.is_set():
                os.rename(d, hold)  # the real directory aside
                os.rename(out, d)  # d is now the symlink that leads out
                os.rename(d, out)
                os.rename(hold, d)  # and back
                self.swaps += 1
                time.sleep(self.rest)
        except BaseException as e:  # noqa: BLE001 - reported by stop()
            self.error = e

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)
        assert not self.is_alive(), "the swapper did not stop"
        if self.error is not None:
            raise AssertionError(f"the swapper failed: {self.error!r}")


# -- every interleaving, deterministically ----------------------------------------

# The os functions a file operation calls, and the jail's own system calls: the
# adversary may act before any of them.
INTERPOSED = ("open", "stat", "lstat", "fstat", "readlink", "listdir", "scandir", "rename",
              "replace", "unlink", "rmdir", "mkdir", "chmod", "fchmod", "utime", "link",
              "pread", "pwrite", "writev", "fstatvfs", "fsync", "copy_file_range")
JAIL_CALLS = ("openat2", "rename_noreplace")


class Interleaver:
    """Runs an operation with the swap (``root/d`` becomes the symlink that leads
    out) made just before its k-th system call, and swapped back just before the
    j-th: every place where a check and a use could be told apart, in turn.

    Deterministic: no threads; the calls are counted, not timed.
    """

    def __init__(self, layout: RaceLayout) -> None:
        self.layout = layout
        self._real = {name: getattr(os, name) for name in INTERPOSED if hasattr(os, name)}
        self._count = 0
        self._at: dict[int, Any] = {}
        self._state = "dir"  # or "link"

    def _swap(self, to: str) -> None:
        if self._state == to:
            return
        rename = self._real["rename"]
        root = self.layout.root
        d, hold, out = (os.path.join(root, n) for n in ("d", "d.hold", "out"))
        if to == "link":
            rename(d, hold)
            rename(out, d)
        else:
            rename(d, out)
            rename(hold, d)
        self._state = to

    def _wrap(self, f: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self._count += 1
            action = self._at.get(self._count)
            if action is not None:
                self._swap(action)
            return f(*args, **kwargs)
        return call

    def run(self, operation: Any, swaps: dict[int, str]) -> int:
        """Run ``operation()`` with ``swaps`` ({call number: "link" or "dir"}) and
        put ``d`` back as it was; returns how many calls the operation made."""
        self._count, self._at = 0, swaps
        saved = []
        for name, f in self._real.items():
            saved.append((os, name, f))
            setattr(os, name, self._wrap(f))
        try:
            jail_module: Any = importlib.import_module("cmdserver.jail")
        except ImportError:  # the code before the jail
            jail_module = None
        if jail_module is not None:
            for name in JAIL_CALLS:
                f = getattr(jail_module, name)
                saved.append((jail_module, name, f))
                setattr(jail_module, name, self._wrap(f))
        try:
            try:
                operation()
            except Exception:  # noqa: BLE001 - refusals and errors are expected
                pass
        finally:
            for obj, name, f in saved:
                setattr(obj, name, f)
            self._swap("dir")
        return self._count

    def schedules(self, calls: int, pairs: bool = True) -> list[dict[int, str]]:
        """Every single swap before call k, and (``pairs``) every swap before k
        with the swap back before j > k."""
        plans: list[dict[int, str]] = [{k: "link"} for k in range(1, calls + 2)]
        if pairs:
            plans += [{k: "link", j: "dir"} for k in range(1, calls + 1)
                      for j in range(k + 1, calls + 2)]
        return plans
