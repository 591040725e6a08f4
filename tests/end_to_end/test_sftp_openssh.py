"""OpenSSH's ``sftp`` in batch mode against the deployed SSH door: the jail seen as
under OpenSSH's ChrootDirectory (one root is /, several are listed in a
read-only /), no server path in anything it prints."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from tests.end_to_end.support import RunningService
from tests.end_to_end.test_ssh_deployed import SFTP, DeployedSSHBase
from tests.helpers import capture_audit


class OpenSSHSFTPBase(DeployedSSHBase):
    def setUp(self) -> None:
        if SFTP is None:
            raise unittest.SkipTest("OpenSSH sftp not installed")
        super().setUp()

    def local(self, name: str, content: bytes | None = None) -> str:
        path = os.path.join(self.tmp, name)
        if content is not None:
            with open(path, "wb") as f:
                f.write(content)
        return path

    def batch(self, *lines: str) -> defer.Deferred:
        """Run ``sftp -b`` with these lines: (stdout, stderr, exit status), as text."""
        script = self.local("batch")
        with open(script, "w") as f:
            f.write("".join(f"{line}\n" for line in lines))
        d = self.openssh(SFTP, "-b", script, "ops@127.0.0.1")
        return d.addCallback(lambda r: (r[0].decode(), r[1].decode(), r[2]))

    def served(self, *parts: str) -> bytes:
        with open(os.path.join(self.root, *parts), "rb") as f:
            return f.read()


class ChrootViewTest(OpenSSHSFTPBase):
    @defer.inlineCallbacks
    def test_the_root_is_slash(self) -> Any:
        yield self.serve()
        os.makedirs(os.path.join(self.root, "sub"))
        with open(os.path.join(self.root, "notes.txt"), "wb") as f:
            f.write(b"notes\n")
        fetched = self.local("fetched.txt")
        out, err, status = yield self.batch(
            "pwd", "cd ..", "pwd", "cd /sub", "pwd", "cd ../../..", "pwd", "ls -1 /",
            f"get /notes.txt {fetched}", f"put {fetched} ../../copy.txt")
        self.assertEqual((err, status), ("", 0))
        self.assertEqual([line for line in out.splitlines() if "directory" in line], [
            "Remote working directory: /", "Remote working directory: /",
            "Remote working directory: /sub", "Remote working directory: /"])
        self.assertIn("/notes.txt\n/sub\n", out)
        with open(fetched, "rb") as f:
            self.assertEqual(f.read(), b"notes\n")
        self.assertEqual(self.served("copy.txt"), b"notes\n")

    @defer.inlineCallbacks
    def test_no_server_path_in_anything_sftp_prints(self) -> Any:
        yield self.serve()
        os.makedirs(os.path.join(self.root, "sub"))
        os.mkfifo(os.path.join(self.root, "sub", "pipe"))
        os.symlink(self.tmp, os.path.join(self.root, "out"))  # leads out
        os.symlink(os.path.join(self.root, "sub"), os.path.join(self.root, "abs"))
        local = self.local("local.txt", b"local\n")
        out, err, status = yield self.batch(
            "pwd", "ls -l", "ls -l /", "ls -la /sub", "cd abs", "pwd", "cd /",
            f"put {local} sub/up.txt", f"get sub/up.txt {self.local('back.txt')}",
            "rename sub/up.txt sub/moved.txt", "ls -l sub",
            # '-': each of these fails, and the batch goes on.
            "-cd /out", "-cd /nosuch", f"-get out/local.txt {self.local('leak')}",
            f"-get sub/pipe {self.local('pipe')}", f"-put {local} out/x",
            f"-put {local} /nosuch/x", "-mkdir sub", "-rmdir /", "-rm /nosuch",
            "-rename sub/moved.txt /out/x", "-ln -s sub/moved.txt link", "-chmod 700 /",
            "-ls out", f"-get {self.data}/files/sub/moved.txt {self.local('leak2')}",
            "-symlink /etc/passwd pw")
        self.assertEqual(status, 0, err)
        self.assertIn("Remote working directory: /sub", out)
        # The data directory (the root is DATA-DIR/files) shows nowhere, but where
        # the batch itself names it.
        printed = (out + err).replace(f"{self.data}/files/sub/moved.txt", "SENT")
        self.assertNotIn(self.data, printed)
        self.assertNotIn(self.tmp, printed.replace(self.local(""), "LOCAL/"))
        self.assertEqual(sorted(os.listdir(os.path.join(self.root, "sub"))),
                         ["moved.txt", "pipe"])
        self.assertFalse(os.path.exists(self.local("leak")))
        self.assertFalse(os.path.exists(self.local("leak2")))

    @defer.inlineCallbacks
    def test_failures_naming_paths_that_are_not_ascii(self) -> Any:
        # Each failure is answered (its message names the path in UTF-8): the batch
        # goes on, and the session ends.
        yield self.serve()
        os.makedirs(os.path.join(self.root, "été"))
        with open(os.path.join(self.root, "été", "café.txt"), "wb") as f:
            f.write(b"caf\xc3\xa9\n")
        fetched = self.local("fetched.txt")
        out, err, status = yield self.batch(
            "-rm /café.txt", "-cd /nosuch-é", f"-get été/nosuch-ü {self.local('x')}",
            "-mkdir été", "-rmdir été/café.txt", "cd été", "pwd", f"get café.txt {fetched}")
        self.assertEqual(status, 0, err)
        self.assertEqual(err.count("\n"), 5, err)  # one line per failure
        self.assertIn("Remote working directory: /", out)
        with open(fetched, "rb") as f:
            self.assertEqual(f.read(), "café\n".encode())


class SeveralRootsTest(OpenSSHSFTPBase):
    def build(self) -> RunningService:
        self.roots = [os.path.join(self.tmp, "first"), os.path.join(self.tmp, "second")]
        for n, root in enumerate(self.roots, 1):
            os.makedirs(root)
            with open(os.path.join(root, f"f{n}.txt"), "wb") as f:
                f.write(f"file {n}\n".encode())
        return RunningService(self.tmp, "--line", "none", "--ssh", "tcp:0:interface=127.0.0.1",
                              "--bcrypt-cost", "4", "--root", self.roots[0],
                              "--root", self.roots[1])

    @defer.inlineCallbacks
    def test_slash_lists_the_roots_and_cannot_be_changed(self) -> Any:
        yield self.serve()
        local = self.local("local.txt", b"local\n")
        fetched = self.local("fetched.txt")
        out, err, status = yield self.batch(
            "pwd", "ls -1 /", "cd ..", "pwd", "cd root2", "pwd", f"get f2.txt {fetched}",
            f"put {local} /root1/up.txt", "rename /root1/up.txt /root2/up.txt",
            "-mkdir /x", f"-put {local} /x", "-rm /root1", "-rename /root1 /root3",
            "-rmdir /root2", "-rename /root2/f2.txt /f2.txt")
        self.assertEqual(status, 0, err)
        self.assertEqual([line for line in out.splitlines() if "directory" in line], [
            "Remote working directory: /root1", "Remote working directory: /",
            "Remote working directory: /root2"])
        self.assertIn("/root1\n/root2\n", out)
        with open(fetched, "rb") as f:
            self.assertEqual(f.read(), b"file 2\n")
        self.assertEqual(sorted(os.listdir(self.roots[1])), ["f2.txt", "up.txt"])
        self.assertEqual(os.listdir(self.roots[0]), ["f1.txt"])
        self.assertEqual(err.count("Permission denied"), 6, err)
        self.assertNotIn(self.tmp, (out + err).replace(self.local(""), "LOCAL/"))


class ExtensionsTest(OpenSSHSFTPBase):
    """OpenSSH's extensions as its sftp uses them: df (statvfs), rename onto an
    existing name (posix-rename), put -f (fsync), ln (hardlink: not served)."""

    @defer.inlineCallbacks
    def test_df_rename_fsync_and_no_hard_links(self) -> Any:
        yield self.serve()
        old = self.local("old.txt", b"old\n")
        new = self.local("new.txt", b"new\n")
        out, err, status = yield self.batch(
            "df", "df /", f"put {old} a.txt", f"put -f {new} b.txt", "rename b.txt a.txt",
            "-ln a.txt hard.txt")
        self.assertEqual(status, 0, err)
        self.assertEqual(sorted(os.listdir(self.root)), ["a.txt"])
        self.assertEqual(self.served("a.txt"), b"new\n")
        st = os.statvfs(self.root)
        sizes = [line.split() for line in out.splitlines() if line.strip().endswith("%")]
        self.assertEqual(len(sizes), 2, out)
        for size in sizes:  # in KiB, as OpenSSH's df prints them
            self.assertEqual(int(size[0]), st.f_frsize * st.f_blocks // 1024)
        self.assertIn("does not support hardlink@openssh.com", err)


class ResumeUploadTest(OpenSSHSFTPBase):
    """reput and put -a: the remote file is appended to, within the upload rules,
    and replaced whole on close."""

    max_upload = "1048576"

    def build(self) -> RunningService:
        return RunningService(self.tmp, "--line", "none", "--ssh", "tcp:0:interface=127.0.0.1",
                              "--bcrypt-cost", "4", "--max-upload", self.max_upload)

    def setUp(self) -> None:
        super().setUp()
        self.audit = capture_audit(self)

    def audited_puts(self) -> list[tuple[str, dict | None, str]]:
        return [(r["args"]["path"], r.get("result"), r["outcome"]) for r in self.audit
                if r["event"] == "file" and r["command"] == "put"]

    @defer.inlineCallbacks
    def test_reput_and_put_a_append_the_rest(self) -> Any:
        yield self.serve()
        payload = os.urandom(700_000)
        local = self.local("big.bin", payload)
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            f.write(payload[:300_000])  # what a cut transfer left
        with open(os.path.join(self.root, "other.bin"), "wb") as f:
            f.write(payload[:1])
        out, err, status = yield self.batch(f"reput {local} big.bin",
                                            f"put -a {local} other.bin", "ls -l")
        self.assertEqual((err, status), ("", 0))
        self.assertEqual(self.served("big.bin"), payload)
        self.assertEqual(self.served("other.bin"), payload)
        self.assertEqual(sorted(os.listdir(self.root)), ["big.bin", "other.bin"])
        self.assertEqual(self.audited_puts(), [("big.bin", {"bytes": 400_000}, "ok"),
                                               ("other.bin", {"bytes": 699_999}, "ok")])

    @defer.inlineCallbacks
    def test_past_the_upload_limit_it_fails_and_leaves_the_file(self) -> Any:
        yield self.serve()
        payload = os.urandom(1_100_000)
        local = self.local("big.bin", payload)
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            f.write(payload[:1_000_000])
        out, err, status = yield self.batch(f"reput {local} big.bin")
        self.assertEqual(status, 1)
        self.assertIn("big.bin", err)
        self.assertEqual(self.served("big.bin"), payload[:1_000_000])
        self.assertEqual(os.listdir(self.root), ["big.bin"])
        [(path, _, outcome)] = self.audited_puts()
        self.assertEqual((path, outcome), ("big.bin", "error"))
        # OpenSSH's sftp shows only the status ("Failure"); the message says why.
        [record] = [r for r in self.audit if r.get("command") == "put"]
        self.assertIn("upload too large: 1100000 bytes (the limit is 1048576 bytes)",
                      record["error"])
