"""Soak: 500 clients, 50 random commands each (bad ones too), random abrupt
disconnects, against a real daemon process.  Afterwards: no server errors in
its log, connection counts back to zero, no leaked descriptors or child
processes, and memory back within 10% of where it started."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections import Counter
from pathlib import Path

from conftest import Session, wait_for

CLIENTS = 500
COMMANDS_EACH = 50
ABORT_CHANCE = 0.03  # per command: drop the connection abruptly (RST), maybe mid-command
SEED = 8

GOOD = [b"ping", b"help", b"help comphash", b"stats", b"ls", b"ls sub", b"comphash small.txt",
        b"comphash --algo md5 sub/notes.txt", b"comphash medium.bin", b"lastlog 5",
        b"lastlog 50"]
BAD = [b"nope", b"ls ../..", b"comphash", b"comphash nothere", b"comphash sub",
       b"comphash --algo crc small.txt", b"lastlog 0", b"lastlog x", b"help nope",
       b"'unclosed", b"ls a b", b"\xff\xfe", b"\x00ping", b"\x1b[2J", b"\xff\xf4\xff\xfd\x06",
       b"ping \xc3\x28", b"\t\t"]
CLOSING = [b"exit", b"quit", b"x" * 5000]
IDLE = {"open": 1, "in_flight": 1}  # the watcher's own connection and its stats command


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    await reader.readline()  # greeting
    return reader, writer


def abort(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def client(port: int, rng: random.Random, seen: Counter, commands: int) -> None:
    reader, writer = await connect(port)
    for _ in range(commands):
        roll = rng.random()
        command = rng.choice(GOOD if roll < 0.6 else BAD if roll < 0.95 else CLOSING)
        if rng.random() < ABORT_CHANCE:
            writer.write(command + b"\n")
            if rng.random() < 0.5:
                await asyncio.sleep(rng.random() / 100)  # let it start, then vanish
            abort(writer)
            seen["aborted"] += 1
            reader, writer = await connect(port)
            continue
        writer.write(command + b"\nping\n")
        if command in CLOSING:
            try:
                rest = await asyncio.wait_for(reader.read(), 60)
            except ConnectionResetError:
                rest = b""
            seen["closed by server"] += 1
            writer.close()
            reader, writer = await connect(port)
            lines = rest.split(b"\r\n")
        else:
            lines = []
            while (line := await asyncio.wait_for(reader.readline(), 60)) != b"pong\r\n":
                if not line:
                    raise AssertionError(f"server closed after {command!r}")
                lines.append(line)
        seen["commands"] += 1
        for line in lines:
            if b"internal error" in line or b"Traceback" in line:
                seen["internal errors"] += 1
    abort(writer) if rng.random() < 0.5 else writer.close()


async def run_clients(port: int, count: int, seed: int,
                      commands: int = COMMANDS_EACH) -> Counter:
    seen: Counter = Counter()
    await asyncio.gather(*(client(port, random.Random(seed * 100_000 + i), seen, commands)
                           for i in range(count)))
    return seen


def test_soak(start_daemon, jail: Path, syslog: Path) -> None:
    daemon = start_daemon(["--root", str(jail), "--log-source", str(syslog),
                           "--max-clients", str(CLIENTS + 50),
                           "--max-per-ip", str(CLIENTS + 50)])
    watcher = Session(daemon.port)
    # Warm up with every client connected at once but a few commands each (thread
    # pool, child processes, the allocator's high-water mark for 500 connections),
    # then take the reference figures: what must not grow is what the long run adds.
    asyncio.run(run_clients(daemon.port, CLIENTS, seed=1, commands=5))
    wait_for(lambda: watcher.stats() == IDLE, what="warm-up to end")
    wait_for(lambda: not daemon.children(), what="warm-up children to exit")
    rss_start, fds_start = daemon.rss_kib(), daemon.fds()

    seen = asyncio.run(run_clients(daemon.port, CLIENTS, seed=SEED))

    assert seen["commands"] > CLIENTS * COMMANDS_EACH * 0.9
    assert seen["aborted"] > 0 and seen["closed by server"] > 0
    assert seen["internal errors"] == 0
    wait_for(lambda: watcher.stats() == IDLE,
             what="connections back to zero")
    wait_for(lambda: not daemon.children(), what="child processes to exit")
    wait_for(lambda: daemon.fds() == fds_start, what=f"fds back to {fds_start}")
    rss_end = daemon.rss_kib()
    print(f"soak: {seen}; RSS {rss_start} -> {rss_end} KiB, fds {fds_start}")
    assert rss_end <= rss_start * 1.10, (rss_start, rss_end)
    assert daemon.log_errors() == []
    watcher.close()
    assert daemon.terminate() < 5
    assert daemon.log_errors() == []
