"""The jailed SFTP server under the rename race (see tests/helpers/race.py): while
another thread swaps a directory for a symlink that leads out, reads, listings,
uploads, renames, removals, mkdir/rmdir and setstat through that directory never
read, list, create or change anything outside the jail.

File work runs inline in this thread; the swapper is a real thread.  The test
asserts no escape, never a timing: the number of operations is fixed.
"""

from __future__ import annotations

import os
from typing import Any, cast

from twisted.conch.ssh.filetransfer import FXF_CREAT, FXF_READ, FXF_TRUNC, FXF_WRITE
from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from cmdserver.commands.base import Registry
from cmdserver.core import CommandCore
from cmdserver.doors.ssh.avatar import SSHAvatar
from cmdserver.doors.ssh.sftp import JailedSFTPServer
from cmdserver.policy import Policy
from tests.doors.ssh.test_sftp_jail import FakeAvatar
from tests.helpers import OutsideTreeTempMixin
from tests.helpers.race import (
    INSIDE_SECRET,
    OUTSIDE_ONLY,
    OUTSIDE_SECRET,
    Interleaver,
    RaceLayout,
    Swapper,
)

PUT = FXF_WRITE | FXF_CREAT | FXF_TRUNC
ROUNDS = 300  # each round runs every operation once


def outcome(d: defer.Deferred) -> Any:
    """The result of an inline Deferred, or its Failure."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the operation did not finish inline"
    return box[0]


class RaceBase(OutsideTreeTempMixin, unittest.TestCase):
    """A jailed SFTP server on the race layout's root."""

    def setUp(self) -> None:
        self.fresh()

    def fresh(self) -> None:
        """A new layout and server (one per operation, so that one that got out
        does not count against the next)."""
        self.layout = RaceLayout(os.path.dirname(self.mktemp()))
        self.addCleanup(self.layout.close)
        policy = Policy([self.layout.root])
        core = CommandCore(Registry(), policy, task.Clock(),
                           run_in_thread=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))
        self.server = JailedSFTPServer(cast(SSHAvatar, FakeAvatar(core, policy)))

    def read(self, path: bytes) -> bytes | None:
        handle = outcome(self.server.openFile(path, FXF_READ, {}))
        if isinstance(handle, Failure):
            return None
        data = outcome(handle.readChunk(0, 100))
        outcome(handle.close())
        return data if isinstance(data, bytes) else None

    def listing(self, path: bytes) -> list[bytes]:
        entries = outcome(self.server.openDirectory(path))
        if isinstance(entries, Failure):
            return []
        names = [name for name, _, _ in entries]
        entries.close()
        return names

    def put(self, path: bytes) -> None:
        upload = outcome(self.server.openFile(path, PUT, {}))
        if not isinstance(upload, Failure):
            outcome(upload.writeChunk(0, b"written by the race"))
            outcome(upload.close())



class SFTPRenameRaceTest(RaceBase):
    def test_renaming_a_directory_to_a_symlink_never_lets_a_path_out(self) -> None:
        layout, server = self.layout, self.server
        swapper = Swapper(layout)
        swapper.start()
        reads = listings = 0
        try:
            for _ in range(ROUNDS):
                data = self.read(b"d/secret")
                self.assertNotEqual(data, OUTSIDE_SECRET, "read a file outside the jail")
                reads += data is not None
                names = self.listing(b"d")
                self.assertNotIn(OUTSIDE_ONLY.encode(), names, "listed a directory outside")
                listings += bool(names)
                self.put(b"d/new")
                outcome(server.renameFile(b"d/x", b"d/x2"))
                outcome(server.renameFile(b"d/x2", b"d/x"))
                outcome(server.removeFile(b"d/victim"))
                outcome(server.makeDirectory(b"d/made", {}))
                outcome(server.removeDirectory(b"d/made"))
                outcome(server.setAttrs(b"d/secret", {"permissions": 0o400}))
                outcome(server.setAttrs(b"d/secret", {"atime": 5, "mtime": 5}))
                self.assertTrue(layout.outside_unchanged(), "changed something outside")
                layout.put_inside("victim", b"victim")
                if "x2" in layout.inside():
                    os.rename("x2", "x", src_dir_fd=layout.real_dir, dst_dir_fd=layout.real_dir)
        finally:
            swapper.stop()
        self.assertTrue(layout.outside_unchanged(), "changed something outside")
        self.assertEqual(sorted(os.listdir(layout.base)), ["outside", "root"])
        # The race really ran: the swapper swapped, and operations got through.
        self.assertGreater(swapper.swaps, 0)
        self.assertGreater(reads, 0)
        self.assertGreater(listings, 0)


class SFTPInterleavingTest(RaceBase):
    """The same operations with the swap made before each of their system calls in
    turn (and swapped back before each later one): deterministic, no threads."""

    def reset(self) -> None:
        layout = self.layout
        for name in ("new", "made", "x2"):
            try:
                os.stat(name, dir_fd=layout.real_dir, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if name == "made":
                os.rmdir(name, dir_fd=layout.real_dir)
            elif name == "x2":
                os.rename("x2", "x", src_dir_fd=layout.real_dir, dst_dir_fd=layout.real_dir)
            else:
                os.unlink(name, dir_fd=layout.real_dir)
        layout.put_inside("victim", b"victim")
        layout.put_inside("x", b"x")

    def every_interleaving(self, operation: Any, escaped: Any) -> tuple[int, dict | None]:
        """Run ``operation`` under every schedule; returns how many ran and the
        first that let it out (``escaped()`` or a change outside), if any."""
        interleaver = Interleaver(self.layout)
        calls = interleaver.run(operation, {})
        self.reset()
        plans = interleaver.schedules(calls)
        first = None
        for plan in plans:
            interleaver.run(operation, plan)
            if first is None and (escaped() or not self.layout.outside_unchanged()):
                first = plan
            self.reset()
        return len(plans), first

    def test_no_interleaving_lets_a_path_out(self) -> None:
        seen: list[bytes | None] = []
        listed: list[list[bytes]] = []
        operations = {
            "get": lambda: seen.append(self.read(b"d/secret")),
            "ls": lambda: listed.append(self.listing(b"d")),
            "put": lambda: self.put(b"d/new"),
            "rename": lambda: outcome(self.server.renameFile(b"d/x", b"d/x2")),
            "rm": lambda: outcome(self.server.removeFile(b"d/victim")),
            "mkdir": lambda: outcome(self.server.makeDirectory(b"d/made", {})),
            "setstat": lambda: outcome(self.server.setAttrs(
                b"d/secret", {"permissions": 0o400, "atime": 5, "mtime": 5})),
        }
        escapes = {}
        for name, operation in operations.items():
            self.fresh()
            # Reads and listings escape by what they return; the rest by changes.
            plans, first = self.every_interleaving(operation, lambda: (
                OUTSIDE_SECRET in seen or any(OUTSIDE_ONLY.encode() in n for n in listed)))
            self.assertGreater(plans, 1)
            if first is not None:
                escapes[name] = first
            if name in ("get", "ls"):
                self.assertIn(INSIDE_SECRET if name == "get" else [b"secret", b"victim", b"x"],
                              seen if name == "get" else listed)
            seen.clear()
            listed.clear()
        # Each operation got out with the swap before system call N: {name: {N: "link"}}.
        self.assertEqual(escapes, {})
