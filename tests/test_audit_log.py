"""The audit file: exact JSON lines, written in batches and on close."""

from __future__ import annotations

import json
import os
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from cmdserver.audit import FIELDS, FLUSH_DELAY, FLUSH_LINES, NAMESPACE, AuditFile
from tests.helpers import temp_audit_file


def event(**fields: object) -> dict:
    base = {"log_namespace": NAMESPACE, "log_time": 1763712223.5}
    base.update(fields)
    return base


def reference_line(ev: dict, time_text: str) -> str:
    """What the audit line must be: json.dumps of the record (the original encoding)."""
    record = {"time": time_text}
    record.update({k: ev[k] for k in FIELDS if k in ev})
    return json.dumps(record, default=str) + "\n"


values = st.one_of(
    st.none(), st.text(), st.booleans(), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.dictionaries(st.text(max_size=5), st.one_of(st.text(), st.integers(),
                                                   st.lists(st.text(), max_size=3))),
    st.lists(st.text(), max_size=3), st.binary(max_size=5),
)


class AuditFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.audit = temp_audit_file(self)
        self.path, self.clock = self.audit.path, self.audit.reactor

    def read(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def test_written_after_the_flush_delay(self) -> None:
        self.audit(event(user="u", command="ping", outcome="ok", duration=1e-05,
                         args={}, error=None))
        self.audit(event(user="u", command="ls", outcome="error", error="no"))
        self.clock.advance(FLUSH_DELAY / 2)
        self.assertEqual(self.read(), "")
        self.clock.advance(FLUSH_DELAY / 2)
        lines = self.read().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertEqual(json.loads(lines[0])["command"], "ping")
        self.assertEqual(json.loads(lines[1])["error"], "no")

    def test_a_long_batch_is_written_at_once(self) -> None:
        for i in range(FLUSH_LINES):
            self.audit(event(command=f"c{i}"))
        self.assertEqual(len(self.read().splitlines()), FLUSH_LINES)
        self.audit(event(command="next"))
        self.assertEqual(len(self.read().splitlines()), FLUSH_LINES)
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(json.loads(self.read().splitlines()[-1])["command"], "next")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_flushes(self) -> None:
        self.audit(event(command="ping"))
        self.audit.close()
        self.assertEqual(json.loads(self.read())["command"], "ping")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_other_namespaces_ignored(self) -> None:
        self.audit({"log_namespace": "other", "log_time": 1.0, "command": "x"})
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(self.read(), "")

    def test_a_batch_that_cannot_be_written_is_counted(self) -> None:
        os.close(self.audit._fd)
        self.audit._fd = os.open("/dev/full", os.O_WRONLY)  # closed by the cleanup's close
        self.audit(event(command="ping"))
        self.audit(event(command="ls"))
        self.clock.advance(FLUSH_DELAY)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual((self.audit.write_errors, self.audit.lines_lost), (1, 2))

    def test_mode_0600(self) -> None:
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_timestamp_milliseconds(self) -> None:
        expected = {1763712223.0: "2025-11-21T08:03:43.000+00:00",
                    1763712223.9995: "2025-11-21T08:03:43.999+00:00",
                    1763712224.001: "2025-11-21T08:03:44.001+00:00"}
        for when in expected:
            self.audit(event(log_time=when, command="x"))
        self.clock.advance(FLUSH_DELAY)
        times = [json.loads(r)["time"] for r in self.read().splitlines()]
        self.assertEqual(times, list(expected.values()))


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={name: values for name in FIELDS}))
def test_lines_are_exactly_json_dumps(fields: dict) -> None:
    """The hand-rolled encoding gives byte for byte what json.dumps gives."""
    with tempfile.TemporaryDirectory() as d:
        audit = AuditFile(os.path.join(d, "audit.log"))  # no reactor: written at once
        audit.open()
        ev = event(**fields)
        audit(ev)
        audit.close()
        with open(os.path.join(d, "audit.log"), encoding="utf-8") as f:
            line = f.read()
    assert line == reference_line(ev, "2025-11-21T08:03:43.500+00:00")
