"""Commands in flight: at most so many per connection and per client address, on
every door, refused with one clear line before they run."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial import unittest

from cmdserver.core import TextReply
from cmdserver.errors import TooManyCalls
from tests.helpers import Later, capture_audit, make_context, make_core


class CallLimitTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.core = make_core(self.mktemp())
        self.core.max_calls_per_address = 4
        self.core.max_calls_per_session = 3
        self.later = Later()
        self.core.registry.add(self.later)
        self.audit = capture_audit(self)

    def ctx(self, peer: str, door: str = "line"):
        session = self.core.open_session(door, peer)
        return make_context(self.core, peer=peer, door=door, session_id=session.id)

    def test_one_address_may_run_so_many_at_once(self) -> None:
        running = [self.core.run_text(self.ctx(f"10.0.0.1:{port}"), "later")
                   for port in range(4)]
        refused = self.core.run_text(self.ctx("10.0.0.1:9"), "later")
        self.assertEqual(refused, TextReply(
            ["Error: too many calls in flight from this address (the limit is 4)"], False))
        self.assertEqual(len(self.later.pending), 4)  # the refused one never ran
        record = self.audit[-1]
        self.assertEqual((record["command"], record["outcome"]), ("later", "refused"))
        # Another address is not held up, and neither is a UNIX-socket client.
        self.assertIsInstance(self.core.run_text(self.ctx("10.0.0.2:1"), "later"),
                              type(running[0]))
        self.core.run_text(self.ctx("local"), "later")
        self.assertEqual(len(self.later.pending), 6)
        # One ends: the address may start another.
        self.later.pending[0].callback("done")
        self.core.run_text(self.ctx("10.0.0.1:10"), "later")
        self.assertEqual(len(self.later.pending), 7)

    def test_an_ipv6_64_is_one_address(self) -> None:
        """Another address of the same /64 shares the limit; another /64 does not."""
        for i in range(4):
            self.core.run_text(self.ctx(f"[2001:db8:0:1::{i + 1}]:1"), "later")
        refused = self.core.run_text(self.ctx("[2001:db8:0:1:ffff::9]:2"), "later")
        self.assertEqual(refused.lines,  # type: ignore[union-attr]
                         ["Error: too many calls in flight from this address (the limit is 4)"])
        self.core.run_text(self.ctx("[2001:db8:0:2::1]:1"), "later")
        self.assertEqual(len(self.later.pending), 5)

    def test_commands_that_answer_at_once_hold_nothing(self) -> None:
        ctx = self.ctx("10.0.0.1:1")
        for _ in range(50):
            self.assertEqual(self.core.run_text(ctx, "ping"), TextReply(["pong"], True))

    def test_one_connection_may_run_so_many_at_once(self) -> None:
        ctx = self.ctx("10.0.0.3:1", door="pb")
        calls = [self.core.call(ctx, "later") for _ in range(3)]
        refused = self.core.call(ctx, "later")
        failure = self.failureResultOf(refused, TooManyCalls)
        self.assertEqual(str(failure.value),
                         "too many calls in flight on this connection (the limit is 3)")
        self.assertEqual(self.core.session_for(ctx).running, 3)
        self.core.call(self.ctx("10.0.0.3:2", door="pb"), "later")  # another connection
        calls[0].cancel()
        self.failureResultOf(calls[0], CancelledError)
        self.core.call(ctx, "later")
        self.assertEqual(self.core.session_for(ctx).running, 3)

    def test_no_limit(self) -> None:
        self.core.max_calls_per_address = 0
        for port in range(10):
            self.core.run_text(self.ctx(f"10.0.0.1:{port}"), "later")
        self.assertEqual(len(self.later.pending), 10)
