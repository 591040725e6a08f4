"""The Python client for cmdserver's Perspective Broker door.

With a running reactor::

    session = yield connect("127.0.0.1", 9876, "ops", password)
    lines = yield session.lastlog(20, on_line=print)   # streamed as they come
    digest = yield session.comphash("notes.txt")
    yield session.close()

Without one (scripts)::

    with connect_blocking("127.0.0.1", 9876, "ops", password) as session:
        print(session.ls("."))

Every method returns a Deferred (or, blocking, the value) or fails with a
:class:`RemoteError` subclass carrying the server's one-line message.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, cast

from twisted.internet import defer, error, threads
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, clientFromString
from twisted.internet.interfaces import ITCPTransport
from twisted.python.failure import Failure
from twisted.spread import pb

from cmdserver.commands.upload.key import parse_key
from cmdserver.commands.upload.mac import HMAC_SHA256, new_mac

__all__ = [
    "BlockingSession", "CommandTimedOut", "ConnectionClosed", "LoginError",
    "RemoteCommandError", "RemoteError", "Session", "connect", "connect_blocking",
    "connect_endpoint",
]

CHUNK = 64 * 1024  # the server's largest write
WINDOW = 8  # upload writes in flight


class RemoteError(Exception):
    """The server refused or failed a call; ``str()`` is its one-line message."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind  # the server's error class name, e.g. "CommandFailed"


class RemoteCommandError(RemoteError):
    """A command's own error (``path outside allowed roots``, ``HMAC mismatch`` …)."""


class CommandTimedOut(RemoteCommandError):
    """The command ran past its deadline on the server and was stopped."""


class LoginError(RemoteError):
    """A failed login (wrong user name or password), or a command called before login."""


class ConnectionClosed(RemoteError):
    """The connection is gone (the server closed it, an idle timeout, the network)."""

    def __init__(self) -> None:
        super().__init__("the connection to the server is closed", "ConnectionClosed")


# Where the server's pb.Error classes live (the second: servers before 0.2).
ERROR_MODULES = ("cmdserver.doors.pb.errors", "cmdserver.doors.pb_errors")
_KINDS: dict[str, type[RemoteError]] = {
    "CommandFailed": RemoteCommandError,
    "CommandTimedOut": CommandTimedOut,
    "LoginFailed": LoginError,
    "LoginRequired": LoginError,
}


def _translate(failure: Failure) -> Failure:
    """Turn a remote ``pb.Error`` into a :class:`RemoteError` subclass."""
    if failure.check(pb.PBConnectionLost, pb.DeadReferenceError):
        return Failure(ConnectionClosed())
    if isinstance(failure, pb.CopiedFailure):
        kind = failure.type.decode() if isinstance(failure.type, bytes) else str(failure.type)
        if kind.rpartition(".")[0] in ERROR_MODULES:
            name = kind.rsplit(".", 1)[1]
            value = failure.value
            message = value.decode() if isinstance(value, bytes) else str(value)
            return Failure(_KINDS.get(name, RemoteError)(message, name))
    return failure


class _LineObserver(pb.Referenceable):
    """Receives streamed output lines from the server."""

    def __init__(self, on_line: Callable[[str], Any]) -> None:
        self.on_line = on_line

    def remote_line(self, text: str) -> None:
        self.on_line(text)


