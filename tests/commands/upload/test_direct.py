"""The fast upload path: socket reads into blocks, and O_DIRECT writes with their fallbacks."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from functools import partial

from twisted.internet import main
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.tcp import Connection
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial import unittest

from cmdserver.commands.upload.engine import BATCH
from cmdserver.commands.upload.spool import DIRECT_MIN, O_DIRECT
from cmdserver.commands.upload.stream import direct_reads
from tests.helpers.upload import context, leftovers, mac_of, make_core, temp_dir


def direct_io_works(directory: str) -> bool:
    try:
        fd = os.open(os.path.join(directory, "probe"), os.O_WRONLY | os.O_CREAT | O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    os.unlink(os.path.join(directory, "probe"))
    return bool(O_DIRECT)


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & O_DIRECT)


class DirectWriteTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = temp_dir(self)
        if not direct_io_works(self.root):
            raise unittest.SkipTest("no O_DIRECT on the temporary directory's filesystem")
        self.writes: list[tuple[bool, int]] = []

    @inlineCallbacks
    def upload(self, data: bytes, writer=None):
        def record(fd, buffers):
            self.writes.append((is_direct(fd), sum(map(len, buffers))))
            return (writer or os.writev)(fd, buffers)

        core, uploads = make_core(self.root, writer=record)
        upload = yield uploads.begin(context(core), "f.bin", len(data), mac_of(data))
        for i in range(0, len(data), 1 << 20):
            upload.write(data[i:i + (1 << 20)])
        result = yield upload.done
        yield upload.closed
        with open(os.path.join(self.root, "f.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(leftovers(self.root), [])
        return result

    @inlineCallbacks
    def test_large_upload_goes_direct_but_its_short_tail(self):
        yield self.upload(os.urandom(DIRECT_MIN + 3 * BATCH + 123))
        *blocks, (tail_direct, tail) = self.writes
        self.assertTrue(blocks)
        self.assertEqual(blocks, [(True, BATCH)] * len(blocks))
        self.assertEqual((tail_direct, tail), (False, 123))

    @inlineCallbacks
    def test_small_upload_goes_through_the_page_cache(self):
        yield self.upload(os.urandom(3 * BATCH + 5))
        self.assertEqual({direct for direct, _ in self.writes}, {False})

    @inlineCallbacks
    def test_refused_direct_write_falls_back_to_buffered(self):
        def refuse(fd, buffers):
            if is_direct(fd):
                raise OSError(errno.EINVAL, "Invalid argument")
            return os.writev(fd, buffers)

        yield self.upload(os.urandom(DIRECT_MIN + 777), refuse)
        self.assertEqual(self.writes[0][0], True)  # tried once, then buffered throughout
        self.assertEqual({direct for direct, _ in self.writes[1:]}, {False})

    @inlineCallbacks
    def test_short_direct_write_continues_buffered(self):
        def short(fd, buffers):
            if not is_direct(fd):
                return os.writev(fd, buffers)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~O_DIRECT)
            try:
                return os.write(fd, bytes(buffers[0][:1000]))  # leaves the offset unaligned
            finally:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)

        yield self.upload(os.urandom(DIRECT_MIN + 4096), short)
        self.assertEqual(self.writes[0], (True, BATCH))
        self.assertEqual({direct for direct, _ in self.writes[1:]}, {False})


class Sink:
    """What direct_reads needs of an upload: read_into and commit."""

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.remaining = size
        self.got = 0

    def read_into(self) -> memoryview:
        return memoryview(self.buffer)[self.got:]

    def commit(self, n: int) -> None:
        self.got += n
        self.remaining -= n


class Counting(ProtocolWrapper):
    """A wrapper that does something with the bytes: reads must go through it."""

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)


class DirectReadTests(unittest.TestCase):
    def setUp(self) -> None:
        self.ours, self.peer = socket.socketpair()
        self.ours.setblocking(False)
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)
        self.protocol = Protocol()
        self.received: list[int] = []

    def connection(self, wrapper_class=ProtocolWrapper) -> Connection:
        conn = Connection.__new__(Connection)  # only what direct_reads uses
        conn.socket = self.ours
        conn.protocol = wrapper_class(WrappingFactory(None), self.protocol)
        return conn

    def install(self, conn, sink):
        return direct_reads(conn, self.protocol, sink, lambda: self.received.append(sink.got))

    def test_reads_no_more_than_expected_and_restores(self):
        conn, sink = self.connection(), Sink(10)
        restore = self.install(conn, sink)
        self.assertIsNotNone(restore)
        self.peer.sendall(b"0123456789next line\n")
        self.assertIsNone(conn.doRead())
        self.assertEqual((bytes(sink.buffer), self.received), (b"0123456789", [10]))
        restore()
        self.assertNotIn("doRead", vars(conn))
        self.assertEqual(self.ours.recv(100), b"next line\n")  # left for the line reader

    def test_nothing_to_read_and_end_of_stream(self):
        conn, sink = self.connection(), Sink(10)
        self.install(conn, sink)
        self.assertIsNone(conn.doRead())  # EAGAIN: wait for the next event
        self.assertEqual(self.received, [])
        self.peer.shutdown(socket.SHUT_WR)
        self.assertIs(conn.doRead(), main.CONNECTION_DONE)

    def test_not_through_a_wrapper_that_handles_bytes(self):
        conn = self.connection(Counting)
        self.assertIsNone(self.install(conn, Sink(10)))
        self.assertNotIn("doRead", vars(conn))

    def test_not_without_a_socket_transport(self):
        self.assertIsNone(self.install(StringTransport(), Sink(10)))



class HashThreadTests(unittest.TestCase):
    def test_blocks_are_hashed_in_order_and_each_is_released(self):
        import hashlib

        from cmdserver.commands.upload.stream import HashThread

        digest = hashlib.sha256()
        thread = HashThread(digest, "test-hash")
        self.addCleanup(thread.stop)
        released: list[int] = []
        parts = [os.urandom(5000) for _ in range(20)]
        for i, part in enumerate(parts):
            thread.start(memoryview(part), partial(released.append, i))
        thread.drain()
        self.assertEqual(released, list(range(20)))
        self.assertEqual(digest.hexdigest(), hashlib.sha256(b"".join(parts)).hexdigest())

    def test_a_failing_hash_is_reported_and_releases_its_blocks(self):
        from cmdserver.commands.upload.stream import HashThread

        class Broken:
            def update(self, data):
                raise ValueError("broken digest")

        thread = HashThread(Broken(), "test-hash")
        self.addCleanup(thread.stop)
        released: list[int] = []
        for i in range(3):
            thread.start(memoryview(b"x"), partial(released.append, i))
        self.assertRaises(ValueError, thread.drain)
        self.assertEqual(released, [0, 1, 2])
