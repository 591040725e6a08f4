"""The Perspective Broker door: Python programs call commands and get Python values.

A client logs in through the shared portal with a user name and password
(``authenticate(user, password)`` on the root object; passwords are checked
against bcrypt hashes, so PB's MD5 challenge login cannot work and is refused
with a clear error).  The avatar it gets has one method per command; every call
goes through :meth:`CommandCore.call`, so audit, stats and the file jail are
the same as on the text doors.  Errors come back as the ``pb.Error`` subclasses
of :mod:`cmdserver.doors.pb.errors`, never as a server traceback.

Each connection is one session in the core (opened by :class:`DoorBroker` when
the connection is made, closed when it is lost); every ``authenticate`` goes
through the core's login gate (penalties per address, one check at a time per
connection: a call made while one is being checked is refused at once) and is
reported to the core (:meth:`CommandCore.login`), which audits it.  A
connection that has not logged in within the gate's grace time is closed,
whatever it sends (not with ``--pb-anonymous``, whose root serves without a
login).

Remote method names are looked up in explicit tables, never with
``getattr(self, "remote_" + name)``.  With ``--pb-anonymous`` the root object
also answers the classic Twisted "remote ls" example (``ls`` and ``ls_boom``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from twisted.cred import error as cred_error
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.spread import jelly, pb
from zope.interface import implementer

from cmdserver.auth.gate import refused_because
from cmdserver.auth.portal import ANONYMOUS, Account, Realm
from cmdserver.auth.tokens import secret_method
from cmdserver.commands.account import (
    LOGIN_FAILED,
    LOGIN_REFUSED,
    PASSWORD,
    TOO_MANY_FAILURES,
)
from cmdserver.commands.base import Command, Context, NullSink
from cmdserver.core import (
    INTERNAL_ERROR,
    LOGIN_REQUIRED,
    NOT_FOUND_TEXT,
    CommandCore,
    is_deferred,
)
from cmdserver.doors.limits import format_peer
from cmdserver.doors.pb.calls import (
    RemoteSink,
    RunningCalls,
    check,
    check_observer,
    dispatch,
)
from cmdserver.doors.pb.errors import (
    BadArguments,
    CommandFailed,
    LoginFailed,
    LoginRequired,
    UnknownMethod,
    to_remote,
)
from cmdserver.doors.pb.upload import PBUpload, UploadStarter, consumer_starter
from cmdserver.doors.pb.wire import MESSAGE_LIMIT, BoundedBanana
from cmdserver.errors import CommandError, MissingArgument, NotFound, UsageError
from cmdserver.policy import Policy
from cmdserver.sessions import Session
from cmdserver.text import escape

log = Logger()

DOOR = "pb"
DEFAULT_ENDPOINT = "tcp:9876:interface=127.0.0.1"
MAX_LOGIN_FAILURES = 5  # per connection; then it is closed


@dataclass(frozen=True)
class PBMind:
    """What the realm's PB avatar factory is given as ``mind``: the connection."""

    broker: pb.Broker
    peer: str
    client: Any = None  # the mind the client passed, unused for now
    session_id: str = ""  # the connection's session in the core


