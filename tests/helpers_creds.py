"""Shared helpers for the credential, login and TLS tests."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

TEST_COST = 4  # the lowest bcrypt cost: fast tests


def run_now(f: Any, *args: Any, **kwargs: Any) -> Deferred:
    """A 'thread runner' that runs the function at once (no threads in unit tests)."""
    return defer.maybeDeferred(f, *args, **kwargs)


def capture_log(test: Any) -> list[dict]:
    """Collect every twisted.logger event until the test ends."""
    from twisted.logger import globalLogPublisher

    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    test.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def flatten_events(events: list[dict]) -> str:
    """Everything a log observer could write: the formatted text and every field."""
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) + repr(sorted(e.items(), key=lambda kv: kv[0]))
                     for e in events)
