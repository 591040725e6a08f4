"""comphash and ls: results, the jail, bad files, cancellation."""

from __future__ import annotations

import hashlib
import os
import threading

from twisted.internet import defer
from twisted.trial import unittest

from cmdserver.commands import files
from cmdserver.errors import CommandError
from cmdserver.jail import temp_name
from cmdserver.policy import Policy
from tests.helpers import make_context, make_core


class FileCommandTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.root, "sub"))
        self.data = os.urandom(3 * files.CHUNK + 17)  # several chunks and a tail
        with open(os.path.join(self.root, "blob"), "wb") as f:
            f.write(self.data)
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        with open(os.path.join(outside, "secret"), "w") as f:
            f.write("secret")
        os.symlink(os.path.join(outside, "secret"), os.path.join(self.root, "leak"))
        self.core = make_core(self.root)
        self.ctx = make_context(self.core)

    def lines(self, line: str) -> list[str]:
        return self.successResultOf(self.core.run_line(self.ctx, line)).lines

    def test_comphash_default_is_sha256(self) -> None:
        expected = hashlib.sha256(self.data).hexdigest()
        self.assertEqual(self.lines("comphash blob"), [f"File hash is : {expected}"])

    def test_comphash_every_algorithm(self) -> None:
        for algo in files.ALGORITHMS:
            expected = hashlib.new(algo, self.data).hexdigest()
            self.assertEqual(self.lines(f"comphash --algo {algo} blob"),
                             [f"File hash is : {expected}"])
            self.assertEqual(self.lines(f"comphash --algo={algo} blob"),
                             [f"File hash is : {expected}"])

    def test_comphash_empty_file_and_dash_name(self) -> None:
        open(os.path.join(self.root, "-x"), "wb").close()
        self.assertEqual(self.lines("comphash -- -x"),
                         [f"File hash is : {hashlib.sha256(b'').hexdigest()}"])

    def test_comphash_result_value(self) -> None:
        d = self.core.call(self.ctx, "comphash", path="blob", algo="md5")
        self.assertEqual(self.successResultOf(d), hashlib.md5(self.data).hexdigest())

    def test_comphash_without_path(self) -> None:
        self.assertEqual(self.lines("comphash"), ["Please provide a path."])
        self.assertEqual(self.lines("comphash --algo md5"), ["Please provide a path."])
        self.assertEqual(self.lines('comphash ""'), ["Please provide a path."])

    def test_comphash_bad_arguments(self) -> None:
        usage = "usage: comphash [--algo blake2b|md5|sha1|sha256|sha512] PATH"
        self.assertEqual(self.lines("comphash a b"), [f"Error: {usage}"])
        self.assertEqual(self.lines("comphash --fast a"),
                         [f"Error: unknown option --fast; {usage}"])
        self.assertEqual(self.lines("comphash a --algo"),
                         [f"Error: --algo needs a value; {usage}"])
        self.assertEqual(self.lines("comphash --algo crc32 blob"), [
            "Error: algo must be one of blake2b, md5, sha1, sha256, sha512, not 'crc32'"])

    def test_comphash_refuses_the_outside(self) -> None:
        for path in ("../x", "/etc/passwd", "leak", "sub/../../x"):
            self.assertEqual(self.lines(f"comphash {path}"),
                             ["Error: path outside allowed roots"])

    def test_comphash_missing_directory_fifo(self) -> None:
        os.mkfifo(os.path.join(self.root, "fifo"))
        self.assertEqual(self.lines("comphash nope"),
                         ["Error: no such file or directory: nope"])
        self.assertEqual(self.lines("comphash sub"), ["Error: is a directory: sub"])
        self.assertEqual(self.lines("comphash fifo"), ["Error: not a regular file: fifo"])

    def test_comphash_unreadable(self) -> None:
        if os.getuid() == 0:
            raise unittest.SkipTest("root reads every file")
        path = os.path.join(self.root, "locked")
        open(path, "w").close()
        os.chmod(path, 0)
        self.assertEqual(self.lines("comphash locked"), ["Error: permission denied: locked"])

    def test_hash_stops_when_cancelled(self) -> None:
        cancelled = threading.Event()
        cancelled.set()
        policy = Policy([self.root])
        self.assertRaises(defer.CancelledError, files.hash_file, policy, "blob", "sha256",
                          cancelled)

    def test_ls(self) -> None:
        for name in ("b", "a", "C"):
            open(os.path.join(self.root, "sub", name), "w").close()
        self.assertEqual(self.lines("ls sub"), ["C", "a", "b"])
        self.assertEqual(self.lines("ls"), ["blob", "leak", "sub"])
        self.assertEqual(self.successResultOf(self.core.call(self.ctx, "ls", path="sub")),
                         ["C", "a", "b"])

    def test_ls_errors(self) -> None:
        self.assertEqual(self.lines("ls .."), ["Error: path outside allowed roots"])
        self.assertEqual(self.lines("ls nope"), ["Error: no such file or directory: nope"])
        self.assertEqual(self.lines("ls blob"), ["Error: not a directory: blob"])
        self.assertEqual(self.lines("ls a b"), ["Error: usage: ls [PATH]"])

    def test_upload_temporary_files_are_neither_listed_nor_read(self) -> None:
        temp = temp_name("blob", "0123abcd")
        with open(os.path.join(self.root, "sub", temp), "wb") as f:
            f.write(b"half an upload")
        os.symlink(temp, os.path.join(self.root, "sub", "alias"))
        self.assertEqual(self.lines("ls sub"), ["alias"])
        refusal = "Error: reserved name (upload temporary files look like it): "
        self.assertEqual(self.lines(f"comphash sub/{temp}"), [refusal + f"sub/{temp}"])
        self.assertEqual(self.lines("comphash sub/alias"), [refusal + "sub/alias"])

    def test_os_error_reasons(self) -> None:
        e = files.os_error(OSError(5, "Input/output error"), "p")
        self.assertIsInstance(e, CommandError)
        self.assertEqual(e.text, "Error: input/output error: p")


class ThreadedFileCommandTests(unittest.TestCase):
    """With the real reactor and thread pool: the work really runs off the reactor thread."""

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        with open(os.path.join(self.root, "f"), "wb") as f:
            f.write(b"x" * 100)
        self.core = make_core(self.root, reactor=reactor, run_in_thread=None)
        self.ctx = make_context(self.core)

    def test_hash_runs_in_a_worker_thread(self) -> defer.Deferred[None]:
        seen: list[str] = []
        real = files.hash_file

        def spy(*args, **kwargs):
            seen.append(threading.current_thread().name)
            return real(*args, **kwargs)

        self.patch(files, "hash_file", spy)
        d = self.core.run_line(self.ctx, "comphash f")

        def check(reply):
            self.assertEqual(reply.lines,
                             [f"File hash is : {hashlib.sha256(b'x' * 100).hexdigest()}"])
            self.assertEqual(len(seen), 1)
            self.assertNotEqual(seen[0], threading.main_thread().name)

        return d.addCallback(check)

    def test_cancel_fails_at_once(self) -> None:
        d = self.core.run_line(self.ctx, "comphash f")
        d.cancel()
        self.assertEqual(self.successResultOf(d).lines, ["Error: cancelled"])