class Session:
    """A logged-in connection; each method mirrors a command and returns a Deferred."""

    def __init__(self, factory: pb.PBClientFactory, avatar: pb.RemoteReference) -> None:
        self.factory = factory
        self.avatar = avatar

    def _call(self, method: str, *args: Any, on_line: Callable[[str], Any] | None = None,
              **kwargs: Any) -> Deferred:
        if on_line is not None:
            kwargs["observer"] = _LineObserver(on_line)
        try:
            d = self.avatar.callRemote(method, *args, **kwargs)
        except pb.DeadReferenceError:
            return defer.fail(ConnectionClosed())
        return d.addErrback(_translate)

    def call(self, command: str, on_line: Callable[[str], Any] | None = None,
             **arguments: Any) -> Deferred:
        """Run any command the server serves, with named arguments:
        ``call("diskfree", path=".")``; fires with its value."""
        return self._call("call", command, on_line=on_line, **arguments)

    def run(self, command: str, words: list[str],
            on_line: Callable[[str], Any] | None = None) -> Deferred:
        """Run a command from words typed as on the line door; fires with
        ``{"value": …, "text": [lines a text door prints after the streamed ones]}``."""
        return self._call("run", command, list(words), on_line=on_line)

    def ping(self) -> Deferred:
        return self._call("ping")

    def help(self, command: str | None = None) -> Deferred:
        return self._call("help") if command is None else self._call("help", command)

    def stats(self) -> Deferred:
        return self._call("stats")

    def whoami(self) -> Deferred:
        return self._call("whoami")

    def lastlog(self, n: int = 10, on_line: Callable[[str], Any] | None = None) -> Deferred:
        return self._call("lastlog", n, on_line=on_line)

    def comphash(self, path: str, algo: str = "sha256") -> Deferred:
        return self._call("comphash", path, algo)

    def ls(self, path: str | None = None) -> Deferred:
        return self._call("ls", path)

    def portscan(self, host: str, ports: str | list[int] | None = None,
                 on_line: Callable[[str], Any] | None = None) -> Deferred:
        return self._call("portscan", host, ports, on_line=on_line)

    @defer.inlineCallbacks
    def upload_file(self, path: str, name: str, key: bytes | str,
                    on_progress: Callable[[int, int], Any] | None = None,
                    mac: str = HMAC_SHA256, sha256: bool = False) -> Any:
        """Send a local file as ``name``; fires with the server's result.

        ``key`` is read as the server reads its key files: hex text as
        ``cmdserver hmac-key`` prints it (str, or the bytes of such a file), else
        raw bytes.  The file is read once: each 64 KiB chunk is read and hashed
        (``mac``: HMAC-SHA256 unless ``blake2b`` is asked for) in a thread, off
        the reactor, then sent, a few writes in flight, and ``close(MAC)``
        carries the MAC after the content.  The result is a dict: ``name``,
        ``size``, ``mac`` (``ALG:HEX``, the MAC the server checked) and
        ``sha256`` (the content's SHA-256 with ``sha256=True``, else None).
        """
        key = parse_key(key)
        digest = new_mac(mac, key)  # ValueError for a key blake2b cannot take
        options: dict[str, Any] = {}
        if mac != HMAC_SHA256:
            options["mac"] = mac
        if sha256:
            options["sha256"] = True
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            writer = yield self._call("upload", name, size, "-", **options)
            sent = 0
            in_flight: list[Deferred] = []
            try:
                while sent < size:
                    # One chunk at a time, in order: the MAC is still one pass.
                    chunk = yield threads.deferToThread(_read_hashed, f, digest,
                                                        min(CHUNK, size - sent), path)
                    in_flight.append(writer.callRemote("write", chunk).addErrback(_translate))
                    sent += len(chunk)
                    if len(in_flight) >= WINDOW:
                        yield in_flight.pop(0)
                    if on_progress is not None:
                        on_progress(sent, size)
                while in_flight:
                    yield in_flight.pop(0)
            except BaseException:
                for d in in_flight:  # the first error is the one to report
                    d.addErrback(lambda _: None)
                if not writer.broker.disconnected:
                    writer.callRemote("abort").addErrback(lambda _: None)
                raise
        result = yield writer.callRemote("close", digest.hexdigest()).addErrback(_translate)
        return result

    def close(self) -> Deferred:
        """Log out and close the connection; fires once it is closed."""
        broker = self.avatar.broker
        if broker.disconnected:
            return defer.succeed(None)
        d: Deferred = Deferred()
        broker.notifyOnDisconnect(lambda: d.callback(None))
        broker.transport.loseConnection()
        return d


def _read_hashed(f: Any, digest: Any, n: int, path: str) -> bytes:
    """The next ``n`` bytes of ``f`` (at most), added to ``digest``: in a thread."""
    chunk = f.read(n)
    if not chunk:
        raise OSError(f"{path}: the file shrank while it was sent")
    digest.update(chunk)
    return cast(bytes, chunk)


