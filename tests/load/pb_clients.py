"""PB clients for the soak, run as a process of their own (they need a reactor).

    python pb_clients.py PORT USER PASSWORD CLIENTS CALLS SEED

Each client logs in with :mod:`cmdserver.client`, makes CALLS random calls
(good and bad arguments), and now and then drops its connection abruptly
(``abortConnection``, sometimes with a call in flight) and logs in again.
Prints one JSON object of counters; a refusal other than a command error or
bad arguments (an ``InternalError`` above all) counts as unexpected.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from typing import Any

from twisted.internet import defer, task
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.spread import pb

from cmdserver.client import ConnectionClosed, RemoteError, Session, connect

ABORT_CHANCE = 0.03

# (method, args, kwargs): a mix that succeeds and that the server refuses.
CALLS: list[tuple[str, tuple, dict]] = [
    ("ping", (), {}), ("help", (), {}), ("help", ("comphash",), {}), ("stats", (), {}),
    ("ls", (), {}), ("ls", ("sub",), {}), ("comphash", ("small.txt",), {}),
    ("comphash", ("medium.bin",), {"algo": "md5"}), ("lastlog", (5,), {}),
    ("help", ("nope",), {}), ("ls", ("../..",), {}), ("comphash", ("nothere",), {}),
    ("comphash", ("small.txt",), {"algo": "crc"}), ("comphash", ("sub",), {}),
    ("lastlog", (0,), {}), ("lastlog", ("x",), {}), ("ls", ("\x00",), {}),
]
CLEAN_REFUSALS = ("CommandFailed", "BadArguments")
GONE = (ConnectionAborted, ConnectionLost, ConnectionDone, pb.PBConnectionLost,
        pb.DeadReferenceError, ConnectionClosed)


async def one_client(reactor: Any, port: int, user: str, password: str, calls: int,
                     rng: random.Random, seen: Counter) -> None:
    session: Session = await connect("127.0.0.1", port, user, password, reactor)
    for _ in range(calls):
        method, args, kwargs = rng.choice(CALLS)
        d = session._call(method, *args, **kwargs)  # errors arrive as RemoteError
        if rng.random() < ABORT_CHANCE:
            if rng.random() < 0.5:
                await task.deferLater(reactor, rng.random() / 100, lambda: None)
            session.avatar.broker.transport.abortConnection()
            try:
                await d
            except GONE:
                pass  # lost with the connection
            except RemoteError as e:  # answered before the abort landed
                if e.kind not in CLEAN_REFUSALS:
                    raise
            seen["aborted"] += 1
            session = await connect("127.0.0.1", port, user, password, reactor)
            continue
        try:
            await d
            seen["ok"] += 1
        except RemoteError as e:
            if e.kind not in CLEAN_REFUSALS:
                raise
            seen["refused"] += 1
        seen["calls"] += 1
    if rng.random() < 0.5:
        session.avatar.broker.transport.abortConnection()
    else:
        await session.close()


async def run(reactor: Any, port: int, user: str, password: str, clients: int, calls: int,
              seed: int) -> Counter:
    seen: Counter = Counter()

    async def guarded(i: int) -> None:
        try:
            await one_client(reactor, port, user, password, calls,
                             random.Random(seed * 100_000 + i), seen)
        except Exception as e:  # counted, and shown: the soak fails on any
            seen["unexpected"] += 1
            seen[f"unexpected {type(e).__name__}: {e}"[:200]] += 1

    await defer.gatherResults([defer.ensureDeferred(guarded(i)) for i in range(clients)])
    return seen


def main(reactor: Any, port: str, user: str, password: str, clients: str, calls: str,
         seed: str) -> defer.Deferred:
    d = defer.ensureDeferred(run(reactor, int(port), user, password, int(clients),
                                 int(calls), int(seed)))
    return d.addCallback(lambda seen: print(json.dumps(seen), flush=True))


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
