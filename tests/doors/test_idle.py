"""The idle timeouts of a door's connections, on one timer (cmdserver/doors/idle.py)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial import unittest

from cmdserver.doors.idle import IdleClock


class Conn:
    def __init__(self, name: str, log: list[str], stay: int = 0) -> None:
        self.name = name
        self.log = log
        self.stay = stay  # times it touches itself instead of going (a long command)
        self.idle: IdleClock | None = None

    def timeoutConnection(self) -> None:
        self.log.append(self.name)
        if self.stay and self.idle is not None:
            self.stay -= 1
            self.idle.touch(self)


class IdleClockTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.idle = IdleClock(self.clock, 30)
        self.log: list[str] = []

    def conn(self, name: str, stay: int = 0) -> Conn:
        c = Conn(name, self.log, stay)
        c.idle = self.idle
        self.idle.touch(c)
        return c

    def test_expires_a_timeout_after_the_last_activity(self) -> None:
        a = self.conn("a")
        self.clock.advance(29)
        self.idle.touch(a)
        self.clock.advance(29.9)
        self.assertEqual(self.log, [])
        self.clock.advance(0.1)
        self.assertEqual(self.log, ["a"])
        self.assertEqual(len(self.idle), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_timer_for_many_connections_each_on_time(self) -> None:
        conns = []
        for i in range(10):  # c0 … c9 start at 0 … 9 s
            conns.append(self.conn(f"c{i}"))
            self.clock.advance(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.idle.touch(conns[0])  # at 10 s the oldest becomes the newest
        self.clock.advance(20.5)  # 30.5 s: c1 is due at 31
        self.assertEqual(self.log, [])
        for _ in range(9):
            self.clock.advance(1)  # 39.5 s
        self.assertEqual(self.log, [f"c{i}" for i in range(1, 10)])
        self.clock.advance(0.5)
        self.assertEqual(self.log[-1], "c0")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expiry_in_order_of_last_activity(self) -> None:
        a, b, c = self.conn("a"), self.conn("b"), self.conn("c")
        self.clock.advance(10)
        self.idle.touch(a)
        self.clock.advance(10)
        self.idle.touch(b)
        for _ in range(60):
            self.clock.advance(1)
        self.assertEqual(self.log, ["c", "a", "b"])
        del c

    def test_a_connection_may_stay_by_touching_itself(self) -> None:
        self.conn("busy", stay=2)
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertEqual(self.log, ["busy", "busy"])
        self.clock.advance(30)
        self.assertEqual(self.log, ["busy", "busy", "busy"])
        self.assertEqual(len(self.idle), 0)

    def test_one_failing_connection_does_not_stop_the_others(self) -> None:
        """A connection whose timeout handler raises is logged and aborted; the
        others due at the same time are still told, and the timer goes on."""
        from tests.helpers import capture_log

        logged = capture_log(self)
        broken = self.conn("broken")
        aborted: list[bool] = []

        class Transport:
            def abortConnection(self) -> None:
                aborted.append(True)

        def fail() -> None:
            raise RuntimeError("write failed")

        broken.timeoutConnection = fail  # type: ignore[method-assign]
        broken.transport = Transport()  # type: ignore[attr-defined]
        self.conn("next")
        self.clock.advance(30)
        self.assertEqual(self.log, ["next"])
        self.assertEqual(aborted, [True])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(any("idle timeout" in str(e.get("log_format")) for e in logged))
        self.conn("later")
        self.clock.advance(30)
        self.assertEqual(self.log, ["next", "later"])

    def test_forget_leaves_no_timer_behind(self) -> None:
        a, b = self.conn("a"), self.conn("b")
        self.idle.forget(a)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.idle.forget(b)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.idle.forget(b)  # twice is harmless
        self.clock.advance(100)
        self.assertEqual(self.log, [])

    def test_a_forgotten_oldest_does_not_expire_the_next_early(self) -> None:
        a = self.conn("a")
        self.clock.advance(20)
        self.conn("b")
        self.idle.forget(a)
        self.clock.advance(10)  # a's deadline: the timer wakes, b is not due
        self.assertEqual(self.log, [])
        self.clock.advance(20)
        self.assertEqual(self.log, ["b"])
