"""The audit log: every command event from the core, written as JSON lines.

The core logs audit events through ``twisted.logger`` in the namespace
``cmdserver.audit``; :class:`AuditFile` is an observer that keeps only those
and appends one JSON object a line, flushed at once so a crash loses nothing.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver
from zope.interface import implementer

NAMESPACE = "cmdserver.audit"
FIELDS = ("user", "peer", "door", "command", "args", "outcome", "duration", "error",
          "result")


@implementer(ILogObserver)
class AuditFile:
    """Appends audit events to ``path`` (created 0600) as JSON lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __call__(self, event: dict[str, Any]) -> None:
        if self._file is None or event.get("log_namespace") != NAMESPACE:
            return
        record = {"time": datetime.fromtimestamp(event["log_time"], UTC).isoformat(
            timespec="milliseconds")}
        for name in FIELDS:
            if name in event:
                record[name] = event[name]
        self._file.write(json.dumps(record, default=str) + "\n")
