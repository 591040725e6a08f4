"""Shared pieces for the upload tests: a core with the upload command, MACs, waiting."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from cmdserver.commands import default_registry
from cmdserver.commands.base import Context, ListSink
from cmdserver.commands.lastlog import LogSource
from cmdserver.commands.upload.command import UploadCommand
from cmdserver.commands.upload.engine import HIGH_WATER, Uploads, UploadSettings
from cmdserver.commands.upload.spool import TEMP_MARK
from cmdserver.core import CommandCore
from cmdserver.doors.idle import IdleClock
from cmdserver.doors.line.protocol import LineProtocol, LineSettings
from cmdserver.policy import Policy

KEY = bytes(range(32))


def temp_dir(test) -> str:
    """A fresh directory for one test, removed after it (outside the work tree)."""
    path = os.path.realpath(tempfile.mkdtemp(prefix="cmdserver-upload-test-"))
    test.addCleanup(shutil.rmtree, path, True)
    return path


def mac_of(data: bytes, key: bytes = KEY) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def make_core(root: str, writer: Callable | None = None, max_upload: int = 1 << 30,
              overwrite: bool = False) -> tuple[CommandCore, Uploads]:
    """A real core (global reactor, real thread pool) with the upload command."""
    uploads = Uploads(UploadSettings(max_upload, overwrite), KEY,
                      **({"writer": writer} if writer is not None else {}))
    registry = default_registry(LogSource(os.devnull))
    registry.add(UploadCommand(uploads))
    return CommandCore(registry, Policy([root]), reactor), uploads


def context(core: CommandCore) -> Context:
    return Context(core, user="anonymous", peer="test", door="test", out=ListSink())


def leftovers(root: str) -> list[str]:
    """Every temporary upload file under ``root``."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if TEMP_MARK in f]
    return found


def listing(root: str) -> list[str]:
    return sorted(os.listdir(root))


@inlineCallbacks
def wait_until(predicate: Callable[[], bool],
               limit: float = 20.0) -> Generator[Deferred[Any], Any, None]:
    """Let the reactor run until ``predicate()`` holds (a safety net, not a timing test)."""
    waited = 0.0
    while not predicate():
        if waited > limit:
            raise AssertionError("condition never became true")
        yield task.deferLater(reactor, 0.005, lambda: None)
        waited += 0.005


@inlineCallbacks
def settle(uploads: Uploads) -> Generator[Deferred[Any], Any, None]:
    """Wait until every upload in flight has finished and cleaned up."""
    yield wait_until(lambda: not uploads.active)


class LineDoorUploads:
    """A line-door connection over StringTransport to a core with the upload
    command and real worker threads, its idle timer on a fake clock (a trial
    TestCase mix-in: ``connect`` in setUp, the uploads settled in tearDown)."""

    root: str

    def connect(self, writer: Callable | None = None, idle_timeout: float = 300,
                max_upload: int = 1 << 30) -> None:
        self.core, self.uploads = make_core(self.root, writer=writer, max_upload=max_upload)
        self.clock = task.Clock()
        self.proto = LineProtocol(self.core, LineSettings(idle_timeout=idle_timeout,
                                                          greeting=""),
                                  IdleClock(self.clock, idle_timeout))
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def reconnect(self, **kwargs: Any) -> None:
        self.proto.connectionLost(Failure(Exception("replaced")))
        self.connect(**kwargs)

    def lines(self) -> list[str]:
        return self.transport.value().decode().split("\r\n")[:-1]

    def send(self, data: bytes) -> None:
        self.proto.dataReceived(data)

    def wait_for(self, line: str) -> Deferred[None]:
        return wait_until(lambda: any(x.startswith(line) for x in self.lines()))

    @inlineCallbacks
    def times_out_leaving_nothing(self, command: bytes, content: bytes
                                  ) -> Generator[Deferred[Any], Any, None]:
        """On a connection with a 30 s idle timeout, ``command`` then ``content``
        and silence: closed after 30 s, and nothing is left in the root."""
        test: Any = self
        self.reconnect(idle_timeout=30)
        self.send(command)
        yield self.wait_for("Ready for ")
        self.send(content)
        self.clock.advance(29)
        test.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        test.assertTrue(self.transport.disconnecting)
        test.assertEqual(self.lines()[-1], "Timeout: idle for 30 s, closing the connection.")
        self.proto.connectionLost(Failure(Exception("closed")))
        yield settle(self.uploads)
        test.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def slow_disk_is_not_idleness(self, command: Callable[[bytes], bytes],
                                  ending: Callable[[bytes], bytes]
                                  ) -> Generator[Deferred[Any], Any, None]:
        """While the disk is behind, reading stops (the transport is paused) and the
        30 s idle timeout does not count: the client is not idle, we are.
        ``command(data)`` is the upload's line, ``ending(data)`` what follows the content."""
        test: Any = self
        gate = threading.Event()
        test.addCleanup(gate.set)  # a failed test must not leave the writer waiting

        def slow(fd: int, buffers: Any) -> int:
            gate.wait()
            return os.writev(fd, buffers)

        self.reconnect(writer=slow, idle_timeout=30)
        data = os.urandom(HIGH_WATER + (1 << 20))
        self.send(command(data))
        yield self.wait_for("Ready for ")
        self.send(data[:HIGH_WATER])
        test.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(60)  # waiting for our own disk is not the client's idleness
        test.assertFalse(self.transport.disconnecting)
        gate.set()
        yield wait_until(lambda: self.transport.producerState == "producing")
        self.send(data[HIGH_WATER:] + ending(data))
        yield self.wait_for("Upload OK")
        with open(os.path.join(self.root, "bp"), "rb") as f:
            test.assertEqual(f.read(), data)

    def tearDown(self) -> Any:
        if self.proto._connected:
            self.proto.connectionLost(Failure(Exception("test over")))
        return settle(self.uploads)
