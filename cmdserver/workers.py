"""Worker threads for file and CPU work, shared fairly between client addresses.

Commands hash, list and open files in threads (``CommandCore.in_thread``).
Those threads are a pool of their own, apart from the reactor's default pool
(which logins use), and no address may hold more than its share of them:

- at most ``size`` jobs run at once, over every address;
- at most ``per_address`` of them come from one client address;
- an address's further jobs wait in its own queue, first in first out;
- a free thread goes to the waiting address served least recently (round
  robin), so an address that sends its first job gets the next free thread,
  however many jobs another address has queued.

Ten ``comphash`` calls from one address then hold ``per_address`` threads; an
``ls`` or an SFTP read from elsewhere starts at once.  A job still queued when
its Deferred is cancelled never runs; a running one keeps its thread until it
returns (cancellable work checks its flag between chunks), so the counts say
how many threads are really busy.

The threads are started when needed and end after ``IDLE_TIMEOUT`` seconds
without work; they are daemon threads, so a stopping daemon does not wait for
a hash it has already cancelled.  They run at a lower CPU priority than the
reactor's thread (:func:`background`): on a busy machine the reactor, which
answers every client, gets the CPU first.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cmdserver.errors import CommandError

log = Logger()

DEFAULT_THREADS = 8
DEFAULT_PER_ADDRESS = 4
IDLE_TIMEOUT = 10.0  # seconds an idle thread waits for work before it ends
NO_THREAD = "the server cannot start a worker thread now; try again later"

# A job for a thread: the work, and what to do with its outcome (called in the thread).
Work = Callable[[], Any]
Report = Callable[[bool, Any], None]


class Threads:
    """Daemon threads that run one job each at a time, started on demand.

    The caller (:class:`FairPool`) never gives more jobs at once than it wants
    threads; a thread idle for ``idle_timeout`` seconds ends.  ``start_thread``
    starts one (a test double may run the job inline or refuse, as a system out
    of threads does).
    """

    def __init__(self, idle_timeout: float = IDLE_TIMEOUT, name: str = "cmdserver-work",
                 start_thread: Callable[[Callable[[], None], str], None] | None = None) -> None:
        self.idle_timeout = idle_timeout
        self.name = name
        self._start_thread = start_thread or _start_daemon_thread
        self._jobs: queue.SimpleQueue[tuple[Work, Report]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job that no job was promised to
        self.live = 0  # threads started and not ended

    def run(self, work: Work, report: Report) -> None:
        """Run ``work()`` in a thread, then ``report(ok, result)`` there.

        Raises ``RuntimeError`` (nothing started) if no idle thread is there and
        a new one cannot be started.
        """
        with self._lock:
            if self._idle:
                self._idle -= 1  # promised: one of the waiting threads takes it
                self._jobs.put((work, report))
                return
            self.live += 1
        try:
            self._start_thread(lambda: self._work(work, report), self.name)
        except BaseException:
            with self._lock:
                self.live -= 1
            raise

    def _work(self, work: Work, report: Report) -> None:
        while True:
            try:
                result, ok = work(), True
            except BaseException:
                result, ok = Failure(), False
            report(ok, result)
            del work, report, result  # nothing of the last job stays alive meanwhile
            with self._lock:
                self._idle += 1
            while True:
                try:
                    work, report = self._jobs.get(timeout=self.idle_timeout)
                    break
                except queue.Empty:
                    with self._lock:
                        # Every idle thread was promised a job: one is queued for us.
                        if self._idle:
                            self._idle -= 1
                            self.live -= 1
                            return


BACKGROUND_NICE = 10  # how much nicer than the reactor's thread a worker thread is


def lower_priority(by: int = BACKGROUND_NICE) -> None:
    """Make the calling thread ``by`` nicer than the process's main thread (the
    reactor's), however nice it already was: a thread inherits its creator's
    value, so a worker's own helper thread must not add ``by`` twice.  Linux
    keeps a nice value per thread, and anyone may raise their own; elsewhere,
    nothing."""
    try:
        tid = threading.get_native_id()
        target = min(19, os.getpriority(os.PRIO_PROCESS, os.getpid()) + by)
        if os.getpriority(os.PRIO_PROCESS, tid) < target:
            os.setpriority(os.PRIO_PROCESS, tid, target)
    except (AttributeError, OSError):
        pass


def background(target: Callable[[], None]) -> Callable[[], None]:
    """``target`` for a thread of its own, run at a lower priority than the reactor's."""
    def run() -> None:
        lower_priority()
        target()
    return run


def _start_daemon_thread(target: Callable[[], None], name: str) -> None:
    threading.Thread(target=background(target), name=name, daemon=True).start()


