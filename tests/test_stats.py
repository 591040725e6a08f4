"""What the core counts per command for /metrics: outcomes by door, durations."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from cmdserver.commands.base import Command, Context
from cmdserver.errors import CommandError
from cmdserver.stats import DURATION_BUCKETS
from tests.helpers import Later, make_context, make_core


class Fails(Command):
    name = "fails"
    summary = "Fail at once."

    def run(self, ctx: Context) -> Any:
        raise CommandError("no")


class Stuck(Command):
    name = "stuck"
    summary = "Never end."
    timeout = 2

    def run(self, ctx: Context) -> defer.Deferred:
        return defer.Deferred()


class CountingTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.core = make_core(self.mktemp())
        self.later = Later()
        for command in (self.later, Fails(), Stuck()):
            self.core.registry.add(command)
        self.clock = self.core.reactor
        self.line = make_context(self.core, door="line")
        self.pb = make_context(self.core, door="pb")

    def test_every_ending_is_counted_by_command_door_and_outcome(self) -> None:
        core = self.core
        core.run_text(self.line, "ping")
        core.run_text(self.line, "ping")
        self.successResultOf(core.call(self.pb, "ping"))
        core.run_text(self.line, "fails")
        core.run_text(self.line, "lastlog 0")  # refused before it ran
        self.failureResultOf(core.call(self.pb, "lastlog", n="x"))
        core.run_text(self.line, "nosuch")  # no label for a name nobody serves
        d = core.run_line(self.line, "stuck")
        self.clock.advance(2)
        self.assertIn("deadline", self.successResultOf(d).lines[0])
        d = core.run_line(self.pb, "later")
        d.cancel()
        self.assertEqual(core.stats.outcomes(), {
            ("ping", "line", "ok"): 2, ("ping", "pb", "ok"): 1,
            ("fails", "line", "ok"): 0, ("fails", "line", "error"): 1,
            ("lastlog", "line", "refused"): 1, ("lastlog", "pb", "refused"): 1,
            ("stuck", "line", "ok"): 0, ("stuck", "line", "deadline"): 1,
            ("later", "pb", "ok"): 0, ("later", "pb", "cancelled"): 1,
        })
        self.assertEqual(core.stats.commands["ping"], 3)  # by name, as before
        self.assertEqual(core.stats.not_found, 1)

    def test_a_running_command_is_counted_when_it_ends(self) -> None:
        d = self.core.run_line(self.line, "later")
        self.assertEqual(self.core.stats.outcomes(), {})
        self.clock.advance(0.3)
        self.later.pending[0].callback("done")
        self.successResultOf(d)
        self.assertEqual(self.core.stats.outcomes(), {("later", "line", "ok"): 1})

    def test_durations_fall_in_their_buckets(self) -> None:
        for seconds in (0.3, 0.3, 45):
            d = self.core.run_line(self.line, "later")
            self.clock.advance(seconds)
            self.later.pending.pop().callback("done")
            self.successResultOf(d)
        self.core.run_text(self.line, "ping")  # the fake clock stands still: 0 s
        times = self.core.stats.durations["line"]["later"]
        self.assertEqual(len(times), len(DURATION_BUCKETS) + 2)
        self.assertEqual(times[DURATION_BUCKETS.index(0.5)], 2)  # 0.25 < 0.3 <= 0.5
        self.assertEqual(times[DURATION_BUCKETS.index(60.0)], 1)
        self.assertEqual(sum(times[:-1]), 3)
        self.assertAlmostEqual(times[-1], 45.6)
        self.assertEqual(self.core.stats.durations["line"]["ping"][0], 1)
        self.assertEqual(self.core.stats.durations["line"]["ping"][-1], 0)
