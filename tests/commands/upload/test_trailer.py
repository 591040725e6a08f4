"""``upload NAME SIZE -``: the MAC after the content, on the line door and in the engine."""

from __future__ import annotations

import errno
import hashlib
import os

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from cmdserver.commands.upload.engine import BATCH
from cmdserver.commands.upload.mac import trailer_line
from cmdserver.commands.upload.spool import PARALLEL_MIN, TrailerUploadResult
from tests.helpers.upload import (
    KEY,
    LineDoorUploads,
    context,
    leftovers,
    listing,
    mac_of,
    make_core,
    settle,
    temp_dir,
    wait_until,
)


def trailer(data: bytes, key: bytes = KEY) -> bytes:
    return trailer_line(bytes.fromhex(mac_of(data, key)))


class LineTrailerTests(LineDoorUploads, unittest.TestCase):
    def setUp(self) -> None:
        self.root = temp_dir(self)
        self.connect()

    @inlineCallbacks
    def test_content_then_trailer_in_small_pieces(self):
        data = os.urandom(200_000)
        self.send(f"upload t.bin {len(data)} -\n".encode())
        yield self.wait_for("Ready for ")
        stream = data + trailer(data) + b"ping\n"
        for i in range(0, len(stream), 4093):  # pieces that cut the trailer anywhere
            self.send(stream[i:i + 4093])
        yield self.wait_for("pong")
        self.assertEqual(self.lines(), [f"Ready for {len(data)} bytes",
                                        f"Upload OK t.bin {len(data)} "
                                        f"mac=hmac-sha256:{mac_of(data)}", "pong"])

    def test_idle_timeout_while_the_trailer_is_awaited(self):
        return self.times_out_leaving_nothing(b"upload slow 5 -\n", b"12345")  # then nothing

    def test_slow_disk_is_not_idleness_while_the_content_comes(self):
        return self.slow_disk_is_not_idleness(
            lambda data: f"upload bp {len(data)} -\n".encode(), trailer)

    @inlineCallbacks
    def disk_full_half_way(self):
        """A trailer-form upload whose disk fills after its first batch: the
        error is out, the rest of the content and the trailer are still to come."""
        def full(fd, buffers):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.reconnect(writer=full)
        data = os.urandom(2 * BATCH)
        self.send(f"upload full {len(data)} -\n".encode())
        yield self.wait_for("Ready for ")
        self.send(data[:BATCH])
        yield self.wait_for("Error: disk full")
        return data

    @inlineCallbacks
    def test_disk_full_the_trailer_is_still_taken_off_the_stream(self):
        data = yield self.disk_full_half_way()
        self.send(data[BATCH:] + trailer(data) + b"ping\n")
        yield self.wait_for("pong")
        # The trailer line was the upload's: never run as a command.
        self.assertEqual(self.lines()[1:], ["Error: disk full, upload discarded", "pong"])
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_a_file_that_grew_runs_nothing_after_the_bad_trailer(self):
        # `(cat f; echo "MAC …") | nc`, f longer than SIZE by the time it is read: the
        # first extra line fails the upload; the rest of the file must not run as
        # commands under the user's login. One error line, then the connection closes.
        data = b"12345"
        grown = data + b"67\nping\nupload evil 0 -\nMAC " + mac_of(b"").encode() + b"\n"
        self.send(f"upload grew {len(data)} -\n".encode())
        yield self.wait_for("Ready for ")
        self.send(grown + trailer(data) + b"ping\n")
        yield self.wait_for("Error: ")
        self.assertEqual(self.lines(), [
            "Ready for 5 bytes",
            "Error: expected the trailer line 'MAC <64 hex digits>' after the content, "
            "upload discarded"])
        self.assertTrue(self.transport.disconnecting)
        self.send(b"ping\n")  # until the transport is gone, nothing runs either
        self.assertEqual(len(self.lines()), 2)
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_a_bad_trailer_after_a_disk_error_closes_too(self):
        data = yield self.disk_full_half_way()
        self.send(data[BATCH:] + b"extra\nping\n" + trailer(data))
        self.assertEqual(self.lines()[1:], ["Error: disk full, upload discarded"])
        self.assertTrue(self.transport.disconnecting)
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_everything_before_ready_then_half_close(self):
        # `printf 'upload f 5 -\n12345MAC …' | nc -N`: the content and the trailer (no
        # newline in the content) came with the command line, then the FIN.
        data = b"12345"
        self.send(b"upload early 5 -\n" + data + trailer(data).rstrip(b"\n"))
        self.proto.readConnectionLost()
        yield wait_until(lambda: self.transport.disconnecting)
        self.assertEqual(self.lines()[1:], [f"Upload OK early 5 mac=hmac-sha256:{mac_of(data)}"])

    @inlineCallbacks
    def test_half_close_right_after_the_command(self):
        self.send(b"upload f 0 -\n")
        self.proto.readConnectionLost()
        yield self.wait_for("Error: ")
        self.assertEqual(self.lines(), ["Ready for 0 bytes", "Error: upload incomplete: the "
                                        "client closed the stream before the MAC trailer"])
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), [])


class EngineTrailerTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = temp_dir(self)
        self.core, self.uploads = make_core(self.root)
        self.ctx = context(self.core)

    def tearDown(self):
        return settle(self.uploads)

    @inlineCallbacks
    def test_each_byte_is_hashed_once_per_digest_asked_for(self):
        data = os.urandom(PARALLEL_MIN + 12345)  # large: each digest in its own thread
        for name, mac_hex, sha256, threads in [
                ("trailer", "-", False, ["upload-hmac"]),
                ("trailer-sha", "-", True, ["upload-hmac", "upload-sha256"]),
                ("header", mac_of(data), False, ["upload-hmac", "upload-sha256"]),
                ("b2", "-", False, ["upload-blake2b"])]:
            algorithm = "blake2b" if name == "b2" else "hmac-sha256"
            upload = yield self.uploads.begin(self.ctx, name, len(data), mac_hex, algorithm,
                                              sha256)
            self.assertEqual([h._label for h in upload.spool._helpers], threads, name)
            upload.write(data)
            if mac_hex == "-":
                if algorithm == "blake2b":
                    upload.finish(hashlib.blake2b(data, key=KEY, digest_size=32).digest())
                else:
                    upload.finish(bytes.fromhex(mac_of(data)))
            result = yield upload.done
            if mac_hex == "-":
                self.assertIsInstance(result, TrailerUploadResult)
                self.assertEqual(result.sha256,
                                 hashlib.sha256(data).hexdigest() if sha256 else None)
            else:
                self.assertEqual(result.sha256, hashlib.sha256(data).hexdigest())
        self.assertEqual(listing(self.root), ["b2", "header", "trailer", "trailer-sha"])

    @inlineCallbacks
    def test_small_uploads_hash_only_what_is_asked_for_too(self):
        upload = yield self.uploads.begin(self.ctx, "small", 5, "-")
        self.assertIsNone(upload.spool._sha)
        upload.write(b"12345")
        upload.trailer(trailer(b"12345").rstrip(b"\n"))
        result = yield upload.done
        self.assertEqual(result, TrailerUploadResult("small", 5,
                                                     f"hmac-sha256:{mac_of(b'12345')}", None))

    @inlineCallbacks
    def test_finish_only_once_and_only_after_the_content(self):
        upload = yield self.uploads.begin(self.ctx, "f", 5, "-")
        self.assertRaises(ValueError, upload.finish, b"\0" * 32)  # 5 bytes still missing
        upload.write(b"12345")
        upload.finish(b"\0" * 32)
        upload.finish(bytes.fromhex(mac_of(b"12345")))  # the first one counts
        yield self.assertFailure(upload.done, Exception)
        yield upload.closed
        self.assertEqual((listing(self.root), leftovers(self.root)), ([], []))
        header = yield self.uploads.begin(self.ctx, "g", 0, mac_of(b""))
        self.assertRaises(ValueError, header.finish, b"\0" * 32)  # its MAC came first
        yield header.done
