"""Unit tests of the jailed SFTP server, with file work run inline instead of in threads."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, cast

from twisted.conch.ssh.filetransfer import (
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
    SFTPError,
)
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from cmdserver.auth.portal import Account
from cmdserver.commands.base import Registry
from cmdserver.commands.upload.spool import TEMP_RE, remove_stale, temp_name
from cmdserver.core import CommandCore
from cmdserver.doors.ssh.door import SSHAvatar, SSHSettings
from cmdserver.doors.ssh.sftp import JailedFileTransferServer, JailedSFTPServer
from cmdserver.policy import Policy
from tests.helpers import OutsideTreeTempMixin

PUT = FXF_WRITE | FXF_CREAT | FXF_TRUNC


@dataclass
class FakeAvatar:
    core: CommandCore
    policy: Policy
    account: Account = Account("ops")
    peer: str = "127.0.0.1:1"
    settings: SSHSettings = SSHSettings(temp_run_id="0123abcd")
    session_id: str = "feedc0de0001"


class SFTPServerTestBase(OutsideTreeTempMixin, unittest.TestCase):
    """A jailed SFTP server on a root with ``a.txt`` and a directory outside it.

    Uploads are unnamed files (``O_TMPFILE``) where the filesystem has them;
    with ``named_temps`` the tests run with the named temporary files that are
    the fallback elsewhere.
    """

    named_temps = False

    def setUp(self) -> None:
        base = os.path.realpath(self.mktemp())
        self.root = os.path.join(base, "root")
        self.outside = os.path.join(base, "outside")
        os.makedirs(self.root)
        os.makedirs(self.outside)
        with open(os.path.join(self.outside, "secret"), "w") as f:
            f.write("secret")
        with open(os.path.join(self.root, "a.txt"), "w") as f:
            f.write("alpha")
        policy = Policy([self.root])
        if self.named_temps:
            policy.jail.use_tmpfile = False
        core = CommandCore(Registry(), policy, task.Clock(),
                           run_in_thread=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))
        self.server = JailedSFTPServer(cast(SSHAvatar, FakeAvatar(core, policy)))

    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def error(self, d: defer.Deferred) -> SFTPError:
        return self.failureResultOf(d, SFTPError).value

    def put(self, name: bytes, data: bytes, flags: int = PUT) -> Any:
        upload = self.successResultOf(self.server.openFile(name, flags, {}))
        self.successResultOf(upload.writeChunk(0, data))
        return upload

    def temps(self) -> list[str]:
        return [n for n in os.listdir(self.root) if TEMP_RE.match(n)]


class SFTPJailTest(SFTPServerTestBase):
    def test_upload_temp_file_is_named_like_the_upload_engines(self) -> None:
        self.server.jail.use_tmpfile = False  # where O_TMPFILE is missing
        self.put(b"new.bin", b"data")
        [temp] = self.temps()
        self.assertTrue(temp.startswith(".new.bin.cmdserver-upload-0123abcd-"), temp)
        self.assertEqual(os.stat(self.path(temp)).st_mode & 0o777, 0o600)
        # The start-up sweep of another run removes it; this run's sweep spares it.
        self.assertEqual(remove_stale([self.root], "0123abcd"), [])
        self.assertEqual(remove_stale([self.root], "ffffffff"), [self.path(temp)])

    def test_an_unnamed_upload_leaves_no_name_at_all(self) -> None:
        if self.named_temps:
            raise unittest.SkipTest("this class runs with named temporary files")
        if not self.server.jail.use_tmpfile:
            raise unittest.SkipTest("no O_TMPFILE here")
        upload = self.put(b"new.bin", b"data")
        self.assertEqual(sorted(os.listdir(self.root)), ["a.txt"])
        self.successResultOf(upload.close())
        self.assertEqual(sorted(os.listdir(self.root)), ["a.txt", "new.bin"])
        # Replacing a file links it under a temporary name, renamed over at once.
        self.successResultOf(self.put(b"new.bin", b"more").close())
        self.assertEqual(sorted(os.listdir(self.root)), ["a.txt", "new.bin"])
        with open(self.path("new.bin"), "rb") as f:
            self.assertEqual(f.read(), b"more")

    def test_temporary_file_names_are_reserved(self) -> None:
        reserved = temp_name("x", "deadbeef").encode()
        self.assertIn("reserved name",
                      self.error(self.server.openFile(reserved, PUT, {})).message)
        self.assertIn("reserved name", self.error(self.server.renameFile(b"a.txt", reserved)
                                                  ).message)
        self.assertEqual(sorted(os.listdir(self.root)), ["a.txt"])
        # Another session's upload in progress cannot be read, moved or removed.
        self.server.jail.use_tmpfile = False  # so that it has a name
        self.put(b"b.txt", b"data")
        [temp] = [name.encode() for name in self.temps()]
        for attempt in (self.server.openFile(temp, FXF_READ, {}),
                        self.server.renameFile(temp, b"c.txt"),
                        self.server.removeFile(temp)):
            self.assertIn("reserved name", self.error(attempt).message)
        self.assertEqual(len(self.temps()), 1)

    def test_the_root_is_slash(self) -> None:
        for path in (b".", b"/", b"..", b"/../..", b"", b"a.txt/.."):
            self.assertEqual(self.successResultOf(self.server.realPath(path)), b"/", path)
        listing = self.successResultOf(self.server.openDirectory(b"/"))
        self.assertEqual([name for name, _, _ in listing], [b"a.txt"])
        handle = self.successResultOf(self.server.openFile(b"/a.txt", FXF_READ, {}))
        self.assertEqual(self.successResultOf(handle.readChunk(0, 100)), b"alpha")

    def test_nothing_outside_can_be_named(self) -> None:
        # As under OpenSSH's ChrootDirectory: .. stops at /, and an absolute path
        # (the server's real paths too) names a path under the root.
        for attempt in (
            self.server.getAttrs(b"../outside/secret", True),
            self.server.openFile(os.fsencode(self.outside) + b"/secret", FXF_READ, {}),
            self.server.openFile(b"../outside/new", PUT, {}),
            self.server.removeFile(b"../outside/secret"),
            self.server.renameFile(b"a.txt", b"../outside/a.txt"),
            self.server.makeDirectory(b"/tmp/x", {}),
        ):
            self.assertEqual(self.error(attempt).code, FX_NO_SUCH_FILE)
        self.assertEqual(self.error(self.server.removeDirectory(b"/")).code,
                         FX_PERMISSION_DENIED)
        self.successResultOf(self.put(b"../../up.txt", b"up").close())
        with open(self.path("up.txt"), "rb") as f:
            self.assertEqual(f.read(), b"up")
        self.assertEqual(sorted(os.listdir(self.outside)), ["secret"])
        self.assertTrue(os.path.exists(self.path("a.txt")))

    def test_symlink_out_is_not_followed(self) -> None:
        os.symlink(os.path.join(self.outside, "secret"), self.path("link"))
        self.assertEqual(self.error(self.server.openFile(b"link", FXF_READ, {})).code,
                         FX_PERMISSION_DENIED)
        # The link itself may be looked at and removed; its target is untouched.
        self.successResultOf(self.server.getAttrs(b"link", False))
        self.successResultOf(self.server.removeFile(b"link"))
        self.assertFalse(os.path.lexists(self.path("link")))
        self.assertTrue(os.path.exists(os.path.join(self.outside, "secret")))

    def test_upload_is_invisible_until_close(self) -> None:
        upload = self.put(b"new.bin", b"data")
        self.assertFalse(os.path.exists(self.path("new.bin")))
        self.assertEqual(len(self.temps()), 1 if self.named_temps else 0)
        listing = self.successResultOf(self.server.openDirectory(b"."))
        self.assertEqual([name for name, _, _ in listing], [b"a.txt"])
        self.successResultOf(upload.close())
        with open(self.path("new.bin"), "rb") as f:
            self.assertEqual(f.read(), b"data")
        self.assertEqual(self.temps(), [])

    def test_a_listing_long_name_cannot_drive_a_terminal(self) -> None:
        name = "evil\x1b]0;title\x07\u202e\udce9.txt"
        with open(os.path.join(os.fsencode(self.root), os.fsencode(name)), "wb"):
            pass
        listing = self.successResultOf(self.server.openDirectory(b"."))
        [(short, longname, _)] = [e for e in listing if e[0].startswith(b"evil")]
        self.assertEqual(short, os.fsencode(name))  # the file's own name, to use it
        text = longname.decode("utf-8")
        self.assertTrue(text.endswith("evil\ufffd]0;title\ufffd\ufffd\ufffd.txt"), text)

    def test_upload_replaces_an_existing_file_whole(self) -> None:
        self.successResultOf(self.put(b"a.txt", b"beta").close())
        with open(self.path("a.txt"), "rb") as f:
            self.assertEqual(f.read(), b"beta")

    def test_a_failed_write_discards_the_upload(self) -> None:
        upload = self.put(b"a.txt", b"first ")
        real_pwrite = os.pwrite

        def disk_full(fd: int, data: Any, offset: int) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "pwrite", disk_full)
        self.assertIn("no space left on device", self.error(upload.writeChunk(6, b"x")).message)
        self.patch(os, "pwrite", real_pwrite)
        # A client that goes on (OpenSSH's scp truncates at what it knows was
        # written, then closes) gets no file with a hole in it: a.txt stays as it was.
        self.assertIn("an earlier write failed", self.error(upload.writeChunk(7, b"y")).message)
        message = self.error(upload.close()).message
        self.assertEqual(message, "upload discarded: a write failed "
                                  "(no space left on device: a.txt)")
        with open(self.path("a.txt")) as f:
            self.assertEqual(f.read(), "alpha")
        self.assertEqual(self.temps(), [])

    def test_lost_session_drops_the_upload(self) -> None:
        protocol = JailedFileTransferServer(self.server)
        upload = self.put(b"new.bin", b"partial")
        protocol.openFiles[b"1"] = upload
        protocol.connectionLost(connectionDone)
        self.assertFalse(os.path.exists(self.path("new.bin")))
        self.assertEqual(self.temps(), [])

    def test_exclusive_create_refuses_an_existing_name(self) -> None:
        d = self.server.openFile(b"a.txt", FXF_WRITE | FXF_CREAT | FXF_EXCL, {})
        self.assertEqual(self.error(d).code, FX_FILE_ALREADY_EXISTS)

    def test_read_write_refused(self) -> None:
        for flags in (FXF_READ | PUT, FXF_READ | FXF_WRITE, FXF_READ | FXF_APPEND):
            self.assertEqual(self.error(self.server.openFile(b"a.txt", flags, {})).code,
                             FX_OP_UNSUPPORTED)
        self.assertEqual(self.temps(), [])

    def test_rename_onto_an_existing_name_fails(self) -> None:
        with open(self.path("b.txt"), "w") as f:
            f.write("b")
        d = self.server.renameFile(b"a.txt", b"b.txt")
        self.assertEqual(self.error(d).code, FX_FILE_ALREADY_EXISTS)
        with open(self.path("b.txt")) as f:
            self.assertEqual(f.read(), "b")

    def test_mkdir_rmdir_and_the_root_stays(self) -> None:
        self.successResultOf(self.server.makeDirectory(b"d", {}))
        self.assertTrue(os.path.isdir(self.path("d")))
        self.successResultOf(self.server.removeDirectory(b"d"))
        self.assertFalse(os.path.exists(self.path("d")))
        self.assertEqual(self.error(self.server.removeDirectory(b".")).code,
                         FX_PERMISSION_DENIED)
        self.assertTrue(os.path.isdir(self.root))

    def test_fifo_is_not_opened(self) -> None:
        os.mkfifo(self.path("pipe"))
        self.assertIn("not a regular file",
                      self.error(self.server.openFile(b"pipe", FXF_READ, {})).message)

    def test_read(self) -> None:
        handle = self.successResultOf(self.server.openFile(b"a.txt", FXF_READ, {}))
        self.assertEqual(self.successResultOf(handle.readChunk(1, 100)), b"lpha")
        self.successResultOf(handle.close())

    def test_symlinks_and_unknown_extensions_unsupported(self) -> None:
        for d in (self.server.makeLink(b"l", b"/etc/passwd"),
                  self.server.extendedRequest(b"nosuch@example.com", b"")):
            self.assertEqual(self.error(d).code, FX_OP_UNSUPPORTED)
        self.assertFalse(os.path.lexists(self.path("l")))

    def test_nul_in_a_path_is_an_error(self) -> None:
        self.error(self.server.removeFile(b"a\0b"))
        self.error(self.server.getAttrs(b"a\0b", True))

    def test_renaming_the_directory_of_an_open_upload_loses_nothing(self) -> None:
        os.makedirs(self.path("sub"))
        upload = self.put(b"sub/new.bin", b"data")
        self.successResultOf(self.server.renameFile(b"sub", b"moved"))
        self.successResultOf(upload.writeChunk(4, b" more"))
        self.successResultOf(upload.close())
        # Published in the directory it was opened in, under that directory's new name.
        self.assertEqual(os.listdir(self.path("moved")), ["new.bin"])
        with open(self.path("moved", "new.bin"), "rb") as f:
            self.assertEqual(f.read(), b"data more")
        self.assertEqual(sorted(os.listdir(self.root)), ["a.txt", "moved"])
        # And one dropped after such a rename leaves nothing behind either.
        upload = self.put(b"moved/other.bin", b"data")
        self.successResultOf(self.server.renameFile(b"moved", b"again"))
        protocol = JailedFileTransferServer(self.server)
        protocol.openFiles[b"1"] = upload
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(os.listdir(self.path("again")), ["new.bin"])

    def test_the_mode_of_a_root_never_changes(self) -> None:
        os.chmod(self.root, 0o755)
        os.symlink(".", self.path("self"))
        for path in (b".", b"/", b"/..", b"self", b"sub/.."):
            os.makedirs(self.path("sub"), exist_ok=True)
            error = self.error(self.server.setAttrs(path, {"permissions": 0o700}))
            self.assertEqual((error.code, error.message),
                             (FX_PERMISSION_DENIED, "the mode of a root cannot be changed"))
        self.assertEqual(os.stat(self.root).st_mode & 0o777, 0o755)
        self.successResultOf(self.server.setAttrs(b".", {"atime": 1000, "mtime": 2000}))


class SFTPUploadLimitsTest(SFTPServerTestBase):
    """SFTP uploads obey the upload engine's rules: --max-upload and free space."""

    def setUp(self) -> None:
        super().setUp()
        self.server.max_upload = 10

    def sizes(self, upload: Any) -> int:
        return os.fstat(upload.temp.fd).st_size

    def test_a_write_past_the_limit_fails_and_discards_the_upload(self) -> None:
        upload = self.put(b"big.bin", b"12345678")
        error = self.error(upload.writeChunk(8, b"9ab"))
        self.assertEqual(error.message, "upload too large: 11 bytes (the limit is 10 bytes)")
        self.assertEqual(self.sizes(upload), 8)  # nothing of it was written
        self.assertIn("an earlier write failed", self.error(upload.writeChunk(8, b"9")).message)
        self.assertEqual(self.error(upload.close()).message,
                         "upload discarded: a write failed (upload too large: 11 bytes "
                         "(the limit is 10 bytes))")
        self.assertEqual(sorted(os.listdir(self.root)), ["a.txt"])

    def test_no_write_at_a_huge_offset(self) -> None:
        upload = self.successResultOf(self.server.openFile(b"a.txt", PUT, {}))
        for offset in (1 << 40, (1 << 64) - 2, 10):
            upload.failed = None  # each on its own
            self.assertIn("upload too large", self.error(upload.writeChunk(offset, b"x")).message)
            self.assertEqual(self.sizes(upload), 0)  # no sparse file either
        self.error(upload.close())
        with open(self.path("a.txt")) as f:
            self.assertEqual(f.read(), "alpha")  # the file it would have replaced stays
        self.assertEqual(self.temps(), [])

    def test_up_to_the_limit_is_fine(self) -> None:
        upload = self.put(b"ten.bin", b"01234")
        self.successResultOf(upload.writeChunk(5, b"56789"))
        self.successResultOf(upload.writeChunk(0, b"X"))  # rewriting counts once
        self.successResultOf(upload.close())
        with open(self.path("ten.bin"), "rb") as f:
            self.assertEqual(f.read(), b"X123456789")

    def test_a_write_the_disk_has_no_room_for_fails_first(self) -> None:
        self.server.max_upload = 1 << 30
        real = os.fstatvfs

        def nearly_full(fd: int) -> Any:
            st = real(fd)
            return os.statvfs_result((st.f_bsize, 1024, st.f_blocks, 3, 3, *st[5:]))

        upload = self.put(b"big.bin", b"x" * 2048)  # 3 KiB free: fits
        self.patch(os, "fstatvfs", nearly_full)
        self.successResultOf(upload.writeChunk(2048, b"y" * 1024))
        self.successResultOf(upload.writeChunk(0, b"z" * 3072))  # grows nothing
        error = self.error(upload.writeChunk(3072, b"w" * 4096))
        self.assertEqual(error.message, "not enough disk space: 4096 bytes needed, "
                                        "3072 available")
        self.assertEqual(self.sizes(upload), 3072)
        self.assertIn("not enough disk space", self.error(upload.close()).message)
        self.assertEqual(sorted(os.listdir(self.root)), ["a.txt"])


