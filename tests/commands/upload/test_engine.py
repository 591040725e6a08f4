"""The upload engine: temporary file, HMAC check, atomic publish, cleanup, threads."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Generator
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.trial import unittest

from cmdserver.commands.upload.engine import (
    BATCH,
    HIGH_WATER,
    NO_THREAD,
    Upload,
    check_request,
)
from cmdserver.commands.upload.spool import FLUSH_STEP, PARALLEL_MIN, remove_stale, temp_name
from cmdserver.errors import CommandError
from tests.helpers.upload import (
    context,
    leftovers,
    listing,
    mac_of,
    make_core,
    settle,
    temp_dir,
    wait_until,
)


class Producer:
    """Records what the upload asks of the door's reading side."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


def feed(upload: Upload, data: bytes, chunk: int = 65536) -> None:
    for i in range(0, len(data), chunk):
        upload.write(data[i:i + chunk])


class EngineTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = temp_dir(self)
        self.core, self.uploads = make_core(self.root)
        self.ctx = context(self.core)

    @inlineCallbacks
    def upload(self, name: str, data: bytes, mac: str | None = None, chunk: int = 65536):
        upload = yield self.uploads.begin(self.ctx, name, len(data), mac or mac_of(data))
        feed(upload, data, chunk)
        return upload

    @inlineCallbacks
    def test_good_upload_is_byte_identical(self):
        data = os.urandom(3 * (1 << 20) + 12345)
        upload = yield self.upload("good.bin", data)
        result = yield upload.done
        yield upload.closed
        with open(os.path.join(self.root, "good.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        import hashlib
        self.assertEqual(result.sha256, hashlib.sha256(data).hexdigest())
        self.assertEqual((result.name, result.size), ("good.bin", len(data)))
        self.assertEqual(leftovers(self.root), [])
        self.assertEqual(os.stat(os.path.join(self.root, "good.bin")).st_mode & 0o777, 0o600)
        self.assertEqual((self.uploads.files, self.uploads.bytes), (1, len(data)))

    @inlineCallbacks
    def test_large_upload_uses_helper_threads_and_matches(self):
        # Past PARALLEL_MIN (helper threads) and FLUSH_STEP (early writeback) twice.
        data = os.urandom(2 * FLUSH_STEP + 12345)
        upload = yield self.upload("large.bin", data, chunk=1 << 20)
        result = yield upload.done
        import hashlib
        self.assertEqual(result.sha256, hashlib.sha256(data).hexdigest())
        with open(os.path.join(self.root, "large.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_wrong_hmac_discards(self):
        data = b"payload" * 1000
        upload = yield self.upload("bad.bin", data, mac="0" * 64)
        e = yield self.assertFailure(upload.done, CommandError)
        self.assertEqual(e.text, "Error: HMAC mismatch, upload discarded")
        yield upload.closed
        self.assertEqual(listing(self.root), [])
        self.assertEqual((self.uploads.files, self.uploads.bytes), (0, 0))  # not published

    @inlineCallbacks
    def test_wrong_key_discards(self):
        data = b"payload" * 1000
        upload = yield self.upload("k.bin", data, mac=mac_of(data, key=b"x" * 32))
        yield self.assertFailure(upload.done, CommandError)
        yield upload.closed
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_size_zero(self):
        upload = yield self.uploads.begin(self.ctx, "empty", 0, mac_of(b""))
        result = yield upload.done
        self.assertEqual(result.size, 0)
        self.assertEqual(os.path.getsize(os.path.join(self.root, "empty")), 0)
        self.assertEqual(leftovers(self.root), [])

    @inlineCallbacks
    def test_temp_file_is_hidden_0600_in_target_directory(self):
        os.mkdir(os.path.join(self.root, "sub"))
        upload = yield self.uploads.begin(self.ctx, "sub/x", 10, mac_of(b"0123456789"))
        [tmp] = leftovers(self.root)
        self.assertEqual(os.path.dirname(tmp), os.path.join(self.root, "sub"))
        self.assertTrue(os.path.basename(tmp).startswith(".x.cmdserver-upload-"))
        self.assertEqual(os.stat(tmp).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(os.path.join(self.root, "sub")),
                         [os.path.basename(tmp)])
        upload.write(b"0123456789")
        yield upload.done
        self.assertEqual(os.listdir(os.path.join(self.root, "sub")), ["x"])

    @inlineCallbacks
    def test_cancel_midway_removes_temp_file(self):
        data = os.urandom(3 << 20)
        upload = yield self.uploads.begin(self.ctx, "c.bin", len(data) + 10, mac_of(data))
        feed(upload, data)
        upload.done.cancel()
        yield self.assertFailure(upload.done, CancelledError)
        yield upload.closed
        self.assertEqual(listing(self.root), [])
        self.assertEqual(self.uploads.active, set())

    @inlineCallbacks
    def test_cancel_before_the_file_exists_leaves_nothing(self):
        d = self.uploads.begin(self.ctx, "early", 5, mac_of(b"12345"))
        d.cancel()
        yield self.assertFailure(d, CancelledError)
        # The thread that creates the temporary file finishes, then removes it.
        from tests.helpers.upload import wait_until
        yield wait_until(lambda: self.core.reactor.getThreadPool().working == [])
        yield wait_until(lambda: listing(self.root) == [])

    @inlineCallbacks
    def test_disk_full_discards(self):
        def full(fd, buffers):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.core, self.uploads = make_core(self.root, writer=full)
        self.ctx = context(self.core)
        data = os.urandom(2 << 20)
        upload = yield self.upload("full.bin", data)
        e = yield self.assertFailure(upload.done, CommandError)
        self.assertEqual(e.text, "Error: disk full, upload discarded")
        yield upload.closed
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_disk_full_midway_keeps_draining_the_stream(self):
        calls = []

        def fills_up(fd, buffers):
            calls.append(1)
            if len(calls) > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return os.writev(fd, buffers)

        self.core, self.uploads = make_core(self.root, writer=fills_up)
        self.ctx = context(self.core)
        data = os.urandom(4 * BATCH)
        upload = yield self.uploads.begin(self.ctx, "f.bin", len(data), mac_of(data))
        feed(upload, data[: 2 * BATCH])  # two batches: the second one fails
        yield self.assertFailure(upload.done, CommandError)
        feed(upload, data[2 * BATCH:])  # the rest of the stream is accepted and dropped
        self.assertEqual(upload.remaining, 0)
        yield upload.closed
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_unexpected_error_is_logged_and_discards(self):
        def broken(fd, buffers):
            raise ZeroDivisionError("a bug")

        self.core, self.uploads = make_core(self.root, writer=broken)
        self.ctx = context(self.core)
        upload = yield self.upload("bug.bin", b"x" * 100)
        e = yield self.assertFailure(upload.done, CommandError)
        self.assertEqual(e.text, "Error: upload failed (see the server log), upload discarded")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        yield upload.closed
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_short_writes_are_completed(self):
        def dribble(fd, buffers):
            return os.write(fd, bytes(buffers[0][:1000]))

        self.core, self.uploads = make_core(self.root, writer=dribble)
        self.ctx = context(self.core)
        data = os.urandom(300_000)
        upload = yield self.upload("short.bin", data, chunk=7000)
        yield upload.done
        with open(os.path.join(self.root, "short.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_reactor_thread_never_writes_file_data(self):
        threads = set()

        def record(fd, buffers):
            threads.add(threading.current_thread())
            return os.writev(fd, buffers)

        self.core, self.uploads = make_core(self.root, writer=record)
        self.ctx = context(self.core)
        for size in (10, 3 << 20, 9 << 20):  # inline hashing, and with helper threads
            data = os.urandom(size)
            upload = yield self.upload(f"t{size}", data)
            yield upload.done
        self.assertTrue(threads)
        self.assertNotIn(threading.main_thread(), threads)
        self.assertIs(threading.current_thread(), threading.main_thread())

    @inlineCallbacks
    def test_back_pressure_pauses_and_resumes_the_producer(self):
        gate = threading.Event()

        def slow(fd, buffers):
            gate.wait()
            return os.writev(fd, buffers)

        self.core, self.uploads = make_core(self.root, writer=slow)
        self.ctx = context(self.core)
        data = os.urandom(HIGH_WATER + (4 << 20))
        upload = yield self.uploads.begin(self.ctx, "bp.bin", len(data), mac_of(data))
        producer = Producer()
        upload.registerProducer(producer, True)
        feed(upload, data[:HIGH_WATER])
        self.assertEqual(producer.calls, ["pause"])
        self.assertLessEqual(upload._in_flight, HIGH_WATER)
        feed(upload, data[HIGH_WATER:])  # a door may still deliver what it had read
        gate.set()
        yield upload.done
        self.assertEqual(producer.calls, ["pause", "resume"])
        with open(os.path.join(self.root, "bp.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_two_at_once_to_one_name_one_wins(self):
        a, b = os.urandom(2 << 20), os.urandom(2 << 20)
        ua = yield self.uploads.begin(self.ctx, "same", len(a), mac_of(a))
        ub = yield self.uploads.begin(self.ctx, "same", len(b), mac_of(b))
        feed(ua, a)
        feed(ub, b)
        results = []
        for u in (ua, ub):
            try:
                results.append((yield u.done))
            except CommandError as e:
                results.append(e.text)
        winners = [r for r in results if not isinstance(r, str)]
        losers = [r for r in results if isinstance(r, str)]
        self.assertEqual(len(winners), 1)
        self.assertEqual(losers, ["Error: target exists: same, upload discarded"])
        with open(os.path.join(self.root, "same"), "rb") as f:
            content = f.read()
        self.assertIn(content, (a, b))
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), ["same"])

    @inlineCallbacks
    def test_two_at_once_with_overwrite_last_one_wins_whole(self):
        self.core, self.uploads = make_core(self.root, overwrite=True)
        self.ctx = context(self.core)
        a, b = os.urandom(1 << 20), os.urandom(1 << 20)
        ua = yield self.uploads.begin(self.ctx, "same", len(a), mac_of(a))
        ub = yield self.uploads.begin(self.ctx, "same", len(b), mac_of(b))
        feed(ua, a)
        feed(ub, b)
        yield ua.done
        yield ub.done
        with open(os.path.join(self.root, "same"), "rb") as f:
            self.assertIn(f.read(), (a, b))
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), ["same"])

    @inlineCallbacks
    def test_overwrite_replaces_an_existing_file(self):
        self.core, self.uploads = make_core(self.root, overwrite=True)
        self.ctx = context(self.core)
        with open(os.path.join(self.root, "old"), "wb") as f:
            f.write(b"old content")
        upload = yield self.upload("old", b"new")
        yield upload.done
        with open(os.path.join(self.root, "old"), "rb") as f:
            self.assertEqual(f.read(), b"new")

    @inlineCallbacks
    def test_abort_all_cleans_up(self):
        data = os.urandom(1 << 20)
        uploads = []
        for i in range(3):
            u = yield self.uploads.begin(self.ctx, f"a{i}", len(data) * 2, mac_of(data))
            feed(u, data)
            uploads.append(u)
        yield self.uploads.abort_all()
        for u in uploads:
            self.assertFailure(u.done, CancelledError)
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_a_users_own_key_replaces_the_server_key(self):
        alice_key = b"a" * 32
        self.uploads.user_keys = lambda user: alice_key if user == "alice" else None
        self.assertEqual(self.uploads.key_for("alice"), alice_key)
        self.assertEqual(self.uploads.key_for("bob"), self.uploads.server_key)
        from cmdserver.commands.base import Context
        alice = Context(self.core, user="alice", peer="test", door="test")
        data = b"from alice"
        bad = yield self.uploads.begin(alice, "a1", len(data), mac_of(data))
        bad.write(data)
        yield self.assertFailure(bad.done, CommandError)
        good = yield self.uploads.begin(alice, "a2", len(data), mac_of(data, alice_key))
        good.write(data)
        yield good.done
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), ["a2"])

    @inlineCallbacks
    def test_a_door_without_a_byte_stream_is_refused(self):
        reply = yield self.core.run_line(self.ctx, f"upload x 1 {mac_of(b'x')}")
        self.assertEqual(reply.lines, ["Error: upload needs a door that can stream raw bytes"])
        self.assertEqual(listing(self.root), [])

    def test_more_bytes_than_announced_are_refused(self):
        d = self.uploads.begin(self.ctx, "x", 3, mac_of(b"abc"))

        def check(upload):
            self.assertRaises(ValueError, upload.write, b"abcd")
            upload.write(b"abc")
            return upload.done

        return d.addCallback(check)


class RefusalTests(unittest.TestCase):
    """Every refusal: a one-line error, and nothing created."""

    def setUp(self) -> None:
        self.root = temp_dir(self)
        with open(os.path.join(self.root, "exists"), "wb") as f:
            f.write(b"keep me")
        os.mkdir(os.path.join(self.root, "dir"))
        self.core, self.uploads = make_core(self.root, max_upload=1000)
        self.ctx = context(self.core)

    @inlineCallbacks
    def refused(self, name: str, size: int = 5,
                mac: str | None = None) -> Generator[Deferred[Any], Any, str]:
        try:
            yield self.uploads.begin(self.ctx, name, size, mac or mac_of(b"12345"))
        except CommandError as e:
            self.assertEqual(sorted(os.listdir(self.root)), ["dir", "exists"])
            self.assertEqual(os.listdir(os.path.join(self.root, "dir")), [])
            with open(os.path.join(self.root, "exists"), "rb") as f:
                self.assertEqual(f.read(), b"keep me")
            return e.text
        self.fail("the upload was not refused")

    @inlineCallbacks
    def test_dot_dot_outside_the_jail(self):
        text = yield self.refused("../escape")
        self.assertEqual(text, "Error: path outside allowed roots")
        self.assertFalse(os.path.exists(os.path.join(os.path.dirname(self.root), "escape")))

    @inlineCallbacks
    def test_absolute_path_outside_the_jail(self):
        text = yield self.refused("/tmp/cmdserver-upload-escape")
        self.assertEqual(text, "Error: path outside allowed roots")
        self.assertFalse(os.path.exists("/tmp/cmdserver-upload-escape"))

    @inlineCallbacks
    def test_symlink_out_of_the_jail(self):
        outside = temp_dir(self)
        os.symlink(outside, os.path.join(self.root, "dir", "link"))
        try:
            yield self.uploads.begin(self.ctx, "dir/link/x", 5, mac_of(b"12345"))
        except CommandError as e:
            self.assertEqual(e.text, "Error: path outside allowed roots")
        else:
            self.fail("not refused")
        self.assertEqual(os.listdir(outside), [])

    @inlineCallbacks
    def test_absolute_path_inside_the_jail_is_fine(self):
        upload = yield self.uploads.begin(self.ctx, os.path.join(self.root, "abs"), 5,
                                          mac_of(b"12345"))
        upload.write(b"12345")
        yield upload.done
        self.assertTrue(os.path.exists(os.path.join(self.root, "abs")))

    @inlineCallbacks
    def test_target_exists(self):
        text = yield self.refused("exists")
        self.assertEqual(text, "Error: target exists: exists")

    @inlineCallbacks
    def test_target_is_a_directory(self):
        self.assertEqual((yield self.refused("dir")), "Error: is a directory: dir")
        self.assertEqual((yield self.refused(".")), "Error: is a directory: .")

    @inlineCallbacks
    def test_missing_directory(self):
        self.assertEqual((yield self.refused("nosuch/x")), "Error: no such directory: nosuch")

    @inlineCallbacks
    def test_trailing_slash(self):
        self.assertEqual((yield self.refused("dir/")), "Error: not a file name: dir/")

    @inlineCallbacks
    def test_over_max_size(self):
        text = yield self.refused("big", size=1001)
        self.assertEqual(text, "Error: upload too large: 1001 bytes (the limit is 1000 bytes)")

    @inlineCallbacks
    def test_not_enough_disk_space(self):
        self.core, self.uploads = make_core(self.root, max_upload=1 << 62)
        self.ctx = context(self.core)
        text = yield self.refused("huge", size=1 << 61)
        self.assertTrue(text.startswith("Error: not enough disk space: "
                                        f"{1 << 61} bytes needed, "), text)

    @inlineCallbacks
    def test_bad_hmac_text(self):
        for mac in ("abc", "g" * 64, "0" * 63, "0" * 65):
            text = yield self.refused("x", mac=mac)
            self.assertEqual(text, "Error: HMAC must be 64 hex digits (the MAC of the "
                                   "content), or - to send it after the content")

    @inlineCallbacks
    def test_name_too_long(self):
        long = "\u00e9" * 128  # 256 bytes in UTF-8
        self.assertEqual((yield self.refused(long)), f"Error: file name too long: {long}")

    @inlineCallbacks
    def test_name_of_a_temporary_file_is_reserved(self):
        name = temp_name("x", "deadbeef")
        text = yield self.refused(name)
        self.assertEqual(text, "Error: reserved name (upload temporary files look like it): "
                               + name)

    @inlineCallbacks
    def test_long_utf8_name_gets_a_legal_temporary_name(self):
        name = "\u00e9" * 120  # 240 bytes: legal, but not with the temporary decoration
        upload = yield self.uploads.begin(self.ctx, name, 3, mac_of(b"abc"))
        [tmp] = leftovers(self.root)
        self.assertLessEqual(len(os.fsencode(os.path.basename(tmp))), 255)
        upload.write(b"abc")
        yield upload.done
        self.assertEqual(listing(self.root), sorted(["dir", "exists", name]))

    def test_check_request(self):
        self.assertEqual(check_request("x", 0, "ab" * 32, 10), b"\xab" * 32)
        for args in (("", 1), ("x", -1), ("x", True), ("a\0b", 1), ("x", 11)):
            self.assertRaises(CommandError, check_request, args[0], args[1], "ab" * 32, 10)


class StaleFileTests(unittest.TestCase):
    def test_removes_only_other_runs_temporary_files(self):
        root = temp_dir(self)
        os.makedirs(os.path.join(root, "a", "b"))
        stale = [os.path.join(root, temp_name("x", "deadbeef")),
                 os.path.join(root, "a", "b", temp_name("y z", "00000000"))]
        mine = os.path.join(root, "a", temp_name("w", "12345678"))
        others = [os.path.join(root, "x"), os.path.join(root, ".x.cmdserver-upload-nothex")]
        for path in stale + [mine] + others:
            with open(path, "wb") as f:
                f.write(b"partial")
        os.symlink("/etc/passwd", os.path.join(root, temp_name("s", "deadbeef")))
        removed = remove_stale([root], "12345678")
        self.assertEqual(sorted(removed), sorted(stale))
        for path in [mine] + others:
            self.assertTrue(os.path.exists(path))
        self.assertTrue(os.path.exists("/etc/passwd"))


class NoThreadTests(unittest.TestCase):
    """The system is out of threads: the upload fails with one line and leaves nothing
    (no temporary file, no descriptor, no thread) behind."""

    @inlineCallbacks
    def setUp(self):  # type: ignore[override]  # trial waits on a returned Deferred
        self.root = temp_dir(self)
        self.core, self.uploads = make_core(self.root)
        self.ctx = context(self.core)
        yield self.core.in_thread(lambda: None, ctx=self.ctx)  # the reactor's waker is made
        self.fds = len(os.listdir("/proc/self/fd"))
        self.threads = threading.active_count()

    def refuse_threads(self, prefix: str) -> None:
        start = threading.Thread.start

        def refusing(thread: threading.Thread) -> None:
            if thread.name.startswith(prefix):
                raise RuntimeError("can't start new thread")
            start(thread)

        self.patch(threading.Thread, "start", refusing)

    def assertNothingLeft(self) -> None:
        self.assertEqual(leftovers(self.root), [])
        self.assertEqual(listing(self.root), [])
        self.assertEqual(len(os.listdir("/proc/self/fd")), self.fds)

    @inlineCallbacks
    def test_the_upload_worker_cannot_start(self):
        self.refuse_threads("upload ")
        e = yield self.assertFailure(self.uploads.begin(self.ctx, "f", 3, mac_of(b"abc")),
                                     CommandError)
        self.assertEqual(str(e), NO_THREAD)
        yield wait_until(lambda: len(os.listdir("/proc/self/fd")) <= self.fds)
        self.assertNothingLeft()
        self.assertEqual(self.uploads.active, set())

    @inlineCallbacks
    def test_a_hash_thread_cannot_start(self):
        self.refuse_threads("upload-hmac")
        data = os.urandom(PARALLEL_MIN + 4096)  # large enough for the hash threads
        upload = yield self.uploads.begin(self.ctx, "big", len(data), mac_of(data))
        feed(upload, data, 1 << 20)
        e = yield self.assertFailure(upload.done, CommandError)
        self.assertEqual(str(e), "upload failed (see the server log), upload discarded")
        yield upload.closed
        self.assertNothingLeft()
        self.flushLoggedErrors(RuntimeError)
        yield wait_until(lambda: threading.active_count() <= self.threads)
