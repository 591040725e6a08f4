"""The audit file: exact JSON lines, written in batches and on close."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import ILogObserver
from twisted.trial import unittest

from cmdserver.audit import FIELDS, FLUSH_DELAY, FLUSH_LINES, NAMESPACE, AuditFile
from tests.helpers import capture_log, temp_audit_file


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
        assert self.audit._fd is not None
        os.close(self.audit._fd)
        self.audit._fd = os.open("/dev/full", os.O_WRONLY)  # closed by the cleanup's close
        self.audit(event(command="ping"))
        self.audit(event(command="ls"))
        self.clock.advance(FLUSH_DELAY)
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


class FollowTests(unittest.TestCase):
    """The file follows its path: SIGHUP reopens it, and a file renamed away or
    deleted is noticed at a batch, at most once a second."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: shutil.rmtree(self.dir, True))
        self.path = os.path.join(self.dir, "audit.log")
        self.now = 1000.0
        self.audit = AuditFile(self.path, clock=lambda: self.now)  # no reactor: at once
        self.audit.open()
        self.addCleanup(self.audit.close)

    def commands(self, path: str) -> list[str]:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["command"] for line in f]

    def record(self, command: str) -> None:
        self.audit.record("s1", "command", "u", "p", "line", command, {}, "ok", 0.0, None)

    def test_sighup_after_a_rotation_writes_to_the_new_file(self) -> None:
        self.record("before")
        os.rename(self.path, self.path + ".1")
        self.record("rotated, no signal yet")  # within the second: the old file
        self.audit.reopen()
        self.record("after")
        self.assertEqual(self.commands(self.path + ".1"), ["before", "rotated, no signal yet"])
        self.assertEqual(self.commands(self.path), ["after"])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)

    def test_a_file_renamed_away_is_left_after_a_second(self) -> None:
        self.record("before")
        os.rename(self.path, self.path + ".1")
        with open(self.path, "w"):  # logrotate's create mode: a new empty file
            pass
        self.now += 0.5
        self.record("half a second later")  # not checked yet: still the old file
        self.now += 0.5
        self.record("a second later")
        self.assertEqual(self.commands(self.path + ".1"), ["before", "half a second later"])
        self.assertEqual(self.commands(self.path), ["a second later"])

    def test_a_deleted_file_is_created_again(self) -> None:
        events = capture_log(self)
        self.record("before")
        os.unlink(self.path)
        self.now += 1
        self.record("after")
        self.assertEqual(self.commands(self.path), ["after"])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        [reopened] = [e for e in events if "reopened" in e.get("log_format", "")]
        self.assertEqual(reopened["why"], "the file was moved or deleted")

    def test_the_path_is_checked_at_most_once_a_second(self) -> None:
        stats: list[str] = []
        real_stat = os.stat
        def counted_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            stats.append(path)
            return real_stat(path, *args, **kwargs)

        self.patch(os, "stat", counted_stat)
        for _ in range(80):  # 16 batches a second for 5 s: checked at +1, +2, +3 and +4 s
            self.record("x")
            self.now += 1 / 16
        self.assertEqual(len(stats), 4)

    def test_a_path_that_cannot_be_reopened_is_said_once(self) -> None:
        events = capture_log(self)
        moved = self.dir + ".moved"
        os.rename(self.dir, moved)  # the whole directory went away
        def put_back() -> None:
            if os.path.exists(moved):
                os.rename(moved, self.dir)

        self.addCleanup(put_back)
        for i in range(3):
            self.now += 1
            self.record(f"r{i}")
        errors = [e for e in events if "cannot reopen" in e.get("log_format", "")]
        self.assertEqual(len(errors), 1)
        self.assertEqual(self.commands(os.path.join(moved, "audit.log")), ["r0", "r1", "r2"])


