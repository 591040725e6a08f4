"""The fast paths of an upload: page-aligned blocks, socket reads into them, hash threads.

An upload's bytes are copied once, by the kernel, from the socket into a
:class:`Block` (``recv_into``, see :func:`direct_reads`); the hash threads read
them there and the disk write takes them from there (``O_DIRECT``).  Doors that
cannot read into a block (TLS, SSH, PB) copy into one with ``Upload.write``.
"""

from __future__ import annotations

import mmap
import queue
import threading
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import main
from twisted.internet.tcp import Connection
from twisted.protocols.policies import ProtocolWrapper

from cmdserver.workers import background

RAW_READ_SIZE = 1 << 20  # socket reads while an upload streams in (without direct reads)


class BlockSink(Protocol):
    """What :func:`direct_reads` fills: an upload's free space, then how much was put."""

    def read_into(self) -> memoryview: ...

    def commit(self, n: int) -> None: ...


def widen_reads(transport: Any, size: int = RAW_READ_SIZE) -> Callable[[], None]:
    """Let the socket transport under ``transport`` read ``size`` bytes at a time.

    Twisted's TCP transport reads 64 KiB per call; for a bulk upload 1 MiB reads
    halve the reactor's work per byte.  Follows the ``transport`` chain through
    wrappers (connection limits, TLS) to the one with a ``bufferSize``; returns
    a function that restores the default.
    """
    while transport is not None:
        if isinstance(getattr(type(transport), "bufferSize", None), int):
            transport.bufferSize = size
            return lambda: vars(transport).pop("bufferSize", None)
        transport = vars(transport).get("transport") if hasattr(transport, "__dict__") else None
    return lambda: None


def direct_reads(transport: Any, protocol: Any, consumer: BlockSink,
                 received: Callable[[], None]) -> Callable[[], None] | None:
    """Read the socket under ``transport`` straight into ``consumer``'s blocks.

    Replaces the TCP transport's ``doRead`` for the rest of the upload: each
    read is a ``recv_into`` the space :meth:`Upload.read_into` gives, never
    more than the upload still expects (later bytes stay in the socket for the
    line reader), then :meth:`Upload.commit` and ``received()`` (the door resets
    its idle timer and leaves raw mode after the last byte).  Only when every
    wrapper between the socket and ``protocol`` passes bytes through untouched
    (connection limits do; TLS does not): returns None otherwise, or a function
    that restores the transport's own reads.
    """
    tcp = transport
    while not isinstance(tcp, Connection):
        tcp = getattr(tcp, "transport", None)
        if tcp is None:
            return None
    wrapper = tcp.protocol
    while wrapper is not protocol:
        if (not isinstance(wrapper, ProtocolWrapper)
                or type(wrapper).dataReceived is not ProtocolWrapper.dataReceived):
            return None
        wrapper = wrapper.wrappedProtocol
    sock = tcp.socket

    def doRead() -> Exception | None:
        try:
            n = sock.recv_into(consumer.read_into())
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        consumer.commit(n)
        received()
        return None

    # Replaced on this one connection on purpose; the returned function restores it.
    tcp.doRead = doRead  # type: ignore[method-assign,assignment]
    return lambda: vars(tcp).pop("doRead", None)


class Block:
    """A page-aligned buffer (an anonymous mapping) for the bytes of an upload.

    The door's socket reads fill it in place and direct writes take it from
    there: the bytes are copied once, out of the socket.  ``fill`` bytes are used.
    """

    __slots__ = ("fill", "view")

    def __init__(self, size: int) -> None:
        self.view = memoryview(mmap.mmap(-1, size))
        self.fill = 0


def name_thread(label: str) -> None:
    """Give the calling thread a name ``top -H`` and /proc show (Linux; best effort)."""
    try:
        with open("/proc/thread-self/comm", "w") as f:
            f.write(label[:15])
    except OSError:
        pass


class Countdown:
    """Calls ``then`` once ``count`` threads have called it: all are done with a block."""

    __slots__ = ("_count", "_lock", "_then")

    def __init__(self, count: int, then: Callable[[], None]) -> None:
        self._count = count
        self._then = then
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self._count -= 1
            last = not self._count
        if last:
            self._then()


class HashThread:
    """Feeds one hash beside the worker that writes, at its own pace.

    hashlib and hmac release the GIL on large buffers, so the threads really run
    in parallel.  Each keeps its own queue of blocks: when one of the three
    (this hash, the other, the writer) is held up for a moment, the others go
    on with the blocks already received instead of waiting for it.

    The thread starts with the first block, in the upload's worker thread: a
    system out of threads then fails that upload's worker, which removes the
    temporary file, rather than the spool's creation, which would leave it.
    """

    def __init__(self, digest: Any, label: str) -> None:
        self.digest = digest
        self.error: BaseException | None = None  # the digest is unusable if set
        self._label = label
        self._inbox: queue.SimpleQueue[tuple[Any, Callable[[], None]] | None] = (
            queue.SimpleQueue())
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        name_thread(self._label)
        while (item := self._inbox.get()) is not None:
            data, then = item
            try:
                if data is not None and self.error is None:
                    self.digest.update(data)
            except BaseException as e:  # reported by drain(); the thread goes on
                self.error = e
            finally:
                then()

    def start(self, data: memoryview, then: Callable[[], None]) -> None:
        """Hash ``data`` after the blocks before it, then call ``then``; raises
        ``RuntimeError`` if the thread cannot start (nothing taken then)."""
        if self._thread is None:
            thread = threading.Thread(target=background(self._run), name=self._label,
                                      daemon=True)
            thread.start()
            self._thread = thread
        self._inbox.put((data, then))

    def drain(self) -> None:
        """Wait until every block given so far is hashed; raise what hashing raised."""
        if self._thread is None:
            return  # given nothing
        done = threading.Event()
        self._inbox.put((None, done.set))
        done.wait()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self._inbox.put(None)
