"""Logging in on the HTTP door: ``Authorization: Bearer TOKEN`` or HTTP Basic.

Every request that runs a command, reads a file or describes the API carries
its credentials; :func:`authenticate` is the one place they are checked
(a shared per-address login throttle will be added here).  A connection
remembers the credentials that last succeeded on it: a keep-alive client pays
one check (a bcrypt for a password, a SHA-256 for a token) and makes one
``login`` audit record per connection and user, not one per request.  A
request with other credentials logs in again.  Failed logins are all audited;
the fifth on one connection is answered 429 and the connection closed.

No cookie is ever set or read: a web page cannot ride on a login.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.cred import error as cred_error
from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from cmdserver.auth.gate import refused_because
from cmdserver.auth.portal import ANONYMOUS, Account, IAccount, policy_for
from cmdserver.auth.tokens import TokenCredentials, secret_method
from cmdserver.commands.account import LOGIN_FAILED, LOGIN_REFUSED, PASSWORD, TOO_MANY_FAILURES
from cmdserver.commands.base import Context
from cmdserver.core import INTERNAL_ERROR, LOGIN_REQUIRED
from cmdserver.doors.http import DOOR
from cmdserver.doors.http.errors import INTERNAL, TOO_MANY, UNAUTHORIZED, HTTPError
from cmdserver.policy import Policy
from cmdserver.text import escape

if TYPE_CHECKING:
    from cmdserver.doors.http.door import HTTPChannel

log = Logger()

MAX_FAILURES = 5  # failed logins on one connection; the fifth closes it
MAX_CREDENTIAL = 1024  # bytes of a user name, password or token
CHALLENGES = ((b"WWW-Authenticate", b'Bearer realm="cmdserver"'),
              (b"WWW-Authenticate", b'Basic realm="cmdserver", charset="UTF-8"'))
TOKEN = "token"


@dataclass(frozen=True)
class Login:
    """Who a request runs as: the account, the jail of its commands, and the context
    its commands run in (output dropped; a door that keeps it replaces ``out``)."""

    account: Account
    policy: Policy
    ctx: Context

    @property
    def user(self) -> str:
        return self.account.name


def unauthorized(message: str) -> HTTPError:
    return HTTPError(UNAUTHORIZED, message, CHALLENGES)


def parse_authorization(header: bytes) -> tuple[Any, str, str, str | None]:
    """``(credentials, user as given, method, token id)`` of an ``Authorization``
    header; a 401 :class:`HTTPError` for one that is neither Bearer nor Basic."""
    scheme, _, value = header.strip().partition(b" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == b"bearer" and value and len(value) <= MAX_CREDENTIAL:
        token = value.decode("ascii", "replace")
        return TokenCredentials(token), ANONYMOUS, TOKEN, secret_method(token)[1]
    if scheme == b"basic" and value and len(value) <= 4 * MAX_CREDENTIAL:
        try:
            user, colon, password = base64.b64decode(value, validate=True).partition(b":")
            name = user.decode("utf-8")
        except (binascii.Error, ValueError):
            raise unauthorized("bad Authorization header (Basic: base64 of "
                               "USER:PASSWORD)") from None
        if colon and user and password:
            method, token_id = secret_method(password)
            return UsernamePassword(user, password), name, method, token_id
    raise unauthorized("bad Authorization header (Bearer TOKEN or Basic credentials)")


def authenticate(channel: HTTPChannel, request: Any) -> Login | Deferred:
    """The login of ``request`` on ``channel``: a :class:`Login`, at once when the
    connection has already checked these credentials, else a Deferred of it.

    Fails with a 401 :class:`HTTPError` (no credentials, wrong ones) or a 429
    (too many failures on the connection, which then closes).
    """
    header = request.requestHeaders.getRawHeaders(b"authorization")
    if not header:
        raise unauthorized(LOGIN_REQUIRED)
    known = channel.logins.get(header[0])
    if known is not None:
        return known
    if channel.login_failures >= MAX_FAILURES:
        raise HTTPError(TOO_MANY, TOO_MANY_FAILURES, close=True)
    credentials, user, method, token_id = parse_authorization(header[0])
    door = channel.door
    # Through the login gate every door shares: penalties per source address, one
    # check in flight per connection, bcrypt in its own pool.
    d = door.core.gate.login(channel.session, door.portal, credentials, None, IAccount)

    def succeeded(result: tuple[Any, Account, Any]) -> Login:
        _, account, _ = result
        policy = policy_for(account, door.core.policy)
        ctx = Context(door.core, user=account.name, peer=channel.peer, door=DOOR,
                      session=channel, policy=policy, login="required",
                      session_id=channel.session.id)
        login = Login(account, policy, ctx)
        channel.remember(header[0], login)
        door.core.login(channel.session, account.name, method, "ok", token=token_id)
        return login

    def failed(failure: Failure) -> Failure:
        reason = None
        if failure.check(cred_error.UnhandledCredentials):
            log.error("http: no checker takes {method} credentials; login refused",
                      method=method)
            reason = f"no checker for {method} credentials"
        elif not failure.check(cred_error.LoginFailed):
            log.failure("http: login of {user} failed", failure, user=escape(user))
            door.core.login(channel.session, user, method, "failed", INTERNAL_ERROR,
                            token=token_id)
            return Failure(HTTPError(INTERNAL, INTERNAL_ERROR))
        channel.login_failures += 1
        closing = channel.login_failures >= MAX_FAILURES
        refused = refused_because(failure)
        if refused is not None and not closing:  # the gate refused it unchecked
            door.core.login(channel.session, user, method, "refused", refused,
                            token=token_id)
            return Failure(HTTPError(TOO_MANY, f"{LOGIN_REFUSED}: {refused}"))
        door.core.login(channel.session, user, method, "failed",
                        reason or (TOO_MANY_FAILURES if closing else LOGIN_FAILED),
                        token=token_id)
        if closing:
            return Failure(HTTPError(TOO_MANY, TOO_MANY_FAILURES, close=True))
        return Failure(unauthorized(LOGIN_FAILED))

    return d.addCallbacks(succeeded, failed)


__all__ = ["PASSWORD", "Login", "authenticate", "parse_authorization"]
