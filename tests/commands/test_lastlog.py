"""lastlog: the child's argv, streamed output, errors, cancellation, source choice."""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial import unittest

from cmdserver.commands import lastlog
from cmdserver.commands.base import ListSink
from cmdserver.commands.lastlog import LastLog, LogSource, choose_source
from cmdserver.core import TextReply
from tests.helpers import ProcessReactor, make_context, make_core


class LastLogTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.core = make_core(self.mktemp(), reactor=self.reactor,
                              source=LogSource("/var/log/syslog"))
        self.core.registry._commands["lastlog"] = LastLog(
            LogSource("/var/log/syslog"), tail="/usr/bin/tail", journalctl="/bin/journalctl")
        self.out = ListSink()
        self.ctx = make_context(self.core, out=self.out)

    def start(self, line: str = "lastlog"):
        d = self.core.run_line(self.ctx, line)
        return d, self.reactor.processes[-1]

    def test_runs_tail_with_an_argument_list(self) -> None:
        d, child = self.start("lastlog 3")
        self.assertEqual(child.executable, "/usr/bin/tail")
        self.assertEqual(child.args, ["tail", "-n", "3", "--", "/var/log/syslog"])
        self.assertEqual(child.env["LC_ALL"], "C")
        self.assertTrue(child.stdin_closed)
        self.assertNoResult(d)

    def test_default_is_ten_lines(self) -> None:
        _, child = self.start()
        self.assertEqual(child.args[2], "10")

    def test_output_streams_as_it_comes(self) -> None:
        d, child = self.start("lastlog 3")
        child.out(b"one\ntw")
        self.assertEqual(self.out.lines, ["Begin lastlog", "one"])
        child.out(b"o\nthree")
        self.assertEqual(self.out.lines, ["Begin lastlog", "one", "two"])
        child.exit(0)
        self.assertEqual(self.out.lines, ["Begin lastlog", "one", "two", "three"])
        self.assertEqual(self.successResultOf(d), TextReply(["End lastlog"], True))

    def test_empty_log_is_still_framed(self) -> None:
        d, child = self.start()
        child.exit(0)
        self.assertEqual(self.out.lines, ["Begin lastlog"])
        self.assertEqual(self.successResultOf(d).lines, ["End lastlog"])

    def test_invalid_utf8_is_replaced(self) -> None:
        d, child = self.start()
        child.out(b"caf\xe9\n")
        child.exit(0)
        self.assertEqual(self.out.lines[1], "caf\N{REPLACEMENT CHARACTER}")

    def test_value_is_the_list_of_lines(self) -> None:
        d = self.core.call(self.ctx, "lastlog", n=2)
        child = self.reactor.processes[-1]
        child.out(b"a\nb\n")
        child.exit(0)
        self.assertEqual(self.successResultOf(d), ["a", "b"])

    def test_unreadable_source(self) -> None:
        d, child = self.start()
        child.out(b"tail: cannot open '/var/log/syslog' for reading: Permission denied\n", 2)
        child.exit(1)
        self.assertEqual(self.successResultOf(d), TextReply(
            ["Error: lastlog failed: cannot open '/var/log/syslog' for reading: "
             "Permission denied"], False))
        self.assertEqual(self.out.lines, [])

    def test_killed_child_without_stderr(self) -> None:
        d, child = self.start()
        child.exit(None, 9)
        [line] = self.successResultOf(d).lines
        self.assertTrue(line.startswith("Error: lastlog failed: "), line)

    def test_cancel_kills_the_child(self) -> None:
        d, child = self.start()
        child.out(b"partial\n")
        d.cancel()
        self.assertEqual(child.signals, ["KILL"])
        self.assertEqual(self.successResultOf(d).lines, ["Error: cancelled"])
        child.out(b"late\n")  # output after the cancel is dropped
        child.exit(None, 9)
        self.assertEqual(self.out.lines, ["Begin lastlog", "partial"])

    def test_cancel_after_exit_race(self) -> None:
        d, child = self.start()
        child.ended = True  # the child is gone but processEnded has not run yet
        d.cancel()
        self.assertEqual(self.successResultOf(d).lines, ["Error: cancelled"])

    def test_bad_counts(self) -> None:
        for line, message in [
            ("lastlog 0", "Error: n must be 1..1000, not 0"),
            ("lastlog 1001", "Error: n must be 1..1000, not 1001"),
            ("lastlog -5", "Error: n must be 1..1000, not -5"),
            ("lastlog x", "Error: not a number: x; usage: lastlog [N]   (1..1000)"),
            ("lastlog 1 2", "Error: usage: lastlog [N]   (1..1000)"),
        ]:
            self.assertEqual(self.successResultOf(self.core.run_line(self.ctx, line)).lines,
                             [message])
        self.assertEqual(self.reactor.processes, [])

    def test_journal_source(self) -> None:
        self.core.registry._commands["lastlog"] = LastLog(LogSource(None),
                                                          journalctl="/bin/journalctl")
        _, child = self.start("lastlog 7")
        self.assertEqual(child.executable, "/bin/journalctl")
        self.assertEqual(child.args, ["journalctl", "-n", "7", "--no-pager"])

    def test_missing_programs_and_sources(self) -> None:
        cases = [
            (LastLog(LogSource("/x"), tail=None), "tail not found"),
            (LastLog(LogSource(None), journalctl=None), "journalctl not found"),
            (LastLog(LogSource(""), tail="/usr/bin/tail"), "no log source is configured"),
        ]
        for command, reason in cases:
            command.tail = None if reason == "tail not found" else command.tail
            command.journalctl = None if "journalctl" in reason else command.journalctl
            self.core.registry._commands["lastlog"] = command
            reply = self.successResultOf(self.core.run_line(self.ctx, "lastlog"))
            self.assertEqual(reply.lines, [f"Error: lastlog failed: {reason}"])

    def test_spawn_failure(self) -> None:
        self.reactor.spawn_error = OSError(24, "Too many open files")
        reply = self.successResultOf(self.core.run_line(self.ctx, "lastlog"))
        self.assertEqual(reply.lines, ["Error: lastlog failed: Too many open files"])


