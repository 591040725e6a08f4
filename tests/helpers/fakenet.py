"""A fake socket layer for scanner tests: ports answer as the test says, no packet leaves."""

from __future__ import annotations

import errno
import itertools
import socket
from typing import Any

_fds = itertools.count(10_000)


class FakeSocket:
    """A non-blocking TCP socket whose connect outcome the :class:`FakeNetwork` decides."""

    def __init__(self, net: FakeNetwork, family: int, kind: int) -> None:
        self.net = net
        self.family = family
        self.kind = kind
        self.fd = next(_fds)
        self.closed = False
        self.state: str | None = None  # "open", "refused", "pending", "self"
        self.port: int | None = None
        self.linger: bytes | None = None
        self.connects = 0

    def fileno(self) -> int:
        return -1 if self.closed else self.fd

    def connect_ex(self, address: tuple[Any, ...]) -> int:
        assert not self.closed, "connect on a closed socket"
        self.connects += 1
        if self.state is None:
            self.port = address[1]
            self.net.connects.append(address)
            if self.port in self.net.errors:
                return self.net.errors[self.port]
            self.state = self.net.outcome(self.port)
            return errno.EINPROGRESS
        if self.state == "refused":
            # As on Linux: reporting the refusal leaves the socket free to connect again.
            self.state = None
            self.net.reused += 1
            return errno.ECONNREFUSED
        return {"open": 0, "self": 0, "pending": errno.EALREADY}[self.state]

    def getsockname(self) -> tuple[Any, ...]:
        if self.state == "self":
            return (self.net.host, self.port)
        return (self.net.host, 40000)

    def setsockopt(self, level: int, option: int, value: bytes) -> None:
        if (level, option) == (socket.SOL_SOCKET, socket.SO_LINGER):
            self.linger = value

    def close(self) -> None:
        self.closed = True


class FakeNetwork:
    """Decides each port's fate: open, pending (answer later, or never), self-connect, refused."""

    def __init__(self, open_ports: Any = (), pending: Any = (), self_connect: Any = (),
                 errors: dict[int, int] | None = None, host: str = "127.0.0.1") -> None:
        self.open_ports = set(open_ports)
        self.pending = set(pending)
        self.self_connect = set(self_connect)
        self.errors = errors or {}
        self.host = host
        self.sockets: list[FakeSocket] = []
        self.connects: list[tuple[Any, ...]] = []
        self.fail_socket: OSError | None = None
        self.reused = 0

    def outcome(self, port: int) -> str:
        if port in self.open_ports:
            return "open"
        if port in self.pending:
            return "pending"
        if port in self.self_connect:
            return "self"
        return "refused"

    def socket(self, family: int, kind: int) -> FakeSocket:
        if self.fail_socket is not None:
            raise self.fail_socket
        sock = FakeSocket(self, family, kind)
        self.sockets.append(sock)
        return sock

    def open_sockets(self) -> list[FakeSocket]:
        return [s for s in self.sockets if not s.closed]
