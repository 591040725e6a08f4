"""The login gate: every door's logins pass here, under one set of rules.

One :class:`LoginGate` belongs to the command core (``core.gate``) and so is
shared by every door.  It keeps:

- **Penalties per source address** (:mod:`cmdserver.auth.penalty`): a failed
  login (password, SSH key, TLS client certificate) penalises its source.
  While a source is penalised its new connections are refused before any
  work (:meth:`LoginGate.connection_refusal`, asked by the connection limits
  every door passes through) and its login attempts on connections already
  open are refused without a check.  A failed check is answered when the
  penalty it caused is over, so a client that tries one password after
  another never meets a refusal; only parallel and pipelined attempts do.
- **Checks in flight**: one login per connection at a time, and at most
  ``checks_per_source`` password checks queued or running per source; any
  other attempt is refused at once, without hashing.  Closing a connection
  cancels its login: a check still queued never runs, one running is let
  finish (a thread cannot be stopped) and, if the password was wrong, still
  counts as a failure.
- **The login deadline**: a connection that must log in and has not within
  ``login_grace`` seconds is closed by its door, whatever it sends.

A door logs in with :meth:`LoginGate.login` instead of ``portal.login``; a
refused attempt fails with :class:`LoginRefused` (an ``UnauthorizedLogin``).
The door still reports each attempt to the core (``core.login``); the gate
reports penalties and refused connections (``core.audit_penalty``,
``core.audit_refusal``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.credentials import ISSHPrivateKey, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, task
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from zope.interface import implementer

from cmdserver.auth.penalty import Penalties
from cmdserver.sources import address_of

CHECKS_PER_SOURCE = 2  # password checks queued or running per source address
LOGIN_GRACE = 30.0  # seconds a connection that must log in has to do so
REFUSAL_REPORT_INTERVAL = 1.0  # refused connections of a source: one record a second at most

PENALISED = "too many failed logins from your address; try again in {seconds} s"
BUSY_CONNECTION = "a login is already being checked on this connection"
BUSY_SOURCE = "too many logins at once from your address"


class LoginRefused(UnauthorizedLogin):
    """A login attempt refused without checking it (penalised address, busy)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def refused_because(failure: Failure) -> str | None:
    """Why a login was refused without a check, if the failure is that (else None)."""
    value = failure.value
    return value.reason if isinstance(value, LoginRefused) else None


@dataclass(frozen=True)
class GateSettings:
    """The gate's options (``--login-penalty``, ``--login-penalty-max``,
    ``--penalty-exempt``, ``--login-grace``)."""

    penalty: float = 1.0  # seconds the first failure costs its source; doubles with each
    penalty_max: float = 60.0  # the most a source is penalised at once
    exempt: tuple[str, ...] = ()  # networks (CIDR) and "local" never penalised
    login_grace: float = LOGIN_GRACE
    checks_per_source: int = CHECKS_PER_SOURCE