def connect_endpoint(endpoint: Any, user: str, password: str, reactor: Any = None,
                     timeout: float = 30) -> Deferred:
    """Log in over any client endpoint (or endpoint string, e.g. ``tls:host=…:port=…``).

    Fails with :class:`LoginError` on a wrong password, with
    ``ConnectionLost`` if the server hangs up first (a connection limit), and
    with ``TimeoutError`` if nothing is settled within ``timeout`` seconds.
    """
    if reactor is None:
        from twisted.internet import reactor
    if isinstance(endpoint, str):
        endpoint = clientFromString(reactor, endpoint)
    factory = pb.PBClientFactory()
    brokers: list[pb.Broker] = []

    def connected(broker: pb.Broker) -> Deferred:
        brokers.append(broker)
        root = factory.getRootObject()

        def lost() -> None:  # endpoints do not tell the factory; the broker does
            if not root.called:
                root.errback(error.ConnectionLost("the server closed the connection"))

        broker.notifyOnDisconnect(lost)
        return root

    d = endpoint.connect(factory)
    d.addCallback(connected)
    d.addCallback(lambda root: root.callRemote("authenticate", user, password))

    def failed(failure: Failure) -> Failure:
        factory.disconnect()
        for broker in brokers:  # connected, but PB never got going (a silent server)
            transport = broker.transport
            if transport is not None:
                cast(ITCPTransport, transport).abortConnection()
        return _translate(failure)

    d.addCallbacks(lambda avatar: Session(factory, avatar), failed)
    return d.addTimeout(timeout, reactor)


def connect(host: str, port: int, user: str, password: str, reactor: Any = None,
            timeout: float = 30) -> Deferred:
    """Connect to ``host:port`` over TCP and log in; fires with a :class:`Session`."""
    if reactor is None:
        from twisted.internet import reactor
    return connect_endpoint(HostnameEndpoint(reactor, host, port, timeout), user, password,
                            reactor, timeout)


# -- blocking convenience ------------------------------------------------------

_reactor_lock = threading.Lock()
_reactor_thread: threading.Thread | None = None


def _ensure_reactor() -> Any:
    """The global reactor, running: started once in a daemon thread if it is not."""
    global _reactor_thread
    from twisted.internet import reactor
    from twisted.python.threadable import isInIOThread

    if reactor.running:
        if isInIOThread():
            raise RuntimeError("the blocking client cannot be used from the reactor thread; "
                               "use connect() and Deferreds there")
        return reactor
    with _reactor_lock:
        if _reactor_thread is None:
            _reactor_thread = threading.Thread(
                target=reactor.run, kwargs={"installSignalHandlers": False},
                name="cmdserver-client-reactor", daemon=True)
            _reactor_thread.start()
    return reactor


class BlockingSession:
    """:class:`Session` for code without a reactor: each method blocks for its value."""

    def __init__(self, session: Session, reactor: Any) -> None:
        self._session = session
        self._reactor = reactor

    def _block(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return threads.blockingCallFromThread(
            self._reactor, getattr(self._session, method), *args, **kwargs)

    def call(self, command: str, **arguments: Any) -> Any:
        return self._block("call", command, **arguments)

    def run(self, command: str, words: list[str]) -> Any:
        return self._block("run", command, words)

    def ping(self) -> str:
        return self._block("ping")

    def help(self, command: str | None = None) -> dict[str, str]:
        return self._block("help", command)

    def stats(self) -> dict[str, Any]:
        return self._block("stats")

    def whoami(self) -> str:
        return self._block("whoami")

    def lastlog(self, n: int = 10) -> list[str]:
        return self._block("lastlog", n)

    def comphash(self, path: str, algo: str = "sha256") -> str:
        return self._block("comphash", path, algo)

    def ls(self, path: str | None = None) -> list[str]:
        return self._block("ls", path)

    def portscan(self, host: str, ports: str | list[int] | None = None) -> dict[str, Any]:
        return self._block("portscan", host, ports)

    def upload_file(self, path: str, name: str, key: bytes | str, mac: str = HMAC_SHA256,
                    sha256: bool = False) -> Any:
        return self._block("upload_file", path, name, key, mac=mac, sha256=sha256)

    def close(self) -> None:
        self._block("close")

    def __enter__(self) -> BlockingSession:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect_blocking(host: str, port: int, user: str, password: str) -> BlockingSession:
    """Like :func:`connect`, for scripts that run no reactor: blocks, returns a
    :class:`BlockingSession`.  Twisted's reactor runs in a daemon thread."""
    reactor = _ensure_reactor()
    session = cast(Session, threads.blockingCallFromThread(  # connect() fires with one
        reactor, connect, host, port, user, password, reactor))
    return BlockingSession(session, reactor)

