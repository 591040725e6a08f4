"""``login`` and ``whoami``: password login for the text doors, through the shared portal.

Failed logins all say the same thing (unknown user or wrong password), are
answered after a delay that doubles with each consecutive failure from one
address (:class:`LoginThrottle`), and the fifth failure on one connection
closes it.  Every login, ok or failed, is reported to the core
(:meth:`CommandCore.login`), which audits and logs it.  Passwords never reach a
log: ``login`` records only the user name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from cmdserver.auth.portal import ANONYMOUS, Account, IAccount, policy_for
from cmdserver.auth.throttle import LoginThrottle, peer_host
from cmdserver.auth.tokens import secret_method
from cmdserver.commands.base import Command, Context
from cmdserver.commands.params import Param
from cmdserver.errors import CommandError

LOGIN_FAILED = "login failed"
PASSWORD = "password"  # the login method, as the audit log names it
TOO_MANY_FAILURES = f"{LOGIN_FAILED}; too many failures, closing"
MAX_FAILURES = 5  # per connection, then it is closed


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
            method, token = secret_method(password)
            ctx.core.login(ctx.core.session_for(ctx), account.name, method, "ok", token=token)
            return f"Logged in as {account.name}"

        def failed(failure: Failure) -> Deferred:
            failure.trap(UnauthorizedLogin)
            ctx.login_failures += 1
            delay = self.throttle.failure(host)
            closing = ctx.login_failures >= self.max_failures
            ctx.core.login(ctx.core.session_for(ctx), user, PASSWORD, "failed",
                           TOO_MANY_FAILURES if closing else LOGIN_FAILED)

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
    params = (Param("user"), Param("password"))
    open_before_login = True
    doors = frozenset({"line"})  # the other doors log in as their protocol does

    def __init__(self, authenticator: PasswordLogin) -> None:
        self.authenticator = authenticator

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
    open_before_login = True

    def run(self, ctx: Context) -> Deferred:
        return defer.succeed(ctx.user)

    def text(self, result: Any) -> list[str]:
        return [f"{result} (not logged in)" if result == ANONYMOUS else str(result)]
