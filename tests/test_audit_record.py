"""The audit file's direct path: ``record`` writes what the event would have written."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from typing import cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import ILogObserver
from twisted.trial import unittest

from cmdserver.audit import (
    FLUSH_DELAY,
    NAMESPACE,
    AuditFile,
    AuditPublisher,
    discard,
    round_duration,
)
from tests.helpers import capture_log, temp_audit_file

texts = st.text(max_size=200)
values = st.one_of(
    st.none(), st.text(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
    st.dictionaries(st.text(max_size=5), st.one_of(st.text(), st.integers())),
)


def written(write) -> str:
    with tempfile.TemporaryDirectory() as d:
        audit = AuditFile(os.path.join(d, "audit.log"))  # no reactor: written at once
        audit.open()
        write(audit)
        audit.close()
        with open(os.path.join(d, "audit.log"), encoding="utf-8") as f:
            return f.read()


@settings(max_examples=200, deadline=None)
@given(texts, texts, texts, texts, texts, st.one_of(st.none(), texts),
       st.dictionaries(st.text(max_size=5), st.text()), texts,
       st.floats(allow_nan=True, allow_infinity=True), st.one_of(st.none(), st.text()),
       values, st.floats(min_value=0, max_value=4e9))
def test_record_writes_the_event_line(session, event_kind, user, peer, door, command, args,
                                      outcome, duration, error, result, when) -> None:
    fields = {"session": session or None, "event": event_kind, "user": user, "peer": peer,
              "door": door, "command": command, "args": args, "outcome": outcome,
              "duration": round_duration(duration), "error": error}
    if result is not None:
        fields["result"] = result
    event = {"log_namespace": NAMESPACE, "log_time": when, **fields}

    def twice(audit: AuditFile) -> None:  # the second time from the string cache
        audit.clock = lambda: when
        for _ in range(2):
            audit.record(session, event_kind, user, peer, door, command, args, outcome,
                         duration, error, result)

    assert written(twice) == written(lambda audit: (audit(event), audit(event)))


class PublisherTests(unittest.TestCase):
    def setUp(self) -> None:
        self.file = temp_audit_file(self)
        self.path, self.clock = self.file.path, self.file.reactor
        self.publisher = AuditPublisher()

    def lines(self) -> list[dict]:
        self.clock.advance(FLUSH_DELAY)
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def test_file_alone_gets_the_fields(self) -> None:
        self.publisher.addObserver(self.file)
        self.publisher.record("s1", "command", "u", "p", "line", "ping", {}, "ok", 1e-06, None)
        self.publisher.record("", "login", "u", "p", "pb", None, {"method": "password"},
                              "failed", 0.0, None)
        first, second = self.lines()
        self.assertEqual(list(first), ["time", "session", "event", "user", "peer", "door",
                                       "command", "args", "outcome", "duration", "error"])
        self.assertEqual({k: v for k, v in first.items() if k != "time"},
                         {"session": "s1", "event": "command", "user": "u", "peer": "p",
                          "door": "line", "command": "ping", "args": {}, "outcome": "ok",
                          "duration": 1e-06, "error": None})
        self.assertEqual({k: v for k, v in second.items() if k != "time"},
                         {"session": None, "event": "login", "user": "u", "peer": "p",
                          "door": "pb", "command": None, "args": {"method": "password"},
                          "outcome": "failed", "duration": 0.0, "error": None})

    def test_without_an_observer_nothing_is_recorded(self) -> None:
        self.assertIs(self.publisher.record, discard)
        logged = capture_log(self)
        self.publisher.record("s1", "command", "u", "p", "line", "ping", {}, "ok", 0.0, None)
        self.publisher({"log_namespace": NAMESPACE, "log_time": 0.0, "command": "x"})
        self.assertEqual(logged, [])
        self.publisher.addObserver(self.file)
        self.publisher.removeObserver(self.file)
        self.assertIs(self.publisher.record, discard)
        self.assertEqual(self.lines(), [])

    def test_other_observers_get_the_event_and_the_file_its_line(self) -> None:
        events: list[dict] = []
        observer = cast(ILogObserver, events.append)
        self.publisher.addObserver(self.file)
        self.publisher.addObserver(observer)
        self.publisher.record("s", "command", "u", "p", "pb", "portscan", {"host": "h"}, "ok",
                              0.5, None, {"open": 2})
        [event] = events
        self.assertEqual((event["log_namespace"], event["command"], event["result"]),
                         (NAMESPACE, "portscan", {"open": 2}))
        self.assertEqual(self.lines()[0]["result"], {"open": 2})
        self.publisher.removeObserver(observer)  # the file alone again
        self.publisher.record("s", "command", "u", "p", "pb", "ping", {}, "ok", 0.0, None)
        self.assertEqual([line["command"] for line in self.lines()], ["portscan", "ping"])
        self.assertEqual(len(events), 1)

    def test_a_full_disk_does_not_fail_the_command(self) -> None:
        def full(fd: int, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        events = capture_log(self)
        self.publisher.addObserver(self.file)
        self.patch(os, "write", full)
        self.publisher.record("s", "command", "u", "p", "line", "ping", {}, "ok", 0.0, None)
        self.clock.advance(FLUSH_DELAY)  # the batch is written, and fails: no raise
        [lost] = [e for e in events if "lost" in e.get("log_format", "")]
        self.assertEqual((lost["lost"], lost["error"]), (1, "No space left on device"))
        self.assertEqual(self.file._pending, [])  # dropped, not kept to grow

    def test_an_unencodable_value_costs_only_its_own_line(self) -> None:
        class Unprintable:
            def __str__(self) -> str:
                raise RuntimeError("no text")

        self.publisher.addObserver(self.file)
        self.publisher.record("s", "command", "u", "p", "pb", "ls", {"path": "a"}, "ok", 0.0,
                              None)
        self.publisher.record("s", "command", "u", "p", "pb", "odd", {}, "ok", 0.0, None,
                              Unprintable())
        self.publisher.record("s", "command", "u", "p", "pb", "ping", {}, "ok", 0.0, None)
        self.assertEqual([line["command"] for line in self.lines()], ["ls", "ping"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_long_strings_not_cached(self) -> None:
        self.publisher.addObserver(self.file)
        for i in range(3):
            self.publisher.record("s", "command", "u", "p", "line", "x" * 500 + str(i), {},
                                  "not-found", 0.0, None)
        self.assertEqual([line["command"][-1] for line in self.lines()], ["0", "1", "2"])
        self.assertNotIn("x" * 500 + "0", self.file._strings)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0, max_value=4e9), min_size=1, max_size=5))
def test_timestamps_match_isoformat(times: list[float]) -> None:
    from datetime import UTC, datetime

    audit = AuditFile("unused")
    for when in times:  # in any order: the cached second must not leak
        ms = int(when * 1000)
        expected = datetime.fromtimestamp(ms // 1000, UTC).replace(
            microsecond=ms % 1000 * 1000).isoformat(timespec="milliseconds")
        assert audit._timestamp(when) == expected
