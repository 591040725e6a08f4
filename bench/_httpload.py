"""Load generator for bench/http: N keep-alive connections, each with one request in
flight, sending the same request again as each answer comes in.

    python bench/_httpload.py PORT CONNECTIONS REQUESTS_PER_CONNECTION REQUEST_FILE

Prints one JSON object: requests, seconds, rate, and the first answer's status line.
"""

from __future__ import annotations

import json
import re
import sys
import time

from twisted.internet import protocol, reactor

LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


class Client(protocol.Protocol):
    def __init__(self, run: Run) -> None:
        self.run = run
        self.left = run.per_connection
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(self.run.request)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            match = LENGTH.search(self.buffer, 0, end + 2)
            if match is None:
                raise SystemExit(f"no Content-Length in {self.buffer[:end]!r}")
            total = end + 4 + int(match.group(1))
            if len(self.buffer) < total:
                return
            if self.run.first is None:
                self.run.first = self.buffer[:self.buffer.find(b"\r\n")].decode()
            self.buffer = self.buffer[total:]
            self.left -= 1
            if self.left:
                self.transport.write(self.run.request)
            else:
                self.transport.loseConnection()
                self.run.done()
                return


class Run:
    def __init__(self, port: int, connections: int, per_connection: int,
                 request: bytes) -> None:
        self.port = port
        self.connections = connections
        self.per_connection = per_connection
        self.request = request
        self.open = connections
        self.first: str | None = None
        self.started = 0.0
        self.ended = 0.0

    def start(self) -> None:
        factory = protocol.ClientFactory()
        factory.buildProtocol = lambda addr: Client(self)  # type: ignore[method-assign]
        self.started = time.perf_counter()
        for _ in range(self.connections):
            reactor.connectTCP("127.0.0.1", self.port, factory)

    def done(self) -> None:
        self.open -= 1
        if not self.open:
            self.ended = time.perf_counter()
            reactor.stop()


def main() -> None:
    port, connections, per_connection = map(int, sys.argv[1:4])
    with open(sys.argv[4], "rb") as f:
        request = f.read()
    run = Run(port, connections, per_connection, request)
    reactor.callWhenRunning(run.start)
    reactor.run()
    requests = connections * per_connection
    seconds = run.ended - run.started
    print(json.dumps({"requests": requests, "seconds": seconds, "rate": requests / seconds,
                      "first": run.first}))


if __name__ == "__main__":
    main()
