"""The audit log: every command event from the core, written as JSON lines.

The core logs audit events through ``twisted.logger`` in the namespace
``cmdserver.audit``, to :data:`audit_publisher`.  When an :class:`AuditFile`
observes it, the events go there only, not to the global log publisher too:
rendering every command as text in the daemon's main log as well would cost
more than running most commands.  :class:`AuditFile` appends one JSON object a
line.
Lines are gathered during one reactor turn and written together at the start
of the next (and on close), so a burst of commands costs one ``write`` call
while an event still reaches the disk a moment after its command ran.
"""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from typing import Any

from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher
from zope.interface import implementer

NAMESPACE = "cmdserver.audit"
FIELDS = ("user", "peer", "door", "command", "args", "outcome", "duration", "error",
          "result")

_encode = json.JSONEncoder(default=str).encode
_encode_str = json.encoder.encode_basestring_ascii


class AuditPublisher(LogPublisher):
    """Sends audit events to the audit observers (the audit file) if there are any.

    Without one (``--audit-log none``, or a core used on its own) the events go
    to the global log publisher like any other, so the audit trail is never
    dropped: it is then in the daemon's main log.
    """

    def __init__(self) -> None:
        super().__init__()
        self._listening: list[ILogObserver] = []

    def addObserver(self, observer: ILogObserver) -> None:
        super().addObserver(observer)
        if observer not in self._listening:
            self._listening.append(observer)

    def removeObserver(self, observer: ILogObserver) -> None:
        super().removeObserver(observer)
        if observer in self._listening:
            self._listening.remove(observer)

    def __call__(self, event: dict[str, Any]) -> None:
        if self._listening:
            super().__call__(event)
        else:
            globalLogPublisher(event)


audit_publisher = AuditPublisher()


@implementer(ILogObserver)
class AuditFile:
    """Appends audit events to ``path`` (created 0600) as JSON lines.

    ``reactor`` schedules the write of each turn's lines; without one every
    event is written at once.
    """

    def __init__(self, path: str, reactor: Any = None) -> None:
        self.path = path
        self.reactor = reactor
        self._fd: int | None = None
        self._pending: list[str] = []
        self._flush_call: Any = None
        self._last_ms = -1
        self._last_time = ""

    def open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o600)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def close(self) -> None:
        if self._fd is not None:
            self.flush()
            os.close(self._fd)
            self._fd = None

    def flush(self) -> None:
        """Write every pending line now."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        if not self._pending or self._fd is None:
            return
        data = "".join(self._pending).encode("utf-8")
        self._pending.clear()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _timestamp(self, when: float) -> str:
        ms = int(when * 1000)
        if ms != self._last_ms:  # bursts share one formatted millisecond
            self._last_ms = ms
            moment = datetime.fromtimestamp(ms // 1000, UTC).replace(
                microsecond=ms % 1000 * 1000)
            self._last_time = moment.isoformat(timespec="milliseconds")
        return self._last_time

    def __call__(self, event: dict[str, Any]) -> None:
        if self._fd is None or event.get("log_namespace") != NAMESPACE:
            return
        # What json.dumps(record) gives, field by field: strings, None, floats and
        # empty dicts (nearly every value) are encoded without the generic encoder.
        parts = [f'{{"time": "{self._timestamp(event["log_time"])}"']
        for name in FIELDS:
            if name in event:
                value = event[name]
                if type(value) is str:
                    parts.append(f'"{name}": {_encode_str(value)}')
                elif value is None:
                    parts.append(f'"{name}": null')
                elif type(value) is float and math.isfinite(value):
                    parts.append(f'"{name}": {value!r}')
                else:
                    parts.append(f'"{name}": {"{}" if value == {} else _encode(value)}')
        parts.append("}\n")
        self._pending.append(", ".join(parts[:-1]) + parts[-1])
        if self._flush_call is None:
            if self.reactor is not None:
                self._flush_call = self.reactor.callLater(0, self.flush)
            else:
                self.flush()