class Ticket:
    """A password check's progress, told by the checker that runs it.

    The checker calls :meth:`start` when bcrypt begins and :meth:`finish` when it
    ended or will never run; the gate counts the check against its source until
    then, even when the client has gone away meanwhile."""

    def __init__(self) -> None:
        self.started = False
        self.finished = False
        self.matched: bool | None = None  # the check's result, if it ran
        self._then: list[Callable[[bool | None], Any]] = []

    def start(self) -> None:
        self.started = True

    def finish(self, matched: bool | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        self.matched = matched
        then, self._then = self._then, []
        for f in then:
            f(matched)

    def when_finished(self, f: Callable[[bool | None], Any]) -> None:
        if self.finished:
            f(self.matched)
        else:
            self._then.append(f)


@implementer(IUsernamePassword)
class GatedPassword:
    """A user name and password admitted by the gate, with its :class:`Ticket`."""

    def __init__(self, inner: Any, ticket: Ticket) -> None:
        self.inner = inner
        self.username = inner.username
        self.password = inner.password
        self.ticket = ticket

    def checkPassword(self, password: bytes) -> bool:
        return bool(self.inner.checkPassword(password))


class LoginGate:
    """Admits, delays and penalises the logins of every door (see the module)."""

    def __init__(self, core: Any, settings: GateSettings | None = None) -> None:
        self.core = core
        self.clock = core.reactor
        self.settings = settings = settings or GateSettings()
        self.penalties = Penalties(self.clock, settings.penalty, settings.penalty_max,
                                   settings.exempt, report_interval=REFUSAL_REPORT_INTERVAL)
        self._logins: dict[Any, Deferred] = {}  # session -> its login in flight
        self._checks: Counter[str] = Counter()  # source -> password checks not finished
        self._deadlines: dict[Any, Any] = {}  # session -> its login deadline (DelayedCall)

    # -- connections -------------------------------------------------------------

    def connection_refusal(self, door: str, host: str | None, peer: str) -> str | None:
        """Why a new connection from ``host`` (None: a UNIX socket) must be refused,
        or None.  Asked before any work is done for the connection; a refusal is
        counted, and audited at most once a second per source."""
        if not self.penalties.sources:  # nobody is penalised: the common case
            return None
        key = self.penalties.key(host)
        if key is None:
            return None
        wait = self.penalties.remaining(key)
        if wait <= 0:
            return None
        reason = PENALISED.format(seconds=math.ceil(wait))
        self.core.stats.refused_penalised += 1
        count = self.penalties.refused(key)
        if count:
            self.core.audit_refusal(door, peer, reason, {"source": key, "connections": count})
        return reason

    # -- logins ------------------------------------------------------------------

    def source(self, session: Any) -> str | None:
        """The source a session's logins count against (None: exempt)."""
        return self.penalties.key(address_of(session.peer))

    def refusal(self, session: Any) -> str | None:
        """Why a login attempt on ``session`` would be refused now, or None."""
        key = self.source(session)
        if key is not None:
            wait = self.penalties.remaining(key)
            if wait > 0:
                return PENALISED.format(seconds=math.ceil(wait))
        if session in self._logins:
            return BUSY_CONNECTION
        if key is not None and self._checks[key] >= self.settings.checks_per_source:
            return BUSY_SOURCE
        return None

    def login(self, session: Any, portal: Any, credentials: Any, mind: Any,
              *interfaces: Any) -> Deferred:
        """``portal.login`` through the gate, for the connection of ``session``.

        Fails at once with :class:`LoginRefused` when :meth:`refusal` says so;
        a failed check penalises the source and is answered when that penalty
        is over.  Cancelling the result (the connection closed) cancels a check
        that has not started."""
        why = self.refusal(session)
        if why is not None:
            return defer.fail(LoginRefused(why))
        key = self.source(session)
        ticket = None
        if IUsernamePassword.providedBy(credentials):
            ticket = Ticket()
            credentials = GatedPassword(credentials, ticket)
            if key is not None:
                self._checks[key] += 1
                ticket.when_finished(lambda _: self._check_done(key))
        # An SSH key offered without a signature is a question (is this key on
        # file?), not a proof: its refusal is how clients look for their key.
        proof = not (ISSHPrivateKey.providedBy(credentials)
                     and getattr(credentials, "signature", None) is None)
        user = _name(getattr(credentials, "username", b""))
        d = portal.login(credentials, mind, *interfaces)
        self._logins[session] = d
        d.addBoth(self._checked, session, key, ticket, proof, user)
        d.addBoth(self._answered, session, d, ticket)
        return d

    def failure(self, session: Any, user: str) -> float:
        """A failed login the door checked itself (a TLS client certificate):
        penalise its source.  Returns the penalty in seconds."""
        return self._penalise(session, self.source(session), user)

    def succeeded(self, session: Any) -> None:
        """A login the door checked itself succeeded: the deadline is met."""
        self.cancel_deadline(session)

    def _checked(self, result: Any, session: Any, key: str | None, ticket: Ticket | None,
                 proof: bool, user: str) -> Any:
        if not isinstance(result, Failure):
            self.cancel_deadline(session)
            return result
        if result.check(CancelledError):
            if ticket is not None and ticket.started and not ticket.finished:
                # The client left while bcrypt ran: a wrong password still counts.
                ticket.when_finished(
                    lambda matched: matched is False and self._penalise(session, key, user))
            return result
        if proof and result.check(UnauthorizedLogin) and not result.check(LoginRefused):
            wait = self._penalise(session, key, user)
            if wait > 0:
                return task.deferLater(self.clock, wait, lambda: result)
        return result

    def _answered(self, result: Any, session: Any, d: Deferred, ticket: Ticket | None) -> Any:
        if self._logins.get(session) is d:
            del self._logins[session]
        if ticket is not None and not ticket.started:
            ticket.finish()  # no bcrypt checker took it (another checker, or none)
        return result

    def _check_done(self, key: str) -> None:
        self._checks[key] -= 1
        if self._checks[key] <= 0:
            del self._checks[key]

    def _penalise(self, session: Any, key: str | None, user: str) -> float:
        if key is None:
            return 0.0
        wait = self.penalties.failure(key)
        if wait > 0:
            self.core.audit_penalty(session, user, key, wait, self.penalties.strikes(key))
        return wait

    # -- the login deadline ------------------------------------------------------

    def login_deadline(self, session: Any, expired: Callable[[], Any]) -> None:
        """Call ``expired`` (the door closes the connection) if ``session`` has not
        logged in within the grace time.  A login through the gate, or
        :meth:`succeeded`, or the end of the session cancels it."""
        self.cancel_deadline(session)

        def expire() -> None:
            self._deadlines.pop(session, None)
            expired()

        self._deadlines[session] = self.clock.callLater(self.settings.login_grace, expire)

    def cancel_deadline(self, session: Any) -> None:
        call = self._deadlines.pop(session, None)
        if call is not None and call.active():
            call.cancel()

    def session_closed(self, session: Any) -> None:
        """The connection of ``session`` ended: cancel its deadline and its login."""
        self.cancel_deadline(session)
        d = self._logins.pop(session, None)
        if d is not None:
            d.cancel()


def _name(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
