"""OpenSSH's ``scp`` against the deployed SSH door (makeService, a users file, a
key): since OpenSSH 9.0 scp speaks SFTP, writes downloads in place and sets the
size, mode and times of what it uploads."""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from cmdserver.commands.upload.spool import TEMP_RE
from tests.end_to_end.test_ssh_deployed import SCP, DeployedSSHBase

MIB = 1 << 20
OLD_TIME = 981173106  # 2001-02-03 04:05:06 UTC


def fingerprint(path: str) -> tuple[int, str]:
    """Size and SHA-256 of a file: a mismatch prints two short lines, not megabytes."""
    with open(path, "rb") as f:
        return os.path.getsize(path), hashlib.sha256(f.read()).hexdigest()


def write_random(path: str, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def tree(top: str) -> dict[str, Any]:
    """Every directory and file below ``top`` with a file's fingerprint."""
    found: dict[str, Any] = {}
    for here, dirs, files in os.walk(top):
        rel = os.path.relpath(here, top)
        for name in dirs:
            found[os.path.join(rel, name)] = "dir"
        for name in files:
            found[os.path.join(rel, name)] = fingerprint(os.path.join(here, name))
    return found


class ScpTest(DeployedSSHBase):
    def setUp(self) -> None:
        if SCP is None:
            raise unittest.SkipTest("OpenSSH scp not installed")
        super().setUp()

    def scp(self, *args: str) -> defer.Deferred:
        return self.openssh(SCP, *args)

    def local(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    def no_temporary_files(self) -> None:
        for here, _, files in os.walk(self.root):
            self.assertEqual([n for n in files if TEMP_RE.match(n)], [], here)

    @defer.inlineCallbacks
    def test_download_of_several_mib_is_whole(self) -> Any:
        # The old server answered reads out of order; scp then cut the file short
        # (at 96 KiB to 800 KiB of a few MiB) and exited 1.
        yield self.serve()
        served = os.path.join(self.root, "big.bin")
        write_random(served, 6 * MIB + 123)
        for attempt in range(3):
            got = self.local(f"got-{attempt}.bin")
            out, err, status = yield self.scp("ops@127.0.0.1:big.bin", got)
            self.assertEqual((err, status), (b"", 0), f"attempt {attempt}")
            self.assertEqual(fingerprint(got), fingerprint(served), f"attempt {attempt}")

    @defer.inlineCallbacks
    def test_upload_is_whole_and_0600(self) -> Any:
        yield self.serve()
        sent = self.local("up.bin")
        write_random(sent, 5 * MIB + 7)
        os.chmod(sent, 0o755)
        out, err, status = yield self.scp(sent, "ops@127.0.0.1:up.bin")
        self.assertNotIn(b"fsetstat", err)
        self.assertEqual((err, status), (b"", 0))
        landed = os.path.join(self.root, "up.bin")
        self.assertEqual(fingerprint(landed), fingerprint(sent))
        self.assertEqual(stat.S_IMODE(os.stat(landed).st_mode), 0o600)
        self.assertEqual(os.listdir(self.root), ["up.bin"])

    @defer.inlineCallbacks
    def test_recursive_copy_both_ways(self) -> Any:
        yield self.serve()
        top = self.local("tree")
        os.makedirs(os.path.join(top, "sub", "deeper"))
        for i in range(60):
            write_random(os.path.join(top, f"f{i:02d}.bin"), i * 3001)
        for i in range(8):
            write_random(os.path.join(top, "sub", f"g{i}.bin"), 70_000 + i)
        write_random(os.path.join(top, "sub", "deeper", "big.bin"), 3 * MIB)
        open(os.path.join(top, "sub", "deeper", "empty"), "wb").close()
        os.chmod(os.path.join(top, "sub"), 0o777)
        out, err, status = yield self.scp("-r", top, "ops@127.0.0.1:tree")
        self.assertNotIn(b"fsetstat", err)
        self.assertEqual((err, status), (b"", 0))
        uploaded = os.path.join(self.root, "tree")
        self.assertEqual(tree(uploaded), tree(top))
        self.no_temporary_files()
        for here, _, files in os.walk(uploaded):  # modes within the caps
            self.assertEqual(stat.S_IMODE(os.stat(here).st_mode) & ~0o755, 0, here)
            for name in files:
                mode = stat.S_IMODE(os.stat(os.path.join(here, name)).st_mode)
                self.assertEqual(mode & ~0o600, 0, name)
        back = self.local("back")
        out, err, status = yield self.scp("-r", "ops@127.0.0.1:tree", back)
        self.assertEqual((err, status), (b"", 0))
        self.assertEqual(tree(back), tree(top))

    @defer.inlineCallbacks
    def test_preserved_times(self) -> Any:
        yield self.serve()
        top = self.local("dated")
        os.makedirs(top)
        inner = os.path.join(top, "inner.bin")
        write_random(inner, 200_000)
        os.chmod(inner, 0o644)
        os.utime(inner, (OLD_TIME, OLD_TIME))
        os.utime(top, (OLD_TIME + 60, OLD_TIME + 60))
        out, err, status = yield self.scp("-r", "-p", top, "ops@127.0.0.1:dated")
        self.assertEqual((err, status), (b"", 0))
        remote = os.path.join(self.root, "dated")
        self.assertEqual(os.stat(os.path.join(remote, "inner.bin")).st_mtime, OLD_TIME)
        self.assertEqual(os.stat(remote).st_mtime, OLD_TIME + 60)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(remote, "inner.bin")).st_mode),
                         0o600)
        self.assertEqual(fingerprint(os.path.join(remote, "inner.bin")), fingerprint(inner))
        # And back: scp -p gives the local copy the server's times.
        served = os.path.join(self.root, "served.bin")
        write_random(served, 2 * MIB)
        os.utime(served, (OLD_TIME - 3600, OLD_TIME - 3600))
        got = self.local("served.bin")
        out, err, status = yield self.scp("-p", "ops@127.0.0.1:served.bin", got)
        self.assertEqual((err, status), (b"", 0))
        self.assertEqual(os.stat(got).st_mtime, OLD_TIME - 3600)
        self.assertEqual(fingerprint(got), fingerprint(served))

    @defer.inlineCallbacks
    def test_upload_over_an_existing_file_replaces_it(self) -> Any:
        # scp opens an existing file without truncating it, writes, then sets the
        # size it wrote: larger, smaller and empty files all land exactly.
        yield self.serve()
        landed = os.path.join(self.root, "same.bin")
        for size in (3 * MIB, MIB + 1, 2 * MIB, 0):
            sent = self.local(f"send-{size}.bin")
            write_random(sent, size)
            out, err, status = yield self.scp(sent, "ops@127.0.0.1:same.bin")
            self.assertEqual((err, status), (b"", 0), size)
            self.assertEqual(fingerprint(landed), fingerprint(sent), size)
            self.assertEqual(os.listdir(self.root), ["same.bin"])
        # scp -r again over what it copied before, with files changed meanwhile.
        top = self.local("tree")
        os.makedirs(top)
        for i in range(10):
            write_random(os.path.join(top, f"f{i}.bin"), 100_000 + i)
        for round_ in range(2):
            out, err, status = yield self.scp("-r", top, "ops@127.0.0.1:.")  # ./tree
            self.assertEqual((err, status), (b"", 0), round_)
            self.assertEqual(tree(os.path.join(self.root, "tree")), tree(top), round_)
            for i in range(0, 10, 2):
                write_random(os.path.join(top, f"f{i}.bin"), 50_000 - i)
        self.no_temporary_files()
