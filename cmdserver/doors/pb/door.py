"""The Perspective Broker door: Python programs call commands and get Python values.

A client logs in through the shared portal with a user name and password
(``authenticate(user, password)`` on the root object; passwords are checked
against bcrypt hashes, so PB's MD5 challenge login cannot work and is refused
with a clear error).  The avatar it gets has one method per command; every call
goes through :meth:`CommandCore.call`, so audit, stats and the file jail are
the same as on the text doors.  Errors come back as the ``pb.Error`` subclasses
of :mod:`cmdserver.doors.pb.errors`, never as a server traceback.

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
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from twisted.spread import jelly, pb
from zope.interface import implementer

from cmdserver.auth.portal import ANONYMOUS, Account, Realm
from cmdserver.commands.account import LOGIN_FAILED, TOO_MANY_FAILURES
from cmdserver.commands.base import Context, NullSink
from cmdserver.commands.lastlog import DEFAULT_LINES
from cmdserver.core import LOGIN_REQUIRED, NOT_FOUND_TEXT, CommandCore, is_deferred
from cmdserver.doors.limits import format_peer
from cmdserver.doors.pb.calls import (
    RemoteSink,
    RunningCalls,
    check,
    check_observer,
    dispatch,
    scan_result,
)
from cmdserver.doors.pb.errors import (
    BadArguments,
    CommandFailed,
    LoginFailed,
    LoginRequired,
    to_remote,
)
from cmdserver.doors.pb.upload import PBUpload, UploadStarter
from cmdserver.errors import CommandError, MissingArgument
from cmdserver.policy import Policy

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


class PBAvatar(pb.Avatar):
    """One logged-in user on one connection: a method per command, Python values back."""

    def __init__(self, core: CommandCore, account: Account, mind: PBMind,
                 upload: UploadStarter | None = None) -> None:
        self.core = core
        self.account = account
        self.peer = mind.peer
        self.upload_starter = upload
        self.policy = Policy(account.roots) if account.roots else core.policy
        self.calls = RunningCalls()
        watch_calls(mind.broker, self.calls)
        self._ctx = self._context(NullSink())

    def perspectiveMessageReceived(self, broker: pb.Broker, message: str | bytes,
                                   args: Any, kw: Any) -> Any:
        return dispatch(AVATAR_METHODS, AVATAR_SIGNATURES, self, broker, message, args, kw,
                        self._missing_argument)

    def _missing_argument(self, name: str) -> str | None:
        """What a text door answers when the command is given no words, if that is a
        missing-argument error (``Please provide a path.``): PB says the same."""
        command = self.core.registry.get(name)
        try:
            if command is not None:
                command.parse([])
        except MissingArgument as e:
            return e.message
        except CommandError:
            pass
        return None

    def logout(self) -> None:
        """The client logged out or went away: cancel what it still runs."""
        self.calls.cancel_all()

    def _context(self, out: Any) -> Context:
        return Context(self.core, user=self.account.name, peer=self.peer, door=DOOR,
                       out=out, policy=self.policy)

    def _call(self, name: str, observer: Any = None,
              convert: Callable[[Any], Any] | None = None, **kwargs: Any) -> Any:
        """Run a command for the client: its value (through ``convert``) when it
        finished at once, which PB sends straight back, else a Deferred of it.
        A failure reaches the client as one of the door's ``pb.Error``s."""
        observer = check_observer(observer)
        command = self.core.registry.get(name)
        if command is None:
            raise CommandFailed(NOT_FOUND_TEXT)
        ctx = self._ctx if observer is None else self._context(RemoteSink(observer))
        result = self.core.invoke(ctx, command, kwargs)
        if is_deferred(result):
            d = self.calls.track(result)
            if convert is not None:
                d.addCallback(convert)
            return d.addErrback(to_remote, name, True)
        if isinstance(result, Failure):
            to_remote(result, name, True).raiseException()
        return result if convert is None else convert(result)

    # -- the remote methods ---------------------------------------------------
    # Each returns the command's value, or a Deferred of it for a command that
    # takes time (PB accepts both).

    def perspective_ping(self) -> Any:
        return self._call("ping")

    def perspective_help(self, command: str | None = None) -> Any:
        if command is None:  # only what this door serves: no exit, login, quit
            return self._call("help", None, _served_here)
        return self._call("help", None, _help_dict, command=check(command, str, "command"))

    def perspective_stats(self) -> Any:
        return self._call("stats")

    def perspective_whoami(self) -> Any:
        return self._call("whoami")

    def perspective_lastlog(self, n: int = DEFAULT_LINES, observer: Any = None) -> Any:
        return self._call("lastlog", observer, n=check(n, int, "n"))

    def perspective_comphash(self, path: str, algo: str = "sha256",
                             observer: Any = None) -> Any:
        return self._call("comphash", observer, path=check(path, str, "path"),
                          algo=check(algo, str, "algo"))

    def perspective_ls(self, path: str | None = None, observer: Any = None) -> Any:
        return self._call("ls", observer, path=check(path, (str, type(None)), "path"))

    def perspective_portscan(self, host: str, ports: str | list[int] | None = None,
                             observer: Any = None) -> Any:
        command = self.core.registry.get("portscan")
        if command is None:
            raise CommandFailed(NOT_FOUND_TEXT)
        # The words the text door would have split: its parser checks them the same way.
        argv = [check(host, str, "host")]
        if isinstance(ports, list):
            ports = ",".join(str(check(p, int, "each port")) for p in ports)
        if ports is not None:
            argv.append(check(ports, str, "ports"))
        try:
            kwargs = command.parse(argv)
        except CommandError as e:
            raise CommandFailed(e.message) from None
        return self._call("portscan", observer, scan_result, **kwargs)

    def perspective_upload(self, name: str, size: int, hmac: str) -> Deferred:
        check(name, str, "name")
        if check(size, int, "size") < 0:  # worded as the text doors' refusal
            raise CommandFailed(f"SIZE must be a whole number of bytes: {size}")
        check(hmac, str, "hmac")
        if self.upload_starter is None:  # the text doors have no upload command then
            raise CommandFailed(NOT_FOUND_TEXT)
        ready: Deferred = Deferred()
        d = self.calls.track(self.core.run_command(
            self._ctx, PBUpload(self.upload_starter, ready), name=name, size=size,
            hmac=hmac))

        def ended(result: Any) -> None:
            # The writer's close() reports the outcome once the upload started;
            # before that (a refusal), the upload() call itself fails.
            if not ready.called:
                ready.errback(result if isinstance(result, Failure) else
                              Failure(CommandError("upload ended before it started")))

        d.addBoth(ended)
        return ready.addErrback(to_remote, "upload", True)