class SFTPHandleCapTest(SFTPServerTestBase):
    """At most ``sftp_max_handles`` open files and directories per session."""

    def setUp(self) -> None:
        super().setUp()
        self.server.max_handles = 3

    def test_one_more_than_the_cap_is_refused_until_one_is_closed(self) -> None:
        fds = len(os.listdir("/proc/self/fd"))
        read = self.successResultOf(self.server.openFile(b"a.txt", FXF_READ, {}))
        listing = self.successResultOf(self.server.openDirectory(b"."))
        upload = self.put(b"new.bin", b"data")
        for attempt in (self.server.openFile(b"a.txt", FXF_READ, {}),
                        self.server.openDirectory(b"."),
                        self.server.openFile(b"b.bin", PUT, {})):
            self.assertEqual(self.error(attempt).message,
                             "too many open files and directories (the limit is 3 per session)")
        self.successResultOf(read.close())
        again = self.successResultOf(self.server.openFile(b"a.txt", FXF_READ, {}))
        self.error(self.server.openDirectory(b"."))
        listing.close()
        self.successResultOf(upload.close())
        self.successResultOf(again.close())
        self.assertEqual(self.server.handles, 0)
        self.assertEqual(len(os.listdir("/proc/self/fd")), fds)

    def test_failed_opens_and_closes_give_the_handle_back(self) -> None:
        for _ in range(10):
            self.error(self.server.openFile(b"missing", FXF_READ, {}))
            self.error(self.server.openDirectory(b"missing"))
            self.error(self.server.openFile(b"../outside/x", PUT, {}))
        upload = self.put(b"new.bin", b"data")
        upload.failed = "a test"
        self.error(upload.close())  # a close that fails still closes
        dropped = self.put(b"other.bin", b"data")
        protocol = JailedFileTransferServer(self.server)
        protocol.openFiles[b"1"] = dropped
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.server.handles, 0)
        handles = [self.successResultOf(self.server.openFile(b"a.txt", FXF_READ, {}))
                   for _ in range(3)]
        self.error(self.server.openFile(b"a.txt", FXF_READ, {}))
        for handle in handles:
            self.successResultOf(handle.close())


