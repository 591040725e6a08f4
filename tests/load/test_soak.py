"""Soak: 500 clients through every door, random commands (bad ones too),
random abrupt disconnects, against a real daemon process.  Afterwards: no
server errors in its log, connection counts back to zero, no leaked
descriptors, threads or child processes, and memory back within 10% of where
it started.

Of the 500 clients, 400 use the line door (50 commands each), 40 the SSH door
(paramiko, key login, 25 exec commands each: an SSH handshake costs far more
than a line) and 60 the PB door (:mod:`cmdserver.client` in a process of its
own, 50 calls each)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import cast

import paramiko
from conftest import PASSWORD, USER, Session, add_user, ssh_connect, wait_for

CLIENTS = 500
SSH_CLIENTS, PB_CLIENTS = 40, 60
LINE_CLIENTS = CLIENTS - SSH_CLIENTS - PB_CLIENTS
COMMANDS_EACH = 50
SSH_COMMANDS_EACH = 25
PB_SCRIPT = Path(__file__).with_name("pb_clients.py")
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
SSH_GOOD = ["ping", "help", "help comphash", "stats", "ls", "ls sub", "comphash small.txt",
            "comphash --algo md5 sub/notes.txt", "lastlog 5"]
SSH_BAD: list[str | bytes] = [
    "nope", "ls ../..", "comphash", "comphash nothere", "lastlog x", "help nope",
    "'unclosed", "ping \x1b[2J", "ping \x00", b"\xff\xfe", "ls a b", "exit now"]
IDLE = {"open": 1, "in_flight": 1}  # the watcher's own connection and its stats command


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)


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


def abort_ssh(client: paramiko.SSHClient) -> None:
    """Vanish without an SSH disconnect message: a TCP reset under the transport."""
    transport = client.get_transport()
    assert transport is not None
    sock = cast(socket.socket, transport.sock)  # a direct connection, no proxy channel
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.shutdown(socket.SHUT_RDWR)
    client.close()


def ssh_client(port: int, key: paramiko.PKey, rng: random.Random, commands: int) -> Counter:
    """One SSH client: exec commands one by one, sometimes dropping the connection."""
    seen: Counter = Counter()
    client = ssh_connect(port, key)
    for _ in range(commands):
        command = rng.choice(SSH_GOOD if rng.random() < 0.6 else SSH_BAD)
        if rng.random() < ABORT_CHANCE:
            transport = client.get_transport()
            assert transport is not None
            channel = transport.open_session()
            channel.exec_command(command)
            if rng.random() < 0.5:
                time.sleep(rng.random() / 100)
            abort_ssh(client)
            seen["ssh aborted"] += 1
            client = ssh_connect(port, key)
            continue
        # The stub says str; paramiko hands bytes through to Channel.exec_command as they are.
        _, stdout, stderr = client.exec_command(command, timeout=60)  # type: ignore[arg-type]
        out, err = stdout.read(), stderr.read()
        status = stdout.channel.recv_exit_status()
        assert status in (0, 1), (command, status, out, err)
        seen["ssh commands"] += 1
        if b"internal error" in out + err or b"Traceback" in out + err:
            seen["internal errors"] += 1
    if rng.random() < 0.5:
        abort_ssh(client)
    else:
        client.close()
    return seen


def run_all(daemon, key: paramiko.PKey, seed: int, line_commands: int, ssh_commands: int,
            pb_calls: int) -> Counter:
    """Every door's clients at once: PB in a process, SSH in threads, the line door here."""
    pb = subprocess.Popen([sys.executable, str(PB_SCRIPT), str(daemon.ports["pb"]), USER,
                           PASSWORD, str(PB_CLIENTS), str(pb_calls), str(seed)],
                          stdout=subprocess.PIPE, text=True)
    with ThreadPoolExecutor(SSH_CLIENTS) as pool:
        ssh = [pool.submit(ssh_client, daemon.ports["ssh"], key,
                           random.Random(seed * 100_000 + 50_000 + i), ssh_commands)
               for i in range(SSH_CLIENTS)]
        seen = asyncio.run(run_clients(daemon.port, LINE_CLIENTS, seed, line_commands))
        for future in ssh:
            seen.update(future.result(timeout=300))
    out, _ = pb.communicate(timeout=300)
    assert pb.returncode == 0, out
    seen.update({f"pb {k}": v for k, v in json.loads(out).items()})
    return seen


def test_soak(start_daemon, jail: Path, syslog: Path) -> None:
    key = add_user(jail.parent)
    daemon = start_daemon(["--root", str(jail), "--log-source", str(syslog),
                           "--max-clients", str(CLIENTS + 50),
                           "--max-per-ip", str(CLIENTS + 50),
                           # Every client comes from 127.0.0.1: no per-address limit on
                           # commands in flight (tests/load/test_attacks_work.py has it),
                           # and the login gate's per-address bound on checks exempts it.
                           "--max-calls-per-ip", "0", "--penalty-exempt", "127.0.0.1"])
    watcher = Session(daemon.port)
    # Warm up with every client connected at once but a few commands each (thread
    # pool, child processes, the allocator's high-water mark for 500 connections),
    # then take the reference figures: what must not grow is what the long run adds.
    run_all(daemon, key, seed=1, line_commands=5, ssh_commands=3, pb_calls=5)
    wait_for(lambda: watcher.stats() == IDLE, what="warm-up to end")
    wait_for(lambda: not daemon.children(), what="warm-up children to exit")
    rss_start, fds_start, threads_start = daemon.rss_kib(), daemon.fds(), daemon.threads()

    seen = run_all(daemon, key, seed=SEED, line_commands=COMMANDS_EACH,
                   ssh_commands=SSH_COMMANDS_EACH, pb_calls=COMMANDS_EACH)

    print(f"soak: {dict(seen)}")
    assert seen["commands"] > LINE_CLIENTS * COMMANDS_EACH * 0.9
    assert seen["ssh commands"] > SSH_CLIENTS * SSH_COMMANDS_EACH * 0.9
    assert seen["pb calls"] > PB_CLIENTS * COMMANDS_EACH * 0.9
    assert seen["pb ok"] > 0 and seen["pb refused"] > 0
    assert seen["aborted"] > 0 and seen["closed by server"] > 0
    assert seen["ssh aborted"] > 0 and seen["pb aborted"] > 0
    assert seen["internal errors"] == 0 and seen["pb unexpected"] == 0
    wait_for(lambda: watcher.stats() == IDLE,
             what="connections back to zero")
    wait_for(lambda: not daemon.children(), what="child processes to exit")
    wait_for(lambda: daemon.fds() == fds_start, what=f"fds back to {fds_start}")
    wait_for(lambda: daemon.threads() <= threads_start, what=f"threads back to {threads_start}")
    rss_end = daemon.rss_kib()
    print(f"soak: RSS {rss_start} -> {rss_end} KiB, fds {fds_start}, threads {threads_start}")
    assert rss_end <= rss_start * 1.10, (rss_start, rss_end)
    assert daemon.log_errors() == []
    watcher.close()
    assert daemon.terminate() < 5
    assert daemon.log_errors() == []