class DiskFullTests(unittest.TestCase):
    """A record is whole or absent, and the main log counts the lost ones exactly."""

    def setUp(self) -> None:

        self.dir = tempfile.mkdtemp()
        self.addCleanup(lambda: shutil.rmtree(self.dir, True))
        self.path = os.path.join(self.dir, "audit.log")
        self.clock = Clock()
        self.audit = AuditFile(self.path, self.clock, clock=lambda: 1000.0)
        self.audit.open()
        self.addCleanup(self.audit.close)
        self.events = capture_log(self)

    def batch(self, *commands: str) -> None:
        for command in commands:
            self.audit.record("s1", "command", "u", "p", "line", command, {}, "ok", 0.0, None)
        self.clock.advance(FLUSH_DELAY)

    def disk_fills_after(self, room: int) -> None:
        """The next writes take ``room`` bytes in all, then the disk is full."""
        state = {"room": room}

        def write(fd: int, data: memoryview) -> int:
            if state["room"] <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = os.write(fd, data[:state["room"]])
            state["room"] -= n
            return n

        self.patch(self.audit, "_write", write)

    def lost(self) -> list[dict]:
        return [e for e in self.events if "lost" in e.get("log_format", "")]

    def read(self) -> str:
        with open(self.path, encoding="utf-8") as f:
            return f.read()

    def test_a_torn_batch_keeps_its_whole_lines_only(self) -> None:
        self.batch("one")
        line = len(self.read())
        self.disk_fills_after(2 * line + line // 2)  # two lines and a half of four
        self.batch("a", "b", "c", "d")
        self.assertEqual([json.loads(r)["command"] for r in self.read().splitlines()],
                         ["one", "a", "b"])
        self.assertTrue(self.read().endswith("\n"))
        [lost] = self.lost()
        self.assertEqual((lost["lost"], lost["written"], lost["lines"]), (2, 2, 4))
        self.assertEqual(lost["error"], "No space left on device")
        self.assertFalse(lost.get("log_failure"))  # one line, no traceback
        # Space again: the next batch is whole lines of its own.
        self.patch(self.audit, "_write", os.write)
        self.batch("e")
        self.assertEqual([json.loads(r)["command"] for r in self.read().splitlines()],
                         ["one", "a", "b", "e"])

    def test_nothing_written_loses_the_whole_batch(self) -> None:
        self.disk_fills_after(0)
        self.batch("a", "b", "c")
        self.assertEqual(self.read(), "")
        self.assertEqual(self.lost()[0]["lost"], 3)

    def test_a_partial_line_that_cannot_be_cut_ends_before_the_next_batch(self) -> None:
        def no_truncate(fd: int, length: int) -> None:
            raise OSError(errno.EINVAL, "Invalid argument")

        self.patch(os, "ftruncate", no_truncate)
        self.disk_fills_after(10)
        self.batch("a", "b")
        self.assertEqual(self.lost()[0]["lost"], 2)
        self.patch(self.audit, "_write", os.write)
        self.batch("c")
        rows = self.read().split("\n")
        self.assertEqual(len(rows[0]), 10)  # the torn part, on a line of its own
        self.assertEqual(json.loads(rows[1])["command"], "c")
        self.assertEqual(rows[2:], [""])


def test_disk_full_on_a_real_tiny_filesystem(tmp_path) -> None:
    """A real 64 KiB tmpfs (mounting needs root: skipped otherwise)."""
    import subprocess

    import pytest

    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; DiskFullTests covers it with a fake writer")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        from twisted.logger import globalLogPublisher

        events: list[dict] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        try:
            clock = Clock()
            audit = AuditFile(str(mount / "audit.log"), clock)
            audit.open()
            sent = 0

            def lost() -> list[dict]:
                return [e for e in events if "lost" in e.get("log_format", "")]

            while len(lost()) < 3:  # batches of seven lines until three could not be written
                for _ in range(7):
                    audit.record("s1", "command", "u", "p", "line", f"c{sent}",
                                 {"pad": "x" * 97}, "ok", 0.0, None)
                    sent += 1
                clock.advance(FLUSH_DELAY)
                assert sent < 10_000, "the tmpfs never filled up"
            audit.close()
        finally:
            globalLogPublisher.removeObserver(observer)
        text = (mount / "audit.log").read_text()
        rows = text.splitlines()
        assert text.endswith("\n")  # no partial line
        assert [json.loads(r)["command"] for r in rows] == [f"c{i}" for i in range(len(rows))]
        assert sum(e["lost"] for e in lost()) == sent - len(rows)
        assert 0 < len(rows) < sent
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