class PBAvatar(pb.Avatar):
    """One logged-in user on one connection: every command of the registry, Python values back.

    A remote call ``NAME(*args, **kwargs)`` runs the command ``NAME`` with its
    declared parameters: positional arguments in the order declared, named ones
    by name, checked by :meth:`Command.bind` as the text doors check words.
    ``call(NAME, **kwargs)`` does the same for any name; ``run(NAME, words)``
    takes the words as typed on a text door and answers ``{"value", "text"}``
    (what ``cmdserver call`` prints).  An ``observer`` argument (a referenceable
    with ``remote_line``) gets the streamed output lines.
    """

    def __init__(self, core: CommandCore, account: Account, mind: PBMind,
                 upload: UploadStarter | None = None) -> None:
        self.core = core
        self.account = account
        self.peer = mind.peer
        self.session_id = mind.session_id
        self.upload_starter = upload
        self.policy = Policy(account.roots) if account.roots else core.policy
        self.calls = RunningCalls()
        watch_calls(mind.broker, self.calls)
        self._ctx = self._context(NullSink())

    def perspectiveMessageReceived(self, broker: pb.Broker, message: str | bytes,
                                   args: Any, kw: Any) -> Any:
        name = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        args = broker.unserialize(args, self)
        kw = broker.unserialize(kw, self)
        if not isinstance(kw, dict) or not all(isinstance(k, str) for k in kw):
            raise BadArguments("keyword arguments must have string names")
        if name == "call":
            if not args or not isinstance(args[0], str):
                raise BadArguments("usage: call(NAME, **ARGUMENTS)")
            name, args = args[0], args[1:]
        elif name == "run":
            result = self._run_words(*args, **kw)
        if name == "upload":
            result = self._upload(*args, **kw)
        elif name != "run":
            result = self._call(name, args, kw)
        if is_deferred(result) and result.called:
            # Already answered: hand PB the plain value, sparing it the callbacks it
            # would chain onto a fired Deferred.
            value = result.result
            if not isinstance(value, Failure) and not is_deferred(value):
                result = value
        return broker.serialize(result, self, message, args, kw)

    def logout(self) -> None:
        """The client logged out or went away: cancel what it still runs."""
        self.calls.cancel_all()

    def _context(self, out: Any) -> Context:
        return Context(self.core, user=self.account.name, peer=self.peer, door=DOOR,
                       out=out, policy=self.policy, session_id=self.session_id)

    def _command(self, name: Any) -> Command:
        try:
            return self.core.lookup(self._ctx, name if isinstance(name, str) else repr(name))
        except CommandError:
            raise UnknownMethod(NOT_FOUND_TEXT) from None

    def _call(self, name: str, args: Any, kw: dict[str, Any]) -> Any:
        """Run a command for the client: its value when it finished at once, which
        PB sends straight back, else a Deferred of it.  A failure reaches the
        client as one of the door's ``pb.Error``s."""
        command = self._command(name)
        if not (args or kw or command.params):  # ping, stats, whoami: nothing to check
            return self._track(name, self.core.invoke(self._ctx, command, {}))
        observer = check_observer(kw.pop("observer", None))
        params = [p.name for p in command.params]
        if len(args) > len(params):
            raise BadArguments(pb_usage(command))
        named = dict(zip(params, args, strict=False))
        for key in kw:
            if key in named:
                raise BadArguments(f"{key} given twice; {pb_usage(command)}")
        named.update(kw)
        kwargs = self._bind(command, named)
        ctx = self._ctx if observer is None else self._context(RemoteSink(observer))
        return self._track(name, self.core.invoke(ctx, command, kwargs))

    def _bind(self, command: Command, named: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.core.bind(self._ctx, command, named)
        except MissingArgument as e:
            raise BadArguments(e.message) from None
        except UsageError as e:  # worded for the text doors: end with the call's usage
            detail = "" if e.message.startswith("usage: ") else e.message.split("; usage: ")[0]
            raise BadArguments(f"{detail}; {pb_usage(command)}" if detail
                               else pb_usage(command)) from None
        except CommandError as e:
            raise CommandFailed(e.message) from None

    def _track(self, name: str, result: Any) -> Any:
        if is_deferred(result):
            return self.calls.track(result).addErrback(to_remote, name, True)
        if isinstance(result, Failure):
            to_remote(result, name, True).raiseException()
        return result

    def _run_words(self, name: Any = None, words: Any = None, observer: Any = None) -> Any:
        """``run(NAME, WORDS)``: the command line a text door would get, parsed the
        same way; answers the value and the text a text door prints after the
        streamed lines."""
        if not isinstance(name, str) or not isinstance(words, list) or not all(
                isinstance(w, str) for w in words):
            raise BadArguments("usage: run(NAME, [WORD, ...], observer=None)")
        observer = check_observer(observer)
        try:
            command, kwargs = self.core.parse_words(self._ctx, name, words)
        except NotFound:
            raise UnknownMethod(NOT_FOUND_TEXT) from None
        except CommandError as e:
            raise CommandFailed(e.message) from None
        ctx = self._ctx if observer is None else self._context(RemoteSink(observer))
        result = self.core.invoke(ctx, command, kwargs)
        if is_deferred(result):
            result.addCallback(lambda value: {"value": value, "text": command.text(value)})
        elif not isinstance(result, Failure):
            result = {"value": result, "text": command.text(result)}
        return self._track(name, result)

    def _upload(self, name: Any = None, size: Any = None, hmac: Any = None, mac: Any = None,
                sha256: Any = None) -> Deferred:
        """``upload(NAME, SIZE, HMAC, mac=ALG, sha256=False)``: a writer (``write(bytes)``,
        ``close()``, ``abort()``) for the file's bytes; with HMAC ``"-"`` the MAC
        follows them, in ``close(MAC)``."""
        if self.upload_starter is None:  # the text doors have no upload command then
            raise UnknownMethod(NOT_FOUND_TEXT)
        ready: Deferred = Deferred()
        command = PBUpload(self.upload_starter, ready)
        given = {"name": name, "size": size, "hmac": hmac, "mac": mac, "sha256": sha256}
        kwargs = self._bind(command, {k: v for k, v in given.items() if v is not None})
        d = self.calls.track(self.core.run_command(self._ctx, command, **kwargs))

        def ended(result: Any) -> None:
            # The writer's close() reports the outcome once the upload started;
            # before that (a refusal), the upload() call itself fails.
            if not ready.called:
                ready.errback(result if isinstance(result, Failure) else
                              Failure(CommandError("upload ended before it started")))

        d.addBoth(ended)
        return ready.addErrback(to_remote, "upload", True)


def pb_usage(command: Command) -> str:
    """A command's usage as a PB call: ``usage: lastlog(n=10)``."""
    words = [p.name if p.required else f"{p.name}={p.default!r}" for p in command.params]
    return f"usage: {command.name}({', '.join(words)})"


PB_ENTRIES = frozenset({"call", "run"})  # remote methods besides the commands' names


class LoginRoot(pb.Referenceable):
    """The root object of a connection: ``authenticate(user, password)`` logs in."""

    methods: dict[str, Callable[..., Any]] = {}
    signatures: dict[str, inspect.Signature] = {}

    def __init__(self, door: PBDoor, broker: pb.Broker) -> None:
        self.door = door
        self.broker = broker
        self._peer: str | None = None
        self.failures = 0
        self.calls = RunningCalls()
        watch_calls(broker, self.calls)
        broker.notifyOnDisconnect(self.calls.cancel_all)

    @property
    def peer(self) -> str:
        """The client's address (the root is built before the broker has a transport)."""
        if self._peer is None:
            transport = self.broker.transport
            assert transport is not None  # connected by the time a remote call arrives
            self._peer = format_peer(transport.getPeer())
        return self._peer

    @property
    def session(self) -> Session:
        """The connection's session (:class:`DoorBroker` opens it when connected)."""
        return cast(DoorBroker, self.broker).audit_session

    def remoteMessageReceived(self, broker: pb.Broker, message: str | bytes, args: Any,
                              kw: Any) -> Any:
        name = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        if name not in self.methods and (name in PB_ENTRIES or name in self.door.core.registry):
            raise LoginRequired(LOGIN_REQUIRED)  # a command before authenticate
        return dispatch(self.methods, self.signatures, self, broker, message, args, kw)

    def remote_login(self, username: Any = None) -> None:
        raise LoginFailed("PB challenge login is not supported (passwords are stored as "
                          "bcrypt hashes): call authenticate(user, password), as "
                          "cmdserver.client does")

    def remote_authenticate(self, username: str, password: str, mind: Any = None) -> Deferred:
        if self.failures >= MAX_LOGIN_FAILURES:
            raise LoginFailed(TOO_MANY_FAILURES)
        user = _credential(username, "user name")
        secret = _credential(password, "password")
        d = self.door.core.gate.login(self.session, self.door.portal,
                                      UsernamePassword(user, secret),
                                      PBMind(self.broker, self.peer, mind, self.session.id),
                                      pb.IPerspective)
        method, token = secret_method(secret)
        return d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(method, token),
                              errbackArgs=(user.decode("utf-8", "replace"),))

    def _logged_in(self, result: tuple[Any, Any, Callable[[], None]], method: str = PASSWORD,
                   token: str | None = None) -> pb.Referenceable:
        _, avatar, logout = result
        remote = pb.AsReferenceable(avatar, "perspective")
        once = [logout]

        def maybe_logout() -> None:
            if once:
                once.pop()()

        self.broker.notifyOnDisconnect(maybe_logout)
        if isinstance(self.broker, DoorBroker):
            self.broker.logged_in()
        self.door.core.login(self.session, getattr(avatar.account, "name", "?"), method, "ok",
                             token=token)
        return remote

    def _login_failed(self, failure: Failure, user: str) -> Failure:
        if failure.check(CancelledError):  # the connection closed: nobody reads this
            return Failure(LoginFailed(LOGIN_FAILED))
        self.failures += 1
        reason = None
        refused = refused_because(failure)
        if refused is not None:
            reason = refused
        elif failure.check(cred_error.UnhandledCredentials):
            log.error("pb: no password checker is configured; login refused")
            reason = "no password checker is configured"
        elif not failure.check(cred_error.LoginFailed):
            log.failure("pb: login of {user} failed", failure, user=escape(user))
            reason = INTERNAL_ERROR
        closing = self.failures >= MAX_LOGIN_FAILURES
        if closing:
            reason = TOO_MANY_FAILURES
        self.door.core.login(self.session, user, PASSWORD,
                             "failed" if refused is None else "refused", reason or LOGIN_FAILED)
        if closing:
            # Closed once this answer is written, so the client reads why.
            self.door.core.reactor.callLater(0, self._hang_up)
            return Failure(LoginFailed(TOO_MANY_FAILURES))
        if refused is not None:
            return Failure(LoginFailed(f"{LOGIN_REFUSED}: {refused}"))
        return Failure(LoginFailed(LOGIN_FAILED))

    def _hang_up(self) -> None:
        if self.broker.transport is not None and not self.broker.disconnected:
            self.broker.transport.loseConnection()


