"""Pipelined PB calls, run as a process of its own (it needs a reactor).

    python pb_pipeline.py PORT USER PASSWORD CONNECTIONS CALLS HOLD

Logs in CONNECTIONS times and sends CALLS ``lastlog`` calls on each at once,
without waiting for any answer.  Once every call has either been answered or
been running for a moment, it prints one JSON object (how many were refused,
and with which messages, how many still run), keeps the connections open HOLD
seconds (so the test can count the daemon's children meanwhile), then drops
them and exits.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Any

from twisted.internet import defer, task

from cmdserver.client import RemoteError, connect


async def run(reactor: Any, port: int, user: str, password: str, connections: int,
              calls: int, hold: float) -> None:
    sessions = [await connect("127.0.0.1", port, user, password, reactor)
                for _ in range(connections)]
    seen: Counter = Counter()
    running: list[defer.Deferred] = []

    def answered(result: Any) -> None:
        seen["answered"] += 1

    def refused(failure: Any) -> None:
        failure.trap(RemoteError)
        seen[f"refused: {failure.value}"] += 1

    for session in sessions:
        for _ in range(calls):
            d = session.lastlog(5)
            d.addCallbacks(answered, refused)
            running.append(d)
    await task.deferLater(reactor, 2.0, lambda: None)  # every refusal is back by then
    seen["running"] = sum(not d.called for d in running)
    print(json.dumps(seen), flush=True)
    await task.deferLater(reactor, hold, lambda: None)
    for session in sessions:
        session.avatar.broker.transport.abortConnection()
    for d in running:
        d.addErrback(lambda _: None)


def main(reactor: Any, port: str, user: str, password: str, connections: str, calls: str,
         hold: str) -> defer.Deferred:
    return defer.ensureDeferred(run(reactor, int(port), user, password, int(connections),
                                    int(calls), float(hold)))


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