def _served_here(commands: dict[str, str]) -> dict[str, str]:
    return {name: summary for name, summary in commands.items() if name in AVATAR_METHODS}


def _help_dict(h: Any) -> dict[str, str]:
    return {"name": h.name, "usage": h.usage, "summary": h.summary}


AVATAR_METHODS: dict[str, Callable[..., Any]] = {
    "ping": PBAvatar.perspective_ping,
    "help": PBAvatar.perspective_help,
    "stats": PBAvatar.perspective_stats,
    "whoami": PBAvatar.perspective_whoami,
    "lastlog": PBAvatar.perspective_lastlog,
    "comphash": PBAvatar.perspective_comphash,
    "ls": PBAvatar.perspective_ls,
    "portscan": PBAvatar.perspective_portscan,
    "upload": PBAvatar.perspective_upload,
}
AVATAR_SIGNATURES = {name: inspect.signature(f) for name, f in AVATAR_METHODS.items()}


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

    def remoteMessageReceived(self, broker: pb.Broker, message: str | bytes, args: Any,
                              kw: Any) -> Any:
        name = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
        if name not in self.methods and name in AVATAR_METHODS:
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
        d = self.door.portal.login(UsernamePassword(user, secret),
                                   PBMind(self.broker, self.peer, mind), pb.IPerspective)
        return d.addCallbacks(self._logged_in, self._login_failed,
                              errbackArgs=(user.decode("utf-8", "replace"),))

    def _logged_in(self, result: tuple[Any, Any, Callable[[], None]]) -> pb.Referenceable:
        _, avatar, logout = result
        remote = pb.AsReferenceable(avatar, "perspective")
        once = [logout]

        def maybe_logout() -> None:
            if once:
                once.pop()()

        self.broker.notifyOnDisconnect(maybe_logout)
        log.info("pb: {user} logged in from {peer}", user=getattr(avatar.account, "name", "?"),
                 peer=self.peer)
        return remote

    def _login_failed(self, failure: Failure, user: str) -> Failure:
        self.failures += 1
        if failure.check(cred_error.UnhandledCredentials):
            log.error("pb: no password checker is configured; login refused")
        elif not failure.check(cred_error.LoginFailed):
            log.failure("pb: login of {user} failed", failure, user=user)
        log.info("pb: failed login for {user} from {peer}", user=user, peer=self.peer)
        if self.failures >= MAX_LOGIN_FAILURES:
            # Closed once this answer is written, so the client reads why.
            self.door.core.reactor.callLater(0, self._hang_up)
            return Failure(LoginFailed(TOO_MANY_FAILURES))
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
        ctx = Context(self.door.core, user=ANONYMOUS, peer=self.peer, door=DOOR)
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


class DoorBroker(pb.Broker, TimeoutMixin):
    """A server broker that hangs up on a client silent for the idle timeout,
    unless one of its calls (a long lastlog, an upload) is still running."""

    transport: ITransport  # set in makeConnection, before any other callback

    def __init__(self, isClient: bool = False, security: Any = jelly.globalSecurity) -> None:
        super().__init__(isClient=isClient, security=security)
        self.idle_timeout: float | None = None
        self.call_sets: list[RunningCalls] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.setTimeout(self.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        super().dataReceived(data)

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
        super().connectionLost(reason)


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
        self.core = door.core
        self.idle_timeout = idle_timeout or None
        self.reactor = door.core.reactor

    def buildProtocol(self, addr: Any) -> DoorBroker:
        broker = super().buildProtocol(addr)
        broker.idle_timeout = self.idle_timeout
        broker.callLater = self.reactor.callLater
        return broker


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