def _credential(value: Any, what: str) -> bytes:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not isinstance(value, bytes) or not value or len(value) > 1024:
        raise BadArguments(f"{what} must be a non-empty string")
    return value


class AnonymousRoot(LoginRoot):
    """The root with ``--pb-anonymous``: login plus the classic "remote ls" methods.

    ``ls(directory)`` returns the sorted names, or ``[]`` when the directory
    cannot be listed (missing, not a directory, outside the jail roots);
    ``ls_boom(directory)`` raises the error instead.
    """

    def remote_ls(self, directory: str) -> Deferred:
        def empty(failure: Failure) -> Any:
            return [] if failure.check(CommandError) else to_remote(failure, "ls", True)

        return self._ls(directory).addErrback(empty)

    def remote_ls_boom(self, directory: str) -> Deferred:
        return self._ls(directory).addErrback(to_remote, "ls", True)

    def _ls(self, directory: Any) -> Deferred:
        check(directory, str, "directory")
        ctx = Context(self.door.core, user=ANONYMOUS, peer=self.peer, door=DOOR,
                      session_id=self.session.id)
        return self.calls.track(self.door.core.call(ctx, "ls", path=directory))


def _table(cls: type[LoginRoot], names: tuple[str, ...]) -> None:
    cls.methods = {n: getattr(cls, f"remote_{n}") for n in names}
    cls.signatures = {n: inspect.signature(f) for n, f in cls.methods.items()}


