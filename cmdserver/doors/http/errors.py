"""What a failure is on the HTTP door: its status code and its one-line message.

The message is the one the other doors give (PB's, the text doors' line without
``Error: ``); the status says what kind of failure it is.  XML-RPC faults use
the same numbers as fault codes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure

from cmdserver.core import INTERNAL_ERROR
from cmdserver.errors import (
    CommandError,
    Conflict,
    DeadlineExceeded,
    NotFound,
    Refused,
    Throttled,
    TooLarge,
    UsageError,
)

BAD_REQUEST = 400  # usage: wrong, missing or extra arguments; a malformed body
UNAUTHORIZED = 401  # no credentials, or wrong ones
FORBIDDEN = 403  # refused by policy: the jail, the scan allowlist and limits
NOT_FOUND = 404  # no such command (on this door), file or endpoint
METHOD_NOT_ALLOWED = 405
CONFLICT = 409  # the upload's target exists, a scan already runs on the connection
LENGTH_REQUIRED = 411  # an upload without Content-Length
TOO_LARGE = 413  # a body over its cap, an upload over --max-upload
UNSUPPORTED_MEDIA_TYPE = 415  # a command body that is not JSON, an XML-RPC call not XML
RANGE_NOT_SATISFIABLE = 416
MISDIRECTED = 421  # a Host header that names none of the door's names
FAILED = 422  # the command refused or failed otherwise (no such file, HMAC mismatch, ...)
TOO_MANY = 429  # too many failed logins on the connection (later: the login throttle)
INTERNAL = 500  # a bug; the traceback is in the server's log only
UNAVAILABLE = 503  # /healthz: a door is not listening; a connection over the limits
DEADLINE = 504  # the command ran past its deadline and was stopped

CANCELLED = "cancelled"
# Reason phrases Twisted's table lacks (RFC 9110).
REASONS = {MISDIRECTED: b"Misdirected Request", FAILED: b"Unprocessable Content",
           TOO_MANY: b"Too Many Requests"}

# The order matters: the first class a failure is an instance of gives its status.
_STATUSES: tuple[tuple[type[Exception], int], ...] = (
    (DeadlineExceeded, DEADLINE),
    (UsageError, BAD_REQUEST),
    (NotFound, NOT_FOUND),
    (Refused, FORBIDDEN),
    (Conflict, CONFLICT),
    (TooLarge, TOO_LARGE),
    (Throttled, TOO_MANY),
    (CommandError, FAILED),
)


class HTTPError(Exception):
    """An answer other than success, raised anywhere in the door's handling of a
    request: its status, its message and any headers it needs
    (``WWW-Authenticate`` with a 401, ``Allow`` with a 405)."""

    def __init__(self, status: int, message: str,
                 headers: Sequence[tuple[bytes, bytes]] = (), close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = tuple(headers)
        self.close = close  # close the connection after the answer


def status_of(error: BaseException | None) -> int:
    """The status code of a failure: see the table above and docs/protocol.md."""
    if isinstance(error, HTTPError):
        return error.status
    for kind, status in _STATUSES:
        if isinstance(error, kind):
            return status
    return INTERNAL


def message_of(error: BaseException | None) -> str:
    """The one line the client sees (never a traceback)."""
    if isinstance(error, HTTPError | CommandError):
        return error.message
    if isinstance(error, CancelledError):
        return CANCELLED
    return INTERNAL_ERROR


def failure_answer(failure: Failure) -> tuple[int, str]:
    """``(status, message)`` of a failed command or request."""
    return status_of(failure.value), message_of(failure.value)


def json_default(value: Any) -> Any:
    """What a command's value holds that JSON has no type for: dataclasses (an
    upload's result) as objects, sets as lists, anything else as its text."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def encode(value: Any) -> bytes:
    """A JSON document, one line and a newline (what every JSON answer is)."""
    return json.dumps(value, default=json_default, separators=(",", ":")).encode() + b"\n"