class SFTPWriteIntoTest(SFTPServerTestBase):
    """Writing into an existing file without truncating it, as OpenSSH's scp does:
    the upload starts as the file's content and replaces it whole on close."""

    def content(self, name: str = "a.txt") -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()

    def open_fds(self) -> int:
        return len(os.listdir("/proc/self/fd"))

    def test_bytes_not_written_are_the_files(self) -> None:
        before = os.stat(self.path("a.txt")).st_ino
        upload = self.put(b"a.txt", b"AL", flags=FXF_WRITE)
        self.assertEqual(self.content(), b"alpha")  # nothing visible before close
        self.successResultOf(upload.close())
        self.assertEqual(self.content(), b"ALpha")
        self.assertNotEqual(os.stat(self.path("a.txt")).st_ino, before)  # renamed over
        self.assertEqual(os.stat(self.path("a.txt")).st_mode & 0o777, 0o600)
        self.assertEqual(self.temps(), [])

    def test_a_gap_keeps_the_files_bytes(self) -> None:
        upload = self.put(b"a.txt", b"HA", flags=FXF_WRITE | FXF_CREAT)
        self.successResultOf(upload.writeChunk(3, b"HA"))
        self.successResultOf(upload.writeChunk(7, b"!"))
        self.successResultOf(upload.close())
        self.assertEqual(self.content(), b"HAp" + b"HA\0\0!")

    def test_copied_without_copy_file_range_too(self) -> None:
        def unsupported(*args: Any) -> int:
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        self.patch(os, "copy_file_range", unsupported)
        with open(self.path("a.txt"), "wb") as f:
            f.write(os.urandom(600_000))
        expected = b"x" + self.content()[1:]
        self.successResultOf(self.put(b"a.txt", b"x", flags=FXF_WRITE).close())
        self.assertEqual(self.content(), expected)

    def test_scp_writes_then_sets_the_size_it_wrote(self) -> None:
        with open(self.path("a.txt"), "wb") as f:
            f.write(b"alphabet soup")
        for data in (b"new", b"a text longer than the one before", b""):
            upload = self.put(b"a.txt", data, flags=FXF_WRITE | FXF_CREAT)
            attrs = self.successResultOf(upload.getAttrs())
            self.assertEqual(attrs["size"], max(len(data), len(self.content())))
            self.successResultOf(upload.setAttrs({"size": len(data)}))
            self.assertEqual(self.successResultOf(upload.getAttrs())["size"], len(data))
            self.successResultOf(upload.close())
            self.assertEqual(self.content(), data)

    def test_only_the_files_bytes_can_be_cut_off(self) -> None:
        with open(self.path("a.txt"), "wb") as f:
            f.write(b"alphabet soup")
        upload = self.put(b"a.txt", b"new", flags=FXF_WRITE)
        for size in (2, 5):  # into the client's bytes, or not where they end
            self.assertEqual(self.error(upload.setAttrs({"size": size})).code,
                             FX_OP_UNSUPPORTED)
        self.successResultOf(upload.setAttrs({"size": 13}))  # the size it has
        self.successResultOf(upload.close())
        self.assertEqual(self.content(), b"newhabet soup")

    def test_nothing_is_left_open_or_behind(self) -> None:
        fds = self.open_fds()
        self.successResultOf(self.put(b"a.txt", b"A", flags=FXF_WRITE).close())
        upload = self.put(b"a.txt", b"B", flags=FXF_WRITE)
        self.successResultOf(upload.setAttrs({"size": 1}))
        self.successResultOf(upload.close())
        protocol = JailedFileTransferServer(self.server)
        protocol.openFiles[b"1"] = self.put(b"a.txt", b"C", flags=FXF_WRITE)
        protocol.connectionLost(connectionDone)  # the session died: the upload is dropped
        self.assertEqual(self.content(), b"B")
        self.assertEqual(self.temps(), [])
        self.assertEqual(self.open_fds(), fds)

    def test_symlinks_and_special_files_are_not_written_into(self) -> None:
        os.symlink("a.txt", self.path("link"))
        os.symlink(os.path.join(self.outside, "secret"), self.path("out"))
        os.mkfifo(self.path("pipe"))
        self.assertEqual(self.error(self.server.openFile(b"link", FXF_WRITE, {})).code,
                         FX_OP_UNSUPPORTED)
        self.assertEqual(self.error(self.server.openFile(b"out", FXF_WRITE, {})).code,
                         FX_OP_UNSUPPORTED)
        self.assertIn("not a regular file",
                      self.error(self.server.openFile(b"pipe", FXF_WRITE, {})).message)
        self.assertEqual(self.temps(), [])
        self.assertEqual(self.content(), b"alpha")


