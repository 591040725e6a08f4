"""The file-work threads: a share per client address, FIFO per address, round robin
across addresses, cancelled work that never starts, a thread that cannot start."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.python.failure import Failure
from twisted.trial import unittest

from cmdserver.auth.credentials import HashPool
from cmdserver.commands.base import ListSink
from cmdserver.commands.files import ComputeHash
from cmdserver.core import CommandCore
from cmdserver.errors import CommandError
from cmdserver.policy import Policy
from cmdserver.sources import address_of
from cmdserver.workers import (
    BACKGROUND_NICE,
    NO_THREAD,
    FairPool,
    Threads,
    background,
)
from tests.helpers import ProcessReactor, make_context


class InlineReactor(ProcessReactor):
    """callFromThread runs at once: the fake threads below report on the test's thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)


class FakeThreads:
    """Jobs the test finishes by hand, in any order; ``refuse`` makes starting fail."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Callable[[], Any], Callable[[bool, Any], None]]] = []
        self.refuse = False

    def run(self, work: Callable[[], Any], report: Callable[[bool, Any], None]) -> None:
        if self.refuse:
            raise RuntimeError("can't start new thread")
        self.jobs.append((work, report))

    def finish(self, index: int = 0) -> None:
        work, report = self.jobs.pop(index)
        try:
            result, ok = work(), True
        except BaseException:
            result, ok = Failure(), False
        report(ok, result)


def pool(size: int = 4, per_address: int = 2) -> tuple[FairPool, FakeThreads]:
    threads = FakeThreads()
    return FairPool(InlineReactor(), size, per_address, threads), threads  # type: ignore[arg-type]


class AddressTests(unittest.SynchronousTestCase):
    def test_address_of_a_peer(self) -> None:
        self.assertEqual(address_of("127.0.0.1:5555"), "127.0.0.1")
        self.assertEqual(address_of("[::1]:5555"), "::1")
        self.assertEqual(address_of("local"), "local")
        self.assertEqual(address_of("unknown"), "unknown")


class FairPoolTests(unittest.SynchronousTestCase):
    def test_one_address_holds_only_its_share(self) -> None:
        p, threads = pool(size=4, per_address=2)
        started: list[str] = []
        hashes = [p.submit("10.0.0.1", started.append, f"hash{i}") for i in range(10)]
        self.assertEqual(len(threads.jobs), 2)  # the other 8 wait in 10.0.0.1's queue
        self.assertEqual(p.queued("10.0.0.1"), 8)
        listing = p.submit("10.0.0.2", lambda: ["a", "b"])
        self.assertEqual(len(threads.jobs), 3)  # another address starts at once
        threads.finish(2)
        self.assertEqual(self.successResultOf(listing), ["a", "b"])
        threads.finish(0)
        self.assertEqual(started, ["hash0"])
        self.assertIsNone(self.successResultOf(hashes[0]))
        self.assertEqual(len(threads.jobs), 2)  # hash2 took the free place: FIFO
        threads.finish(1)
        self.assertEqual(started, ["hash0", "hash2"])
        self.assertNoResult(hashes[9])

    def test_free_threads_go_round_robin(self) -> None:
        p, threads = pool(size=1, per_address=1)
        order: list[str] = []
        for i in range(3):
            p.submit("a", order.append, f"a{i}")
            p.submit("b", order.append, f"b{i}")
        p.submit("c", order.append, "c0")
        while threads.jobs:
            threads.finish()
        self.assertEqual(order, ["a0", "b0", "c0", "a1", "b1", "a2", "b2"])

    def test_a_new_address_is_not_behind_anothers_queue(self) -> None:
        p, threads = pool(size=2, per_address=2)
        order: list[str] = []
        for i in range(6):
            p.submit("busy", order.append, f"busy{i}")
        p.submit("new", order.append, "new")
        threads.finish()  # busy0 ends: the free thread goes to "new", not to busy2
        self.assertEqual(len(threads.jobs), 2)
        threads.finish(1)
        self.assertEqual(order, ["busy0", "new"])

    def test_cancelled_while_queued_never_runs(self) -> None:
        p, threads = pool(size=1, per_address=1)
        ran: list[int] = []
        first = p.submit("a", ran.append, 1)
        second = p.submit("a", ran.append, 2)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        threads.finish()
        self.successResultOf(first)
        self.assertEqual((ran, threads.jobs, p.queued()), ([1], [], 0))

    def test_cancelled_while_running_keeps_its_thread_until_it_returns(self) -> None:
        p, threads = pool(size=1, per_address=1)
        running = p.submit("a", lambda: "done")
        waiting = p.submit("b", lambda: "next")
        running.cancel()
        self.failureResultOf(running, CancelledError)
        self.assertEqual((p.busy, len(threads.jobs)), (1, 1))  # the thread is still busy
        threads.finish()
        self.assertEqual((p.busy, len(threads.jobs)), (1, 1))  # now b's job runs
        threads.finish()
        self.assertEqual(self.successResultOf(waiting), "next")
        self.assertEqual((p.busy, p.running), (0, {}))

    def test_a_thread_that_cannot_start_fails_the_job_cleanly(self) -> None:
        p, threads = pool()
        threads.refuse = True
        d = p.submit("a", lambda: "never")
        failure = self.failureResultOf(d, CommandError)
        self.assertEqual(failure.value.message, NO_THREAD)
        self.assertEqual((p.busy, p.running, p.queued()), (0, {}, 0))
        threads.refuse = False
        d = p.submit("a", lambda: "now")
        threads.finish()
        self.assertEqual(self.successResultOf(d), "now")

    def test_failures_reach_the_caller(self) -> None:
        p, threads = pool()

        def fail() -> None:
            raise CommandError("no such file or directory: x")

        d = p.submit("a", fail)
        threads.finish()
        self.assertEqual(self.failureResultOf(d, CommandError).value.message,
                         "no such file or directory: x")

    def test_stop_cancels_what_waits(self) -> None:
        p, threads = pool(size=1, per_address=1)
        p.submit("a", lambda: None)
        waiting = p.submit("a", lambda: None)
        p.stop()
        self.failureResultOf(waiting, CancelledError)


class RealThreadsTests(unittest.TestCase):
    def test_jobs_run_in_daemon_threads_that_end_when_idle(self) -> None:
        threads = Threads(idle_timeout=0.05)
        done = threading.Event()
        results: list[Any] = []
        names: list[str] = []

        def report(ok: bool, result: Any) -> None:
            results.append((ok, result))
            if len(results) == 3:
                done.set()

        def work(n: int) -> Callable[[], int]:
            def job() -> int:
                names.append(threading.current_thread().name)
                return n * n
            return job

        for n in range(3):
            threads.run(work(n), report)
        self.assertTrue(done.wait(10))
        self.assertEqual(sorted(r for _, r in results), [0, 1, 4])
        self.assertEqual(set(names), {"cmdserver-work"})
        for _ in range(400):
            if not threads.live:
                break
            threading.Event().wait(0.01)
        self.assertEqual(threads.live, 0)


def own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


class PriorityTests(unittest.TestCase):
    """Worker and bcrypt threads run nicer than the reactor's thread, so that on a
    busy machine the thread that answers every client gets the CPU first."""

    def test_worker_threads_are_nicer_than_the_caller(self) -> None:
        threads = Threads(idle_timeout=0.05)
        done = threading.Event()
        seen: list[int] = []

        def report(ok: bool, result: Any) -> None:
            seen.append(result)
            done.set()

        threads.run(own_nice, report)
        self.assertTrue(done.wait(10))
        self.assertEqual(seen, [min(19, own_nice() + BACKGROUND_NICE)])

    def test_a_background_thread_started_by_another_is_no_nicer(self) -> None:
        """Nice values are inherited: a worker's own helper thread (an upload's hash
        thread) runs as nice as the worker, not twice as nice."""
        seen: list[int] = []

        def inner() -> None:
            seen.append(own_nice())

        def outer() -> None:
            seen.append(own_nice())
            t = threading.Thread(target=background(inner))
            t.start()
            t.join()

        t = threading.Thread(target=background(outer))
        t.start()
        t.join(10)
        wanted = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + BACKGROUND_NICE)
        self.assertEqual(seen, [wanted, wanted])

    def test_bcrypt_threads_are_nicer_than_the_reactor(self) -> Any:
        pool = HashPool(size=1)
        self.addCleanup(pool.stopService)
        mine = own_nice()
        d = pool.run(own_nice)
        d.addCallback(self.assertEqual, min(19, mine + BACKGROUND_NICE))
        return d


class CoreInThreadTests(unittest.SynchronousTestCase):
    """``in_thread`` with a context runs in the fair pool, under the peer's address."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        import os

        os.makedirs(self.root)
        with open(os.path.join(self.root, "f"), "wb") as f:
            f.write(b"data")
        self.pool, self.threads = pool(size=4, per_address=2)
        self.core = CommandCore(self.reactor_registry(), Policy([self.root]),
                                self.pool.reactor, workers=self.pool)

    def reactor_registry(self) -> Any:
        from cmdserver.commands.base import Registry

        return Registry([ComputeHash()])

    def test_hashes_from_one_address_wait_for_its_share(self) -> None:
        attacker = make_context(self.core, peer="10.0.0.1:4000", out=ListSink())
        hashes = [self.core.call(attacker, "comphash", path="f") for _ in range(10)]
        self.assertEqual((len(self.threads.jobs), self.pool.queued("10.0.0.1")), (2, 8))
        other = make_context(self.core, peer="10.0.0.2:4000")
        mine = self.core.call(other, "comphash", path="f")
        self.assertEqual(len(self.threads.jobs), 3)
        self.threads.finish(2)
        self.assertEqual(len(self.successResultOf(mine)), 64)
        for d in hashes:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual(self.pool.queued(), 0)  # cancelled while queued: gone
        self.threads.finish()
        self.threads.finish()
        self.assertEqual((self.pool.busy, self.threads.jobs), (0, []))

    def test_an_ipv6_64_has_one_share(self) -> None:
        """Hashes from several addresses of one /64 wait for one share of threads."""
        hashes = [self.core.call(make_context(self.core, peer=f"[2001:db8:5:6::{i + 1}]:4000",
                                              out=ListSink()), "comphash", path="f")
                  for i in range(4)]
        self.assertEqual((len(self.threads.jobs), self.pool.queued("2001:db8:5:6::/64")),
                         (2, 2))
        for d in hashes:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.threads.finish()
        self.threads.finish()

    def test_without_a_context_the_reactor_pool_is_used(self) -> None:
        seen: list[Any] = []

        class Reactor(InlineReactor):
            def getThreadPool(self) -> Any:
                seen.append("pool")
                raise RuntimeError("stop here")

        core = CommandCore(self.reactor_registry(), Policy([self.root]), Reactor(),
                           workers=self.pool)
        self.assertRaises(RuntimeError, core.in_thread, lambda: None)
        self.assertEqual(seen, ["pool"])
        d = core.in_thread(lambda: 5, ctx=make_context(core))
        self.threads.finish()
        self.assertEqual(self.successResultOf(d), 5)