class SourceChoiceTests(unittest.SynchronousTestCase):
    def test_configured_source_wins(self) -> None:
        self.assertEqual(choose_source("/some/file", "/own"), LogSource("/some/file"))
        self.assertEqual(choose_source("journal", "/own"), LogSource(None))

    def test_first_existing_syslog_file(self) -> None:
        present = os.path.abspath(self.mktemp())
        open(present, "w").close()
        self.patch(lastlog, "SYSLOG_FILES", ("/nonexistent/syslog", present))
        self.assertEqual(choose_source(None, "/own"), LogSource(present))

    def test_journal_then_own_log(self) -> None:
        self.patch(lastlog, "SYSLOG_FILES", ("/nonexistent/syslog",))
        self.patch(lastlog, "journal_works", lambda: True)
        self.assertEqual(choose_source(None, "/own"), LogSource(None))
        self.patch(lastlog, "journal_works", lambda: False)
        self.assertEqual(choose_source(None, "/own"), LogSource("/own"))

    def test_journal_works_without_journalctl(self) -> None:
        self.assertFalse(lastlog.journal_works("/nonexistent/journalctl"))


class RealTailTests(unittest.TestCase):
    """The real reactor and the real tail(1)."""

    def setUp(self) -> None:
        self.log = os.path.abspath(self.mktemp())
        with open(self.log, "w") as f:
            f.writelines(f"line {i}\n" for i in range(50))
        self.core = make_core(self.mktemp(), reactor=reactor, source=LogSource(self.log))
        self.out = ListSink()
        self.ctx = make_context(self.core, out=self.out)

    def test_tail(self) -> Deferred[None]:
        d = self.core.run_line(self.ctx, "lastlog 3")

        def check(reply: TextReply) -> None:
            self.assertEqual(self.out.lines, ["Begin lastlog", "line 47", "line 48", "line 49"])
            self.assertEqual(reply, TextReply(["End lastlog"], True))

        return d.addCallback(check)

    def test_missing_source(self) -> Deferred[None]:
        os.unlink(self.log)
        d = self.core.run_line(self.ctx, "lastlog 3")

        def check(reply: TextReply) -> None:
            self.assertFalse(reply.ok)
            self.assertIn("No such file or directory", reply.lines[0])
            self.assertTrue(reply.lines[0].startswith("Error: lastlog failed: cannot open"))

        return d.addCallback(check)
