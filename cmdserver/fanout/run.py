"""Run one command on many cmdserver daemons at once, over their PB doors.

:func:`run_on` logs in to each host with :mod:`cmdserver.client`, runs the
command from words as the line door would (``Session.run``), and gives each
host's :class:`HostResult`: ``ok``, ``failed`` (the command or the login
failed) or ``unreachable`` (no connection within the time).  At most ``forks``
hosts are worked on at once, and each host has ``timeout`` seconds for
everything (connect, login, command); a host past it is cancelled and its
connection closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.python.failure import Failure

from cmdserver import client
from cmdserver.fanout.inventory import Host

OK, FAILED, UNREACHABLE = "ok", "failed", "unreachable"


@dataclass
class HostResult:
    """What one host answered."""

    host: str  # its name in the inventory
    address: str
    port: int
    status: str  # ok, failed or unreachable
    value: Any = None  # the command's value (what PB and --json give)
    text: list[str] = field(default_factory=list)  # what a text door prints after the lines
    output: list[str] = field(default_factory=list)  # the lines streamed as it ran
    error: str | None = None
    elapsed: float = 0.0

    @property
    def summary(self) -> str:
        """One line for a table: the error, else the first line the command printed
        and how many more there are."""
        if self.error is not None:
            return self.error
        lines = [*self.output, *self.text]
        if len(lines) > 1:
            return f"{lines[0]} (+{len(lines) - 1} lines)"
        return lines[0] if lines else ""

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def exit_status(results: Sequence[HostResult]) -> int:
    """0 when every host succeeded, 2 when one was unreachable, else 1 when a
    command failed somewhere."""
    statuses = {r.status for r in results}
    if UNREACHABLE in statuses:
        return 2
    return 1 if FAILED in statuses else 0


def run_on(hosts: Sequence[Host], command: str, words: Sequence[str], user: str,
           password: str, forks: int = 10, timeout: float = 30.0, reactor: Any = None,
           on_result: Callable[[HostResult], Any] | None = None) -> Deferred:
    """Run ``command`` with ``words`` on every host; fires with the results in the
    hosts' order.  ``on_result`` is called with each result as it comes."""
    if reactor is None:
        from twisted.internet import reactor
    if forks < 1:
        raise ValueError("forks must be at least 1")
    semaphore = defer.DeferredSemaphore(forks)

    def one(host: Host) -> Deferred:
        d = semaphore.run(_run_one, host, command, list(words), host.user or user, password,
                          timeout, reactor)
        if on_result is not None:
            d.addCallback(lambda result: (on_result(result), result)[1])
        return d

    return defer.gatherResults([one(h) for h in hosts], consumeErrors=True)


def _run_one(host: Host, command: str, words: list[str], user: str, password: str,
             timeout: float, reactor: Any) -> Deferred:
    started = time.monotonic()
    result = HostResult(host.name, host.address, host.port, OK)
    state: dict[str, Any] = {"session": None}

    @defer.inlineCallbacks
    def work() -> Any:
        endpoint = HostnameEndpoint(reactor, host.address, host.port, timeout)
        session = yield client.connect_endpoint(endpoint, user, password, reactor,
                                                timeout=timeout)
        state["session"] = session
        answer = yield session.run(command, words, on_line=result.output.append)
        result.value, result.text = answer["value"], list(answer["text"])

    def settle(outcome: Any) -> HostResult:
        if isinstance(outcome, Failure):
            result.status, result.error = _classify(outcome, state["session"] is not None,
                                                    timeout)
        result.elapsed = round(time.monotonic() - started, 3)
        session = state["session"]
        if session is not None:
            session.close()
        return result

    return work().addTimeout(timeout, reactor).addBoth(settle)


def _classify(failure: Failure, connected: bool, timeout: float) -> tuple[str, str]:
    """``(status, one-line error)`` for a host that did not answer well."""
    if failure.check(client.LoginError):
        return FAILED, f"Error: {failure.value}"
    if failure.check(client.RemoteError):
        status = FAILED if connected else UNREACHABLE
        return status, f"Error: {failure.value}"
    if failure.check(defer.TimeoutError, CancelledError):
        if connected:
            return FAILED, f"Error: no answer within {timeout:g} s"
        return UNREACHABLE, f"no connection within {timeout:g} s"
    if failure.check(error.ConnectError, error.DNSLookupError, error.ConnectionLost,
                     error.ConnectionDone, OSError):
        reason = failure.getErrorMessage().strip().rstrip(".")
        return (FAILED if connected else UNREACHABLE), reason
    return FAILED, f"Error: {failure.getErrorMessage()}"
