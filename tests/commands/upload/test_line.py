"""``upload`` on the line door, driven through StringTransport (real worker threads)."""

from __future__ import annotations

import errno
import os

from twisted.internet.defer import inlineCallbacks
from twisted.python.failure import Failure
from twisted.trial import unittest

from cmdserver.commands.upload.engine import BATCH
from tests.helpers.upload import (
    LineDoorUploads,
    leftovers,
    listing,
    mac_of,
    settle,
    temp_dir,
    wait_until,
)


class LineUploadTests(LineDoorUploads, unittest.TestCase):
    def setUp(self) -> None:
        self.root = temp_dir(self)
        self.connect()

    @inlineCallbacks
    def test_good_upload_then_next_command(self):
        data = os.urandom(200_000)
        self.send(f"upload good.bin {len(data)} {mac_of(data)}\n".encode())
        yield self.wait_for("Ready for ")
        self.assertEqual(self.lines(), [f"Ready for {len(data)} bytes"])
        for i in range(0, len(data), 4096):
            self.send(data[i:i + 4096])
        self.send(b"ping\n")
        yield self.wait_for("pong")
        import hashlib
        self.assertEqual(self.lines(), [
            f"Ready for {len(data)} bytes",
            f"Upload OK good.bin {len(data)} sha256={hashlib.sha256(data).hexdigest()}",
            "pong",
        ])
        with open(os.path.join(self.root, "good.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_bytes_after_size_are_the_next_command_lines(self):
        data = b"hello\nworld\n"  # newlines inside the content are content
        self.send(f"upload x {len(data)} {mac_of(data)}\n".encode())
        yield self.wait_for("Ready for ")
        self.send(data + b"ping\nnosuch\n")
        yield self.wait_for("Command not found.")
        self.assertEqual(self.lines()[1:], [
            f"Upload OK x {len(data)} sha256=" + __import__("hashlib").sha256(data).hexdigest(),
            "pong", "Command not found."])
        with open(os.path.join(self.root, "x"), "rb") as f:
            self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_bytes_that_came_with_the_command_line(self):
        # A hasty client that does not wait for Ready: bytes without a newline
        # after the command line still reach the upload.
        data = b"12345"
        self.send(f"upload early {len(data)} {mac_of(data)}\n".encode() + data)
        yield self.wait_for("Upload OK")
        with open(os.path.join(self.root, "early"), "rb") as f:
            self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_size_zero(self):
        self.send(f"upload empty 0 {mac_of(b'')}\nping\n".encode())
        yield self.wait_for("pong")
        self.assertEqual(self.lines()[:2], ["Ready for 0 bytes", "Upload OK empty 0 sha256="
                         "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"])
        self.assertEqual(os.path.getsize(os.path.join(self.root, "empty")), 0)

    @inlineCallbacks
    def test_wrong_hmac(self):
        self.send(f"upload w 5 {mac_of(b'other')}\n".encode())
        yield self.wait_for("Ready for ")
        self.send(b"12345ping\n")
        yield self.wait_for("pong")
        self.assertEqual(self.lines(), ["Ready for 5 bytes",
                                        "Error: HMAC mismatch, upload discarded", "pong"])
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_wrong_key(self):
        self.send(f"upload w 5 {mac_of(b'12345', key=b'k' * 32)}\n".encode())
        yield self.wait_for("Ready for ")
        self.send(b"12345")
        yield self.wait_for("Error: HMAC mismatch, upload discarded")
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_truncated_stream_then_disconnect(self):
        data = os.urandom(100_000)
        self.send(f"upload t {len(data)} {mac_of(data)}\n".encode())
        yield self.wait_for("Ready for ")
        self.send(data[:60_000])
        self.assertEqual(len(leftovers(self.root)), 1)
        self.proto.connectionLost(Failure(Exception("gone")))
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_half_close_right_after_the_command_fails_at_once(self):
        # `printf 'upload f 10 MAC\n' | nc -N`: the bytes can never come.
        self.send(f"upload f 10 {mac_of(b'0123456789')}\n".encode())
        self.proto.readConnectionLost()
        yield self.wait_for("Error: ")
        self.assertEqual(self.lines(), [
            "Ready for 10 bytes",
            "Error: upload incomplete: the client closed the stream early"])
        self.assertTrue(self.transport.disconnecting)  # no wait for the idle timeout
        self.proto.connectionLost(Failure(Exception("closed")))
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_content_sent_with_the_command_then_half_close(self):
        # `printf 'upload f 5 MAC\n12345' | nc -N`: everything came before the EOF.
        data = b"12345"  # (a newline in it would end a command line: wait for Ready)
        self.send(f"upload early {len(data)} {mac_of(data)}\n".encode() + data)
        self.proto.readConnectionLost()
        yield self.wait_until_closed()
        digest = __import__("hashlib").sha256(data).hexdigest()
        self.assertEqual(self.lines()[1:], [f"Upload OK early {len(data)} sha256={digest}"])
        with open(os.path.join(self.root, "early"), "rb") as f:
            self.assertEqual(f.read(), data)

    def wait_until_closed(self):
        return wait_until(lambda: self.transport.disconnecting)

    def test_idle_timeout_in_the_middle(self):
        return self.times_out_leaving_nothing(
            f"upload slow 10 {mac_of(b'0123456789')}\n".encode(), b"01234")

    @inlineCallbacks
    def test_refusals_say_error_and_nothing_else(self):
        with open(os.path.join(self.root, "exists"), "wb") as f:
            f.write(b"keep")
        self.proto.connectionLost(Failure(Exception("replaced")))
        self.connect(max_upload=100)
        mac = mac_of(b"12345")
        cases = [
            (f"upload ../out 5 {mac}", "Error: path outside allowed roots"),
            (f"upload /etc/cmdserver-out 5 {mac}", "Error: path outside allowed roots"),
            (f"upload exists 5 {mac}", "Error: target exists: exists"),
            (f"upload big 101 {mac}", "Error: upload too large: 101 bytes (the limit is "
                                      "100 bytes)"),
            (f"upload x -5 {mac}", "Error: SIZE must be a whole number of bytes: -5"),
            (f"upload x 5e3 {mac}", "Error: SIZE must be a whole number of bytes: 5e3"),
            ("upload x 5 nothex", "Error: HMAC must be 64 hex digits (the MAC of the "
                                  "content), or - to send it after the content"),
            ("upload x 5", "Error: usage: upload NAME SIZE HMAC [--mac ALG] [--sha256]"),
            (f"upload x 5 {mac} --mac md5", "Error: mac must be one of hmac-sha256, "
                                            "blake2b, not 'md5'"),
            (f"upload nodir/x 5 {mac}", "Error: no such directory: nodir"),
        ]
        for command, error in cases:
            self.transport.clear()
            # The would-be content follows at once: it must be read as command lines.
            self.send(command.encode() + b"\n12345\n")
            yield self.wait_for("Command not found.")
            self.assertEqual(self.lines(), [error, "Command not found."], command)
        self.assertEqual(listing(self.root), ["exists"])
        self.assertFalse(os.path.exists("/etc/cmdserver-out"))

    @inlineCallbacks
    def test_disk_full_drains_the_rest_and_stays_in_step(self):
        def full(fd, buffers):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.proto.connectionLost(Failure(Exception("replaced")))
        self.connect(writer=full)
        data = os.urandom(2 * BATCH)
        self.send(f"upload full {len(data)} {mac_of(data)}\n".encode())
        yield self.wait_for("Ready for ")
        self.send(data[:BATCH])  # one whole batch goes to the disk, and fails
        yield self.wait_for("Error: disk full")
        self.send(data[BATCH:] + b"ping\n")
        yield self.wait_for("pong")
        self.assertEqual(self.lines()[1:], ["Error: disk full, upload discarded", "pong"])
        yield settle(self.uploads)
        self.assertEqual(listing(self.root), [])

    def test_slow_disk_stops_reading_from_the_client(self):
        return self.slow_disk_is_not_idleness(
            lambda data: f"upload bp {len(data)} {mac_of(data)}\n".encode(), lambda _: b"")
