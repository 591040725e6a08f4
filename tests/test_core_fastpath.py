"""The core's synchronous path (``run_text``) gives the same replies, counts and
audit events as the Deferred path, and hands back a Deferred only when a
command is really still running."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel
from twisted.trial import unittest

from cmdserver.audit import NAMESPACE, audit_publisher, discard
from cmdserver.commands import default_registry
from cmdserver.commands.base import Command, Context
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore, TextReply
from cmdserver.errors import CommandError
from cmdserver.policy import Policy
from tests.helpers import Later, capture_log


class Refuse(Command):
    name = "refuse"
    usage = "refuse"

    def run(self, ctx: Context) -> Deferred:
        raise CommandError("not today")


class Crash(Command):
    name = "crash"
    usage = "crash"

    def run(self, ctx: Context) -> Deferred:
        raise RuntimeError("boom")


class FailedAlready(Command):
    name = "failed"
    usage = "failed"

    def run(self, ctx: Context) -> Deferred:
        return fail(CommandError("failed at once"))


class Plain(Command):
    """Returns a plain value, not a Deferred: the core accepts that too."""

    name = "plain"
    usage = "plain"

    def run(self, ctx: Context) -> Any:
        return "plain value"


class Chained(Command):
    """A fired Deferred whose result waits on another, unfired Deferred."""

    name = "chained"
    usage = "chained"

    def __init__(self) -> None:
        self.inner: Deferred = Deferred()

    def run(self, ctx: Context) -> Deferred:
        return succeed(None).addCallback(lambda _: self.inner)


class FastPathTests(unittest.TestCase):
    def setUp(self) -> None:
        self.registry = default_registry(LogSource("/nonexistent"))
        self.later = Later()
        self.chained = Chained()
        for command in (self.later, Refuse(), Crash(), FailedAlready(), Plain(), self.chained):
            self.registry.add(command)
        self.reactor = MemoryReactorClock()
        self.core = CommandCore(self.registry, Policy(["/"]), self.reactor)
        self.ctx = Context(self.core, user="u", peer="p", door="test")
        self.events: list[dict] = []
        self.observer = cast(ILogObserver, self.events.append)
        audit_publisher.addObserver(self.observer)
        self.addCleanup(audit_publisher.removeObserver, self.observer)

    def test_sync_command_gives_reply_itself(self) -> None:
        reply = self.core.run_text(self.ctx, "ping")
        self.assertEqual(reply, TextReply(["pong"], True))
        self.assertEqual(self.core.stats.commands["ping"], 1)
        self.assertEqual(self.core.stats.in_flight, 0)
        [event] = self.events
        self.assertEqual((event["command"], event["outcome"], event["log_namespace"],
                          event["log_level"]), ("ping", "ok", NAMESPACE, LogLevel.info))

    def test_run_line_still_a_deferred(self) -> None:
        d = self.core.run_line(self.ctx, "ping")
        self.assertIsInstance(d, Deferred)
        self.assertEqual(self.successResultOf(d), TextReply(["pong"], True))

    def test_plain_value(self) -> None:
        self.assertEqual(self.core.run_text(self.ctx, "plain"),
                         TextReply(["plain value"], True))
        self.assertEqual(self.successResultOf(self.core.call(self.ctx, "plain")), "plain value")

    def test_pending_command_gives_deferred(self) -> None:
        d = self.core.run_text(self.ctx, "later")
        assert isinstance(d, Deferred)
        self.assertNoResult(d)
        self.assertEqual(self.core.stats.in_flight, 1)
        self.assertEqual(self.events, [])  # audited when it ends, not before
        self.later.pending[0].callback("done")
        self.assertEqual(self.successResultOf(d), TextReply(["done"], True))
        self.assertEqual(self.core.stats.in_flight, 0)
        self.assertEqual(self.events[0]["outcome"], "ok")

    def test_fired_deferred_waiting_on_another_is_pending(self) -> None:
        d = self.core.run_text(self.ctx, "chained")
        assert isinstance(d, Deferred)
        self.assertNoResult(d)
        self.chained.inner.callback("inner")
        self.assertEqual(self.successResultOf(d), TextReply(["inner"], True))

    def test_cancel_pending(self) -> None:
        d = self.core.run_text(self.ctx, "later")
        assert isinstance(d, Deferred)
        d.cancel()
        self.assertEqual(self.successResultOf(d), TextReply(["Error: cancelled"], False))
        self.assertEqual(self.events[0]["outcome"], "cancelled")
        self.assertEqual(self.core.stats.in_flight, 0)

    def test_refusal_raised_in_run(self) -> None:
        self.assertEqual(self.core.run_text(self.ctx, "refuse"),
                         TextReply(["Error: not today"], False))
        self.assertEqual(self.core.stats.errors, 1)
        self.assertEqual(self.events[0]["outcome"], "error")
        self.assertEqual(self.events[0]["error"], "not today")
        f = self.failureResultOf(self.core.call(self.ctx, "refuse"), CommandError)
        self.assertEqual(str(f.value), "not today")

    def test_already_failed_deferred(self) -> None:
        self.assertEqual(self.core.run_text(self.ctx, "failed"),
                         TextReply(["Error: failed at once"], False))
        self.assertEqual(self.core.stats.in_flight, 0)

    def test_crash_is_logged_and_hidden(self) -> None:
        reply = self.core.run_text(self.ctx, "crash")
        self.assertEqual(reply, TextReply(["Error: internal error (see the server log)"],
                                          False))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.events[0]["outcome"], "internal-error")
        self.assertEqual(self.core.stats.in_flight, 0)

    def test_not_found_and_refused_parse(self) -> None:
        self.assertEqual(self.core.run_text(self.ctx, "nope x"),
                         TextReply(["Command not found."], False))
        reply = self.core.run_text(self.ctx, "ping extra")
        assert isinstance(reply, TextReply)
        self.assertEqual(reply.ok, False)
        self.assertEqual([e["outcome"] for e in self.events], ["not-found", "refused"])
        self.assertEqual(self.events[0]["args"], {"argv": ["x"]})

    def test_without_audit_observer_nothing_is_recorded(self) -> None:
        # --audit-log none: no record anywhere, not even in the main log.
        audit_publisher.removeObserver(self.observer)
        self.addCleanup(audit_publisher.addObserver, self.observer)
        self.assertIs(audit_publisher.record, discard)
        logged = capture_log(self)
        self.assertEqual(self.core.run_text(self.ctx, "ping"), TextReply(["pong"], True))
        reply = self.core.run_text(self.ctx, "nope")
        assert isinstance(reply, TextReply)
        self.assertEqual(reply.ok, False)
        session = self.core.open_session("line", "p")
        self.core.login(session, "u", "password", "failed")
        self.core.close_session(session)
        self.assertEqual(self.events, [])
        self.assertEqual([e for e in logged if e.get("log_namespace") == NAMESPACE], [])
        self.assertEqual(self.core.stats.commands["ping"], 1)  # still counted

    def test_with_audit_observer_events_stay_out_of_the_global_log(self) -> None:
        logged = capture_log(self)
        self.core.run_text(self.ctx, "ping")
        self.assertEqual(len(self.events), 1)
        self.assertEqual([e for e in logged if e.get("log_namespace") == NAMESPACE], [])
