"""Load generator for the line benchmarks: many pipelined connections, one process.

Each connection sends ``--lines`` copies of ``--command`` in chunks, keeping at
most ``--window`` lines in flight, and counts the reply lines that come back
(one per command).  Prints one JSON object: lines, seconds, lines per second,
and the round-trip latency of a chunk (p50/p99, in ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from collections import deque


class Client(asyncio.Protocol):
    def __init__(self, args: argparse.Namespace, ready: asyncio.Future,
                 done: asyncio.Future, latencies: list[float]) -> None:
        self.total = args.lines
        self.window = args.window
        self.chunk = args.chunk
        self.payload = (args.command.encode() + b"\n") * args.chunk
        self.skip = args.greeting  # lines the server sends on connect, before any reply
        self.ready = ready
        self.done = done
        self.latencies = latencies
        self.sent = 0
        self.received = 0
        self.chunks: deque[tuple[int, float]] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.skip:
            self.ready.set_result(None)

    def start(self) -> None:
        self.fill()

    def fill(self) -> None:
        now = time.perf_counter()
        while self.sent < self.total and self.sent - self.received + self.chunk <= self.window:
            n = min(self.chunk, self.total - self.sent)
            self.transport.write(self.payload if n == self.chunk else self.payload[: n * (
                len(self.payload) // self.chunk)])
            self.sent += n
            self.chunks.append((self.sent, now))

    def data_received(self, data: bytes) -> None:
        n = data.count(b"\n")
        if self.skip:
            used = min(n, self.skip)
            self.skip -= used
            n -= used
            if not self.skip and not self.ready.done():
                self.ready.set_result(None)
        if not n:
            return
        self.received += n
        now = time.perf_counter()
        while self.chunks and self.chunks[0][0] <= self.received:
            self.latencies.append(now - self.chunks.popleft()[1])
        if self.received >= self.total:
            if not self.done.done():
                self.done.set_result(None)
            return
        self.fill()

    def connection_lost(self, exc: Exception | None) -> None:
        for f in (self.ready, self.done):
            if not f.done():
                f.set_exception(ConnectionError(f"lost after {self.received} replies"))


async def run(args: argparse.Namespace) -> dict:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    clients: list[Client] = []
    dones = []
    for _ in range(args.connections):
        ready, done = loop.create_future(), loop.create_future()
        _, client = await loop.create_connection(
            lambda r=ready, d=done: Client(args, r, d, latencies), "127.0.0.1", args.port)
        clients.append(client)
        dones.append(done)
        await ready
    started = time.perf_counter()
    for c in clients:
        c.start()
    await asyncio.gather(*dones)
    elapsed = time.perf_counter() - started
    for c in clients:
        c.transport.close()
    lines = args.lines * args.connections
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3)

    return {"connections": args.connections, "lines": lines, "seconds": round(elapsed, 4),
            "lines_per_s": round(lines / elapsed), "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--lines", type=int, default=2000, help="lines per connection")
    p.add_argument("--window", type=int, default=100, help="lines in flight per connection")
    p.add_argument("--chunk", type=int, default=25, help="lines per write")
    p.add_argument("--command", default="ping")
    p.add_argument("--greeting", type=int, default=0,
                   help="lines the server sends on connect, to skip (cmdserver: none "
                        "unless it runs with --greeting)")
    args = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
