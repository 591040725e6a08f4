"""``login`` and ``whoami``: password login for the text doors, through the shared portal.

Failed logins all say the same thing (unknown user or wrong password), are
answered after a delay that doubles with each consecutive failure from one
address (:class:`LoginThrottle`), and the fifth failure on one connection
closes it.  Passwords never reach a log: ``login`` records only the user name.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cmdserver.auth import ANONYMOUS, Account, IAccount, policy_for
from cmdserver.commands.base import Command, Context
from cmdserver.errors import CommandError

log = Logger()

LOGIN_FAILED = "login failed"
TOO_MANY_FAILURES = f"{LOGIN_FAILED}; too many failures, closing"
MAX_FAILURES = 5  # per connection, then it is closed


def peer_host(peer: str) -> str:
    """The address part of a Context's peer (``1.2.3.4:5``, ``[::1]:5``, ``local``)."""
    if peer.startswith("["):
        return peer[1:].split("]", 1)[0]
    return peer.rsplit(":", 1)[0] if ":" in peer else peer


class LoginThrottle:
    """Per-address login delays: ``base * 2**(n-1)`` seconds after n consecutive failures.

    An address must wait that long before its next attempt is even checked, so
    parallel connections from one address gain nothing.  A success clears the
    address; a quiet ``forget`` seconds does too.  At most ``max_hosts`` are kept.
    """

    def __init__(self, clock: Any, base: float = 1.0, cap: float = 30.0,
                 forget: float = 900.0, max_hosts: int = 10000) -> None:
        self.clock = clock
        self.base = base
        self.cap = cap
        self.forget = forget
        self.max_hosts = max_hosts
        # host -> (consecutive failures, time of the last one, earliest next check)
        self._hosts: OrderedDict[str, tuple[int, float, float]] = OrderedDict()

    def failures(self, host: str) -> int:
        entry = self._entry(host)
        return entry[0] if entry else 0

    def wait(self, host: str) -> float:
        """Seconds before an attempt from ``host`` may be checked."""
        entry = self._entry(host)
        return max(0.0, entry[2] - self.clock.seconds()) if entry else 0.0

    def failure(self, host: str) -> float:
        """Record a failure; returns the delay before it is answered."""
        now = self.clock.seconds()
        entry = self._entry(host)
        count = (entry[0] if entry else 0) + 1
        delay = min(self.cap, self.base * 2 ** (count - 1))
        self._hosts[host] = (count, now, now + delay)
        self._hosts.move_to_end(host)
        while len(self._hosts) > self.max_hosts:
            self._hosts.popitem(last=False)
        return delay

    def success(self, host: str) -> None:
        self._hosts.pop(host, None)

    def _entry(self, host: str) -> tuple[int, float, float] | None:
        entry = self._hosts.get(host)
        if entry is not None and self.clock.seconds() - entry[1] > self.forget:
            del self._hosts[host]
            return None
        return entry


def log_in(ctx: Context, account: Account) -> None:
    """Make ``ctx``'s connection act as ``account`` from now on (user, roots)."""
    ctx.user = account.name
    ctx.policy = policy_for(account, ctx.core.policy)
    ctx.login_failures = 0


class PasswordLogin:
    """Checks ``login USER PASSWORD`` through the portal, with the throttle."""

    def __init__(self, portal: Portal, clock: Any, throttle: LoginThrottle | None = None,
                 max_failures: int = MAX_FAILURES) -> None:
        self.portal = portal
        self.clock = clock
        self.throttle = throttle or LoginThrottle(clock)
        self.max_failures = max_failures

    def login(self, ctx: Context, user: str, password: str) -> Deferred:
        host = peer_host(ctx.peer)
        credentials = UsernamePassword(user.encode("utf-8"), password.encode("utf-8"))
        d = task.deferLater(self.clock, self.throttle.wait(host), self.portal.login,
                            credentials, None, IAccount)

        def succeeded(result: tuple[Any, Account, Any]) -> str:
            _, account, _ = result
            self.throttle.success(host)
            log_in(ctx, account)
            log.info("{peer} logged in as {user} via {door}", peer=ctx.peer,
                     user=account.name, door=ctx.door)
            return f"Logged in as {account.name}"

        def failed(failure: Failure) -> Deferred:
            failure.trap(UnauthorizedLogin)
            ctx.login_failures += 1
            delay = self.throttle.failure(host)
            closing = ctx.login_failures >= self.max_failures
            log.info("{peer}: failed login as {user} via {door} ({count} on this connection)",
                     peer=ctx.peer, user=user, door=ctx.door, count=ctx.login_failures)

            def answer() -> None:
                if closing and ctx.session is not None:
                    ctx.session.end_session()
                    raise CommandError(TOO_MANY_FAILURES)
                raise CommandError(LOGIN_FAILED)

            return task.deferLater(self.clock, delay, answer)

        return d.addCallbacks(succeeded, failed)


class Login(Command):
    name = "login"
    summary = "Log this connection in: login USER PASSWORD."
    usage = "login USER PASSWORD"
    open_before_login = True

    def __init__(self, authenticator: PasswordLogin) -> None:
        self.authenticator = authenticator

    def parse(self, argv: Sequence[str]) -> dict[str, Any]:
        if len(argv) != 2:
            raise self.usage_error()
        return {"user": argv[0], "password": argv[1]}

    def audit_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"user": kwargs.get("user")}

    def audit_argv(self, argv: Sequence[str]) -> dict[str, Any]:
        return {"words": len(argv)}  # never the words: one may be a password

    def run(self, ctx: Context, user: str, password: str) -> Deferred:
        if ctx.user != ANONYMOUS:
            raise CommandError(f"already logged in as {ctx.user}")
        if ctx.login == "off":
            raise CommandError("login is off on this door")
        return self.authenticator.login(ctx, user, password)


class Whoami(Command):
    name = "whoami"
    summary = "Show the user this connection runs as."
    usage = "whoami"
    open_before_login = True

    def run(self, ctx: Context) -> Deferred:
        return defer.succeed(ctx.user)

    def text(self, result: Any) -> list[str]:
        return [f"{result} (not logged in)" if result == ANONYMOUS else str(result)]
