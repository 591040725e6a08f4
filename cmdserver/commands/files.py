"""File commands inside the jail: ``ls`` and ``comphash``.

Both go through the jail (:class:`cmdserver.jail.Jail`), in a thread, never on
the reactor: the file is opened relative to its root, never by a checked name,
and upload temporary files are neither listed nor read.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from typing import Any

from twisted.internet.defer import CancelledError, Deferred

from cmdserver.commands.base import Command, Context
from cmdserver.commands.params import PATH, Choice, Param
from cmdserver.errors import CommandError, MissingArgument
from cmdserver.policy import Policy

ALGORITHMS = ("blake2b", "md5", "sha1", "sha256", "sha512")
CHUNK = 1 << 20  # 1 MiB: large enough for hashlib to run at full speed without the GIL


def os_error(e: OSError, path: str) -> CommandError:
    """A one-line error for a failed file operation, naming the user's path."""
    reasons = {
        FileNotFoundError: "no such file or directory",
        NotADirectoryError: "not a directory",
        IsADirectoryError: "is a directory",
        PermissionError: "permission denied",
    }
    reason = reasons.get(type(e)) or (e.strerror or str(e)).lower()
    return CommandError(f"{reason}: {path}")


def open_regular(policy: Policy, path: str) -> int:
    """Open a regular file of the jail for reading; FIFOs and devices are refused
    without being opened."""
    try:
        return policy.jail.open_file(path)
    except OSError as e:
        raise os_error(e, path) from None


def hash_file(policy: Policy, path: str, algo: str, cancelled: threading.Event) -> str:
    """Hash a file in fixed chunks: memory stays flat whatever its size.

    A file that shrinks or grows while it is read has no one true hash: that is
    an error, not the hash of whatever bytes happened to be read.
    """
    fd = open_regular(policy, path)
    digest = hashlib.new(algo)
    # An anonymous mapping rather than a bytearray: it goes back to the system at
    # once, where 1 MiB blocks freed by many pool threads fragment malloc's arenas.
    buf = mmap.mmap(-1, CHUNK)
    view = memoryview(buf)
    with buf, view, open(fd, "rb", buffering=0, closefd=True) as f:
        try:
            size = os.fstat(fd).st_size
            total = 0
            while n := f.readinto(buf):
                if cancelled.is_set():
                    raise CancelledError()
                digest.update(view[:n])
                total += n
            # Size 0 may be a /proc-style file whose size is unknown: nothing to check.
            if size and (total != size or os.fstat(fd).st_size != size):
                raise CommandError(f"file changed while it was being hashed: {path}")
        except OSError as e:
            raise os_error(e, path) from None
    return digest.hexdigest()


def list_dir(policy: Policy, path: str | None, cancelled: threading.Event) -> list[str]:
    try:
        return policy.jail.list_dir(path)
    except OSError as e:
        raise os_error(e, path or ".") from None


class ComputeHash(Command):
    name = "comphash"
    summary = "Hash a file inside the allowed roots (sha256 unless --algo says)."
    usage = f"comphash [--algo {'|'.join(ALGORITHMS)}] PATH"
    params = (
        Param("path", PATH, missing="Please provide a path.", help="the file to hash"),
        Param("algo", Choice(ALGORITHMS), default="sha256", flag=True, metavar="NAME",
              help="the hash algorithm"),
    )

    def run(self, ctx: Context, path: str, algo: str = "sha256") -> Deferred:
        if not path:  # `comphash ""` would name the first root: "is a directory: "
            raise MissingArgument("Please provide a path.")
        return ctx.core.in_thread_cancellable(hash_file, ctx.policy, path, algo,
                                               ctx=ctx)

    def text(self, result: Any) -> list[str]:
        return [f"File hash is : {result}"]


class ListDir(Command):
    name = "ls"
    summary = "List the names in a directory inside the allowed roots."
    params = (Param("path", PATH, default=None, help="the directory (default: the first root)"),)

    def run(self, ctx: Context, path: str | None = None) -> Deferred:
        return ctx.core.in_thread_cancellable(list_dir, ctx.policy, path, ctx=ctx)

    def text(self, result: Any) -> list[str]:
        return list(result)
