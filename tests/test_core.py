"""The command core: splitting, dispatch, errors, audit events and stats."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from cmdserver.commands.base import Command, Context
from cmdserver.core import INTERNAL_ERROR, TextReply, split_line
from cmdserver.errors import CommandError, NotFound, UsageError
from tests.helpers import capture_audit, capture_log, make_context, make_core


class Boom(Command):
    name = "boom"
    summary = "Raise an unexpected exception."
    usage = "boom"

    def run(self, ctx: Context) -> defer.Deferred:
        raise RuntimeError("secret internals /etc/shadow")


class Slow(Command):
    name = "slow"
    summary = "Never finishes until cancelled."
    usage = "slow"

    def __init__(self) -> None:
        self.cancelled = 0

    def run(self, ctx: Context) -> defer.Deferred:
        def cancel(_: Any) -> None:
            self.cancelled += 1
        return defer.Deferred(cancel)


class SplitTests(unittest.SynchronousTestCase):
    def test_plain_words(self) -> None:
        self.assertEqual(split_line("  ls   /tmp  "), ["ls", "/tmp"])

    def test_quotes_group_words(self) -> None:
        self.assertEqual(split_line('comphash "my file.txt"'), ["comphash", "my file.txt"])
        self.assertEqual(split_line("comphash 'a b'"), ["comphash", "a b"])

    def test_unbalanced_quote_is_a_usage_error(self) -> None:
        with self.assertRaises(UsageError) as e:
            split_line('comphash "open')
        self.assertEqual(e.exception.text, "Error: no closing quotation")

    def test_trailing_backslash(self) -> None:
        self.assertRaises(UsageError, split_line, "ls \\")


class CoreTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        root = self.mktemp()
        os.makedirs(root)  # the jail opens its root
        self.core = make_core(root)
        self.events = capture_audit(self, capture_log(self))
        self.ctx = make_context(self.core)

    def audit(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "cmdserver.audit"]

    def run_line(self, line: str) -> TextReply:
        return self.successResultOf(self.core.run_line(self.ctx, line))

    def test_ping(self) -> None:
        self.assertEqual(self.run_line("ping"), TextReply(["pong"], True))

    def test_empty_line_prints_nothing(self) -> None:
        self.assertEqual(self.run_line("   "), TextReply([], True))
        self.assertEqual(self.audit(), [])

    def test_unknown_command(self) -> None:
        self.assertEqual(self.run_line("rm -rf /"), TextReply(["Command not found."], False))
        [event] = self.audit()
        self.assertEqual(event["command"], "rm")
        self.assertEqual(event["outcome"], "not-found")

    def test_usage_error_is_one_line(self) -> None:
        reply = self.run_line("ping extra")
        self.assertFalse(reply.ok)
        self.assertEqual(reply.lines, ["Error: usage: ping"])
        self.assertEqual(self.audit()[0]["outcome"], "refused")

    def test_audit_event_fields(self) -> None:
        self.run_line("ping")
        [event] = self.audit()
        expected: dict[str, object] = {"user": "tester", "peer": "127.0.0.1:5555", "door": "line",
                                       "command": "ping", "args": {}, "outcome": "ok",
                                       "error": None}
        for key, value in expected.items():
            self.assertEqual(event[key], value)
        self.assertIsInstance(event["duration"], float)

    def test_internal_error_hides_the_traceback(self) -> None:
        self.core.registry.add(Boom())
        reply = self.run_line("boom")
        self.assertEqual(reply, TextReply([f"Error: {INTERNAL_ERROR}"], False))
        self.assertNotIn("shadow", " ".join(reply.lines))
        # ...but the traceback reaches the server log.
        failures = [e for e in self.events if e.get("log_failure") is not None]
        self.assertEqual(len(failures), 1)
        self.assertEqual(self.audit()[0]["outcome"], "internal-error")
        self.flushLoggedErrors(RuntimeError)

    def test_cancel_reaches_the_handler_and_is_audited(self) -> None:
        slow = Slow()
        self.core.registry.add(slow)
        d = self.core.run_line(self.ctx, "slow")
        self.assertEqual(self.core.stats.in_flight, 1)
        d.cancel()
        self.assertEqual(slow.cancelled, 1)
        self.assertEqual(self.successResultOf(d), TextReply(["Error: cancelled"], False))
        self.assertEqual(self.core.stats.in_flight, 0)
        self.assertEqual(self.audit()[0]["outcome"], "cancelled")

    def test_stats_count_commands_and_errors(self) -> None:
        self.run_line("ping")
        self.run_line("ping")
        self.run_line("help nosuch")
        snapshot = self.core.stats.snapshot(self.core.reactor.seconds())
        self.assertEqual(snapshot["commands"], {"help": 1, "ping": 2})
        self.assertEqual(snapshot["errors"], 1)
        self.assertEqual(snapshot["in_flight"], 0)

    def test_call_returns_values(self) -> None:
        self.assertEqual(self.successResultOf(self.core.call(self.ctx, "ping")), "pong")
        help_ = self.successResultOf(self.core.call(self.ctx, "help"))
        self.assertEqual(list(help_), [c.name for c in self.core.registry.commands()])
        self.assertEqual(help_["ping"], "Answer pong: a cheap liveness probe.")

    def test_call_unknown_command_fails_cleanly(self) -> None:
        f = self.failureResultOf(self.core.call(self.ctx, "nosuch"), NotFound)
        self.assertEqual(str(f.value), "Command not found.")

    def test_call_error_is_a_command_error(self) -> None:
        f = self.failureResultOf(self.core.call(self.ctx, "comphash", path="../x"),
                                 CommandError)
        self.assertEqual(f.value.text, "Error: path outside allowed roots")

    def test_duplicate_command_names_are_refused(self) -> None:
        self.assertRaises(ValueError, self.core.registry.add, Boom(), "ping")


def test_an_error_is_one_line_whatever_it_quotes():
    error = CommandError("no such file: a\nb\x1b[2J\tc")
    assert error.text == "Error: no such file: a\\x0ab\\x1b[2J\\x09c"
    assert CommandError("caf\u00e9 \u2013 ok").message == "caf\u00e9 \u2013 ok"
