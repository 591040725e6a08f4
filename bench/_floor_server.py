"""A reference for bench/line.py: the least a Twisted ``LineReceiver`` can do to
answer ``ping`` and audit it.

Each line is checked (UTF-8, printable), split, looked up in a table, counted,
timed, run, and recorded in cmdserver's JSON audit file (the same
:class:`cmdserver.audit.AuditFile`, the same line, written in batches); the
replies of one read leave in one write.  Nothing else: no connection limits, no
login, no queue or back-pressure, no per-turn budget, no idle timer, no command
core.  Its throughput is what any Python server pays to audit a command; the gap
between it and cmdserver is what cmdserver's own layers cost.

Run as its own process: ``python _floor_server.py AUDIT-FILE`` prints ``listening PORT``;
with ``none`` for the file, every step but the audit line is taken (what the
audit line costs is the difference).
"""

from __future__ import annotations

import secrets
import sys
import time
from collections import Counter
from typing import Any

from twisted.internet import epollreactor

epollreactor.install()

from twisted.internet import reactor  # noqa: E402
from twisted.internet.protocol import Factory  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

from cmdserver.audit import AuditFile  # noqa: E402


def _nothing(*fields: Any) -> None:
    pass


def ping() -> str:
    return "pong"


COMMANDS = {"ping": ping}


class Floor(LineReceiver):
    delimiter = b"\n"

    def __init__(self, audit: AuditFile | None, counts: Counter[str]) -> None:
        self.record = audit.record if audit is not None else _nothing
        self.counts = counts
        self.batch: list[bytes] = []

    def connectionMade(self) -> None:
        addr = self.transport.getPeer()
        self.peer = f"{addr.host}:{addr.port}"
        self.session = secrets.token_hex(6)  # cmdserver's records name the session too

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.writeSequence(self.batch)
        self.batch.clear()

    def lineReceived(self, raw: bytes) -> None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.batch.append(b"Error: not UTF-8\r\n")
            return
        if not text.isprintable():
            self.batch.append(b"Error: control characters\r\n")
            return
        argv = text.split()
        command = COMMANDS.get(argv[0]) if argv else None
        if command is None:
            self.batch.append(b"Command not found.\r\n")
            return
        self.counts[argv[0]] += 1
        started = time.time()
        result = command()
        self.record(self.session, "command", "anonymous", self.peer, "line", argv[0], {}, "ok",
                    time.time() - started, None)
        self.batch.append(result.encode() + b"\r\n")


class FloorFactory(Factory):
    noisy = False

    def __init__(self, audit: AuditFile | None) -> None:
        self.audit = audit
        self.counts: Counter[str] = Counter()

    def buildProtocol(self, addr: Any) -> Floor:
        return Floor(self.audit, self.counts)


def main() -> None:
    audit = None
    if sys.argv[1] != "none":
        audit = AuditFile(sys.argv[1], reactor)
        audit.open()
        reactor.addSystemEventTrigger("before", "shutdown", audit.close)
    port = reactor.listenTCP(0, FloorFactory(audit), backlog=4096, interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.path.pop(0)  # do not let bench/ shadow anything
    main()