_table(LoginRoot, ("login", "authenticate"))
_table(AnonymousRoot, ("login", "authenticate", "ls", "ls_boom"))


@implementer(pb.IPBRoot)
class PBDoor:
    """Builds each connection's root object and the realm's PB avatars."""

    def __init__(self, core: CommandCore, portal: Portal, anonymous: bool = False,
                 upload: UploadStarter | None = None) -> None:
        self.core = core
        self.portal = portal
        self.anonymous = anonymous
        self.upload = upload

    def rootObject(self, broker: pb.Broker) -> LoginRoot:
        return (AnonymousRoot if self.anonymous else LoginRoot)(self, broker)

    def avatar(self, account: Account, mind: PBMind) -> tuple[PBAvatar, Callable[[], None]]:
        """The realm's factory for ``pb.IPerspective``."""
        avatar = PBAvatar(self.core, account, mind, self.upload)
        return avatar, avatar.logout


class DoorBroker(BoundedBanana, pb.Broker, TimeoutMixin):
    """A server broker that hangs up on a client silent for the idle timeout,
    unless one of its calls (a long lastlog, an upload) is still running.

    Messages are decoded within bounds (:mod:`cmdserver.doors.pb.wire`): at
    most 64 KiB each before a login, 1 MiB after, lists nested at most 32 deep.
    A client that does not read its answers stops being read: no new call is
    taken while the transport holds a full buffer of answers (so PB's pagers,
    which register the broker as a pull producer, are not used here).
    """

    transport: ITransport  # set in makeConnection, before any other callback
    core: CommandCore  # set by DoorFactory
    audit_session: Session  # the connection's session in the core, from connectionMade
    login_required = True  # False with --pb-anonymous: the root serves without a login

    def __init__(self, isClient: bool = False, security: Any = jelly.globalSecurity) -> None:
        super().__init__(isClient=isClient, security=security)
        self.idle_timeout: float | None = None
        self.call_sets: list[RunningCalls] = []

    def connectionMade(self) -> None:
        self.audit_session = self.core.open_session(DOOR, format_peer(self.transport.getPeer()),
                                                    self.transport)
        cast(IConsumer, self.transport).registerProducer(_Reading(self.transport), True)
        super().connectionMade()
        self.setTimeout(self.idle_timeout)
        if self.login_required:
            self.core.gate.login_deadline(self.audit_session, self._login_expired)

    def _login_expired(self) -> None:
        """No login within the gate's grace time: closed, whatever the client sent."""
        log.info("pb: {peer} did not log in within {grace:g} s, disconnecting",
                 peer=self.audit_session.peer, grace=self.core.gate.settings.login_grace)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

    def peer_text(self) -> str:
        return format_peer(self.transport.getPeer())

    def logged_in(self) -> None:
        """A login succeeded on this connection: larger messages are fine now."""
        self.message_limit = MESSAGE_LIMIT

    def timeoutConnection(self) -> None:
        if any(self.call_sets):
            # The timer is spent once it fires (resetTimeout would do nothing): re-arm.
            self.setTimeout(self.idle_timeout)
            return
        log.info("pb: {peer} idle for {timeout:g} s, disconnecting",
                 peer=format_peer(self.transport.getPeer()), timeout=self.idle_timeout)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        super().connectionLost(reason)  # logs out and cancels the calls, which are audited
        session = getattr(self, "audit_session", None)
        if session is not None:
            self.core.close_session(session)