class SFTPAppendTest(SFTPServerTestBase):
    """Opened to append (OpenSSH's reput and put -a): the upload starts as the file,
    each write lands at its end, and it replaces the file whole on close."""

    APPEND = FXF_WRITE | FXF_CREAT | FXF_APPEND

    def content(self, name: str = "a.txt") -> bytes:
        with open(self.path(name), "rb") as f:
            return f.read()

    def test_writes_land_at_the_end(self) -> None:
        before = os.stat(self.path("a.txt")).st_ino
        upload = self.put(b"a.txt", b" beta", flags=self.APPEND)  # at 0: still at the end
        self.successResultOf(upload.writeChunk(10, b" gamma"))  # reput's offsets: the end
        self.assertEqual(self.content(), b"alpha")  # nothing visible before close
        self.successResultOf(upload.close())
        self.assertEqual(self.content(), b"alpha beta gamma")
        self.assertNotEqual(os.stat(self.path("a.txt")).st_ino, before)  # replaced whole
        self.assertEqual(self.temps(), [])
        os.symlink("a.txt", self.path("link"))  # never appended to through a symlink
        self.assertEqual(self.error(self.server.openFile(b"link", self.APPEND, {})).code,
                         FX_OP_UNSUPPORTED)
        self.assertEqual(self.content(), b"alpha beta gamma")

    def test_a_new_file(self) -> None:
        self.successResultOf(self.put(b"new.txt", b"new", flags=self.APPEND).close())
        self.assertEqual(self.content("new.txt"), b"new")

    def test_the_whole_file_counts_against_the_limit(self) -> None:
        self.server.max_upload = 8
        upload = self.put(b"a.txt", b"123", flags=self.APPEND)  # 5 + 3: fits
        error = self.error(upload.writeChunk(8, b"4"))
        self.assertEqual(error.message, "upload too large: 9 bytes (the limit is 8 bytes)")
        self.assertIn("upload discarded", self.error(upload.close()).message)
        self.assertEqual(self.content(), b"alpha")
        self.assertEqual(self.temps(), [])

    def test_and_against_the_free_space(self) -> None:
        with open(self.path("a.txt"), "wb") as f:
            f.write(b"x" * 4096)
        real = os.fstatvfs

        def nearly_full(fd: int) -> Any:
            st = real(fd)
            return os.statvfs_result((st.f_bsize, 1024, st.f_blocks, 4, 4, *st[5:]))

        self.patch(os, "fstatvfs", nearly_full)
        upload = self.successResultOf(self.server.openFile(b"a.txt", self.APPEND, {}))
        error = self.error(upload.writeChunk(4096, b"y"))
        self.assertEqual(error.message, "not enough disk space: 4097 bytes needed, "
                                        "4096 available")
        self.error(upload.close())
        self.assertEqual(self.content(), b"x" * 4096)


