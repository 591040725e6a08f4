"""Counters the ``stats`` command reports: uptime, connections, commands, logins, files.

The HTTP door's ``/metrics`` reads the same counters when it is scraped; what
the core counts per command besides (its outcome by door, a histogram of its
durations) costs a dictionary lookup and a few additions when it ends.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# Upper bounds, in seconds, of the buckets of the command duration histogram; a
# last bucket takes the rest (Prometheus's +Inf).
DURATION_BUCKETS = (0.0001, 0.001, 0.01, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0)


class Times(dict[str, list[float]]):
    """command -> its duration counts on one door: how many commands took at most
    each DURATION_BUCKETS bound (one more count for the longer ones), then their
    seconds in all.  Made on first use."""

    def __missing__(self, command: str) -> list[float]:
        times = self[command] = [0] * (len(DURATION_BUCKETS) + 2)
        return times


class TimesByDoor(dict[str, Times]):
    """door -> :class:`Times` (two plain lookups on the path of every command: cheaper
    than one with a tuple for a key)."""

    def __missing__(self, door: str) -> Times:
        times = self[door] = Times()
        return times


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
        # door -> command -> the duration counts of the commands that ended (Times);
        # the core updates them where a command ends (CommandCore.invoke).
        self.durations = TimesByDoor()
        # (command, door, outcome) -> commands that ended otherwise than ok
        self.failed: Counter[tuple[str, str, str]] = Counter()
        # (command, door) -> commands refused before they ran (usage, login required)
        self.refused_commands: Counter[tuple[str, str]] = Counter()

    def connection_opened(self, door: str) -> None:
        self.connections[door] += 1
        self.connections_total += 1

    def connection_closed(self, door: str) -> None:
        self.connections[door] -= 1

    def outcomes(self) -> dict[tuple[str, str, str], int]:
        """``(command, door, outcome) -> count`` of every command that ended or was
        refused: ``ok``, the audit log's failure outcomes, and ``refused``."""
        counts: dict[tuple[str, str, str], int] = {}
        for door, by_command in self.durations.items():
            for command, times in by_command.items():
                counts[(command, door, "ok")] = int(sum(times[:-1]))
        for (command, door, outcome), n in self.failed.items():
            counts[(command, door, "ok")] = counts.get((command, door, "ok"), 0) - n
            counts[(command, door, outcome)] = n
        for (command, door), n in self.refused_commands.items():
            counts[(command, door, "refused")] = n
        return counts

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
