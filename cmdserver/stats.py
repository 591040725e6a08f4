"""Counters the ``stats`` command reports: uptime, connections, commands, logins, files."""

from __future__ import annotations

from collections import Counter
from typing import Any


class Stats:
    """Live counters shared by the core and every door."""

    def __init__(self, now: float) -> None:
        self.started = now
        self.connections: Counter[str] = Counter()  # open connections per door
        self.connections_total = 0  # accepted since start, all doors
        self.refused = 0  # refused by a connection limit or a login penalty
        self.refused_penalised = 0  # of those, refused because their address was penalised
        self.commands: Counter[str] = Counter()  # commands run, per name
        self.errors = 0  # commands that ended in an error
        self.in_flight = 0
        self.not_found = 0  # command names no door serves (typos, probes)
        self.logins = 0  # successful logins, every door
        self.login_failures = 0  # failed logins, every door
        self.logins_refused = 0  # login attempts refused without a check
        self.penalties = 0  # failed logins that penalised their address
        self.file_operations: Counter[str] = Counter()  # SFTP operations, per name

    def connection_opened(self, door: str) -> None:
        self.connections[door] += 1
        self.connections_total += 1

    def connection_closed(self, door: str) -> None:
        self.connections[door] -= 1

    def snapshot(self, now: float) -> dict[str, Any]:
        """A plain dict of the counters (what PB's ``stats()`` returns)."""
        return {
            "uptime": round(now - self.started, 3),
            "connections": sum(self.connections.values()),
            "connections_by_door": {k: v for k, v in sorted(self.connections.items()) if v},
            "connections_total": self.connections_total,
            "refused": self.refused,
            "refused_penalised": self.refused_penalised,
            "commands": dict(sorted(self.commands.items())),
            "errors": self.errors,
            "in_flight": self.in_flight,
            "not_found": self.not_found,
            "logins": self.logins,
            "login_failures": self.login_failures,
            "logins_refused": self.logins_refused,
            "penalties": self.penalties,
            "file_operations": dict(sorted(self.file_operations.items())),
        }