@implementer(IPushProducer)
class _Reading:
    """The broker's input as its transport's producer: paused while the transport's
    buffer of answers is full, so a client that does not read sends no more calls."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


def watch_calls(broker: Any, calls: RunningCalls) -> None:
    """Let the broker's idle timeout know about a set of running calls."""
    if isinstance(broker, DoorBroker):
        broker.call_sets.append(calls)


class DoorFactory(pb.PBServerFactory):
    """``PBServerFactory`` with :class:`DoorBroker` and the door's idle timeout."""

    protocol = DoorBroker
    noisy = False

    def __init__(self, door: PBDoor, idle_timeout: float | None) -> None:
        super().__init__(door)
        self.door = door
        self.core = door.core
        self.idle_timeout = idle_timeout or None
        self.reactor = door.core.reactor

    def buildProtocol(self, addr: Any) -> DoorBroker:
        broker = super().buildProtocol(addr)
        broker.idle_timeout = self.idle_timeout
        broker.core = self.core
        broker.login_required = not self.door.anonymous
        broker.callLater = self.reactor.callLater
        return broker


def build(env: Any, endpoint: str) -> Any:
    """The Perspective Broker door on ``endpoint``."""
    from cmdserver.doors import Door

    return Door(pb_factory(env.core, env.service.portal, env.options["pb-anonymous"],
                           upload=consumer_starter(env.uploads.begin),
                           idle_timeout=env.options["idle-timeout"]))


def pb_factory(core: CommandCore, portal: Portal, anonymous: bool = False,
               upload: UploadStarter | None = None,
               idle_timeout: float | None = None) -> pb.PBServerFactory:
    """The PB door's factory; registers its avatar with the portal's realm.

    ``idle_timeout`` (seconds, None or 0 for none) closes silent connections.
    """
    door = PBDoor(core, portal, anonymous, upload)
    realm = cast(Realm, portal.realm)  # the service's portal is built on a cmdserver Realm
    realm.register(pb.IPerspective, door.avatar)
    return DoorFactory(door, idle_timeout)