class SFTPJailNamedTempTest(SFTPJailTest):
    named_temps = True


class SFTPAppendNamedTempTest(SFTPAppendTest):
    named_temps = True


class SFTPWriteIntoNamedTempTest(SFTPWriteIntoTest):
    named_temps = True


class SFTPModeTest(SFTPServerTestBase):
    """Files SFTP writes are 0600 like the upload command's; chmod only narrows."""

    def mode(self, *parts: str) -> int:
        return os.stat(self.path(*parts)).st_mode & 0o7777

    def test_created_file_is_0600_whatever_mode_is_asked(self) -> None:
        for name, asked in ((b"plain.bin", {}), (b"asked.bin", {"permissions": 0o644}),
                            (b"wide.bin", {"permissions": 0o4777})):
            upload = self.successResultOf(self.server.openFile(name, PUT, asked))
            self.successResultOf(upload.writeChunk(0, b"data"))
            self.successResultOf(upload.close())
            self.assertEqual(self.mode(name.decode()), 0o600, name)

    def test_replaced_file_is_0600_and_replaced_whole(self) -> None:
        os.chmod(self.path("a.txt"), 0o644)
        before = os.stat(self.path("a.txt")).st_ino
        upload = self.successResultOf(self.server.openFile(b"a.txt", PUT,
                                                           {"permissions": 0o644}))
        self.successResultOf(upload.writeChunk(0, b"beta"))
        self.successResultOf(upload.close())
        self.assertEqual(self.mode("a.txt"), 0o600)
        self.assertNotEqual(os.stat(self.path("a.txt")).st_ino, before)  # renamed over
        with open(self.path("a.txt"), "rb") as f:
            self.assertEqual(f.read(), b"beta")

    def test_fsetstat_on_an_upload_narrows_only(self) -> None:
        for asked, expected in ((0o755, 0o600), (0o6777, 0o600), (0o400, 0o400)):
            upload = self.successResultOf(self.server.openFile(b"f.bin", PUT, {}))
            self.successResultOf(upload.setAttrs({"permissions": asked}))
            self.successResultOf(upload.close())
            self.assertEqual(self.mode("f.bin"), expected, oct(asked))

    def test_setstat_on_a_file_narrows_only(self) -> None:
        for asked, expected in ((0o644, 0o600), (0o777, 0o600), (0o4700, 0o600),
                                (0o400, 0o400), (0o000, 0o000), (0o600, 0o600)):
            self.successResultOf(self.server.setAttrs(b"a.txt", {"permissions": asked}))
            self.assertEqual(self.mode("a.txt"), expected, oct(asked))

    def test_setstat_through_a_symlink_caps_its_target(self) -> None:
        os.symlink("a.txt", self.path("link"))
        self.successResultOf(self.server.setAttrs(b"link", {"permissions": 0o755}))
        self.assertEqual(self.mode("a.txt"), 0o600)

    def test_directories_are_capped_at_0755(self) -> None:
        old = os.umask(0)  # so that only the cap can take the bits away
        self.addCleanup(os.umask, old)
        self.successResultOf(self.server.makeDirectory(b"d", {"permissions": 0o3777}))
        self.assertEqual(self.mode("d"), 0o755)
        for asked, expected in ((0o777, 0o755), (0o1777, 0o755), (0o700, 0o700)):
            self.successResultOf(self.server.setAttrs(b"d", {"permissions": asked}))
            self.assertEqual(self.mode("d"), expected, oct(asked))

    def test_setstat_outside_the_jail_is_refused(self) -> None:
        secret = os.path.join(self.outside, "secret")
        os.chmod(secret, 0o600)
        os.symlink(self.outside, self.path("out"))
        d = self.server.setAttrs(b"out/secret", {"permissions": 0o400})
        self.assertEqual(self.error(d).code, FX_PERMISSION_DENIED)
        self.assertEqual(os.stat(secret).st_mode & 0o777, 0o600)

    def test_fsetstat_accepts_the_size_the_upload_has(self) -> None:
        # OpenSSH's scp sends the size it wrote (its in-place truncation), with -p
        # the mode and times too.
        upload = self.put(b"f.bin", b"0123456789")
        self.successResultOf(upload.setAttrs({"size": 10}))
        self.successResultOf(upload.setAttrs({"size": 10, "permissions": 0o644,
                                              "atime": 1000, "mtime": 2000}))
        self.successResultOf(upload.close())
        with open(self.path("f.bin"), "rb") as f:
            self.assertEqual(f.read(), b"0123456789")
        self.assertEqual((self.mode("f.bin"), os.stat(self.path("f.bin")).st_mtime),
                         (0o600, 2000))
        # Another size would change the data: refused, and nothing else is set.
        upload = self.put(b"f.bin", b"abcdefgh")
        for size in (3, 9):
            d = upload.setAttrs({"size": size, "permissions": 0o400})
            self.assertEqual(self.error(d).code, FX_OP_UNSUPPORTED)
        self.successResultOf(upload.close())
        with open(self.path("f.bin"), "rb") as f:
            self.assertEqual(f.read(), b"abcdefgh")
        self.assertEqual(self.mode("f.bin"), 0o600)

    def test_fsetstat_owner_is_refused(self) -> None:
        upload = self.put(b"f.bin", b"data")
        d = upload.setAttrs({"uid": 0, "gid": 0})
        self.assertEqual(self.error(d).code, FX_OP_UNSUPPORTED)
        self.successResultOf(upload.close())

    def test_setstat_size_of_a_file_only_as_it_is(self) -> None:
        self.successResultOf(self.server.setAttrs(b"a.txt", {"size": 5, "atime": 1000,
                                                             "mtime": 2000}))
        self.assertEqual(os.stat(self.path("a.txt")).st_mtime, 2000)
        d = self.server.setAttrs(b"a.txt", {"size": 2, "mtime": 3000, "atime": 3000})
        self.assertEqual(self.error(d).code, FX_OP_UNSUPPORTED)
        with open(self.path("a.txt")) as f:
            self.assertEqual(f.read(), "alpha")
        self.assertEqual(os.stat(self.path("a.txt")).st_mtime, 2000)

    def test_times_are_still_set(self) -> None:
        self.successResultOf(self.server.setAttrs(b"a.txt", {"atime": 1000, "mtime": 2000}))
        self.assertEqual(os.stat(self.path("a.txt")).st_mtime, 2000)