class _Job:
    __slots__ = ("address", "args", "d", "f", "kwargs", "started")

    d: Deferred

    def __init__(self, address: str, f: Callable[..., Any], args: tuple, kwargs: dict) -> None:
        self.address = address
        self.f = f
        self.args = args
        self.kwargs = kwargs
        self.started = False

    def run(self) -> Any:
        return self.f(*self.args, **self.kwargs)


class FairPool:
    """Jobs from many addresses on ``size`` threads, at most ``per_address`` each.

    Everything but the work itself runs on the reactor thread.
    """

    def __init__(self, reactor: Any, size: int = DEFAULT_THREADS,
                 per_address: int = DEFAULT_PER_ADDRESS, threads: Threads | None = None) -> None:
        self.reactor = reactor
        self.size = size
        self.per_address = min(per_address, size)
        self.threads = threads or Threads()
        self.busy = 0  # jobs running
        self.running: dict[str, int] = {}  # jobs running per address
        self.waiting: dict[str, deque[_Job]] = {}  # jobs waiting per address, in order
        # When each address with jobs running or waiting last had one started.
        self._served: dict[str, int] = {}
        self._starts = 0
        self.stopped = False
        trigger = getattr(reactor, "addSystemEventTrigger", None)
        if trigger is not None:
            trigger("during", "shutdown", self.stop)

    def submit(self, address: str, f: Callable[..., Any], *args: Any,
               **kwargs: Any) -> Deferred:
        """Run ``f(*args, **kwargs)`` in a thread when ``address`` has its turn;
        fires with its result.  Cancelling it while it waits means it never runs."""
        job = _Job(address, f, args, kwargs)
        job.d = Deferred(lambda _: self._cancelled(job))
        if self.busy < self.size and self.running.get(address, 0) < self.per_address \
                and address not in self.waiting:
            self._start(job)
        else:
            self.waiting.setdefault(address, deque()).append(job)
        return job.d

    def queued(self, address: str | None = None) -> int:
        """Jobs waiting for a thread (from ``address``, or from everyone)."""
        if address is not None:
            return len(self.waiting.get(address, ()))
        return sum(map(len, self.waiting.values()))

    def stop(self) -> None:
        """The reactor is stopping: start nothing more, and report nothing back."""
        self.stopped = True
        waiting, self.waiting = self.waiting, {}
        for jobs in waiting.values():
            for job in jobs:
                if not job.d.called:
                    job.d.cancel()

    def _cancelled(self, job: _Job) -> None:
        if job.started:
            return  # it runs on; its thread is busy until it returns
        jobs = self.waiting.get(job.address)
        if jobs is not None:
            try:
                jobs.remove(job)
            except ValueError:
                pass
            if not jobs:
                del self.waiting[job.address]
                if job.address not in self.running:
                    self._served.pop(job.address, None)

    def _start(self, job: _Job) -> None:
        job.started = True
        self._starts += 1
        self._served[job.address] = self._starts
        self.busy += 1
        self.running[job.address] = self.running.get(job.address, 0) + 1
        call = self.reactor.callFromThread

        def report(ok: bool, result: Any) -> None:  # in the worker thread
            if not self.stopped:
                call(self._finished, job, ok, result)

        try:
            self.threads.run(job.run, report)
        except RuntimeError as e:  # "can't start new thread": the system is out of them
            log.error("worker thread not started: {error}", error=str(e))
            self._finished(job, False, Failure(CommandError(NO_THREAD)))

    def _finished(self, job: _Job, ok: bool, result: Any) -> None:
        self.busy -= 1
        count = self.running[job.address] - 1
        if count:
            self.running[job.address] = count
        else:
            del self.running[job.address]
            if job.address not in self.waiting:
                del self._served[job.address]
        self._dispatch()
        if not job.d.called:  # else cancelled: nobody waits for the result
            if ok:
                job.d.callback(result)
            else:
                job.d.errback(result)
        elif not ok and not result.check(CommandError, CancelledError):
            # Nobody will see it: an unexpected error still belongs in the log.
            log.failure("cancelled work failed", result)

    def _dispatch(self) -> None:
        """Give free threads to waiting addresses: the one served least recently first."""
        if self.stopped:
            return
        served = self._served
        while self.busy < self.size and self.waiting:
            ready = [a for a in self.waiting if self.running.get(a, 0) < self.per_address]
            if not ready:
                return  # every waiting address holds its share already
            address = min(ready, key=lambda a: served.get(a, 0))
            jobs = self.waiting[address]
            job = jobs.popleft()
            if not jobs:
                del self.waiting[address]
            self._start(job)
