"""Start the real service on loopback port 0 and talk to it with blocking sockets."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import defer, reactor, threads

from cmdserver import tap


class LineClient:
    """A blocking socket client, as a person with netcat would be (run it in a thread)."""

    def __init__(self, address: Any, family: int = socket.AF_INET, timeout: float = 10,
                 source: str | None = None) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:  # another loopback address is another client
            self.sock.bind((source, 0))
        self.sock.connect(address)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buffer)
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("utf-8")

    def read_lines(self, n: int) -> list[str]:
        return [self.read_line() for _ in range(n)]

    def read_until_closed(self) -> bytes:
        data, self.buffer = self.buffer, b""
        while chunk := self.sock.recv(65536):
            data += chunk
        return data

    def ask(self, line: str, n: int = 1) -> list[str]:
        self.send(line.encode() + b"\n")
        return self.read_lines(n)

    def close(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close abruptly (RST), as a crashed client would."""
        import struct

        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class RunningService:
    """makeService from real options, started on the real reactor."""

    def __init__(self, tmp: str, *argv: str) -> None:
        self.tmp = tmp
        self.data_dir = os.path.join(tmp, "data")
        options = tap.Options()
        args = ["--data-dir", self.data_dir, *argv]
        if "--line" not in argv:
            args += ["--line", "tcp:0:interface=127.0.0.1"]
        # Never a fixed default port: tests run side by side.
        for door in ("--ssh", "--pb", "--http"):
            if door not in argv:
                args += [door, "none"]
        options.parseOptions(args)
        self.service = tap.makeService(options, reactor)
        self.root = self.service.core.policy.roots[0]

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.service.privilegedStartService()
        self.service.startService()
        self.ports = []
        for door in self.service.doors:
            port = yield door.listening
            self.ports.append(port)
        return self

    @property
    def address(self) -> tuple[str, int]:
        host = self.ports[0].getHost()
        return host.host, host.port

    def stop(self) -> defer.Deferred:
        return defer.maybeDeferred(self.service.stopService)


def in_thread(f: Any, *args: Any) -> defer.Deferred:
    """Run a blocking client function while the reactor serves it."""
    return threads.deferToThread(f, *args)
