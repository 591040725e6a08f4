"""``login`` and ``whoami``: password login for the text doors, through the shared portal.

Every attempt goes through the core's login gate (:class:`LoginGate`): an
address with failed logins behind it is penalised (its attempts are refused,
``Error: login refused: …``, until the penalty is over), and a failed check
is answered when the penalty it caused is over.  Failed logins all say the
same thing (unknown user or wrong password); the fifth failed or refused
attempt on one connection closes it.  Every login, ok, failed or refused, is
reported to the core (:meth:`CommandCore.login`), which audits and logs it.
Passwords never reach a log: ``login`` records only the user name.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from cmdserver.auth.gate import refused_because
from cmdserver.auth.portal import ANONYMOUS, Account, IAccount, policy_for
from cmdserver.auth.tokens import secret_method
from cmdserver.commands.base import Command, Context
from cmdserver.commands.params import Param
from cmdserver.errors import CommandError

LOGIN_FAILED = "login failed"
LOGIN_REFUSED = "login refused"
PASSWORD = "password"  # the login method, as the audit log names it
TOO_MANY_FAILURES = f"{LOGIN_FAILED}; too many failures, closing"
MAX_FAILURES = 5  # per connection, then it is closed


def log_in(ctx: Context, account: Account) -> None:
    """Make ``ctx``'s connection act as ``account`` from now on (user, roots)."""
    ctx.user = account.name
    ctx.policy = policy_for(account, ctx.core.policy)
    ctx.login_failures = 0


class PasswordLogin:
    """Checks ``login USER PASSWORD`` through the portal, by way of the login gate."""

    def __init__(self, portal: Portal, max_failures: int = MAX_FAILURES) -> None:
        self.portal = portal
        self.max_failures = max_failures

    def login(self, ctx: Context, user: str, password: str) -> Deferred:
        core = ctx.core
        session = core.session_for(ctx)
        credentials = UsernamePassword(user.encode("utf-8"), password.encode("utf-8"))
        d = core.gate.login(session, self.portal, credentials, None, IAccount)

        def succeeded(result: tuple[Any, Account, Any]) -> str:
            _, account, _ = result
            log_in(ctx, account)
            method, token = secret_method(password)
            core.login(session, account.name, method, "ok", token=token)
            return f"Logged in as {account.name}"

        def failed(failure: Failure) -> None:
            failure.trap(UnauthorizedLogin)  # a cancel (the client left) goes on as it is
            ctx.login_failures += 1
            closing = ctx.login_failures >= self.max_failures
            refused = refused_because(failure)
            core.login(session, user, PASSWORD, "failed" if refused is None else "refused",
                       TOO_MANY_FAILURES if closing else refused or LOGIN_FAILED)
            if closing and ctx.session is not None:
                ctx.session.end_session()
                raise CommandError(TOO_MANY_FAILURES)
            raise CommandError(LOGIN_FAILED if refused is None
                               else f"{LOGIN_REFUSED}: {refused}")

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
