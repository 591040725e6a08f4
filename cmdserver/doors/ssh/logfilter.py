"""Conch's own log lines kept out of the main log, while an SSH door listens.

twisted.conch logs a connection's every step: the key exchange, each
authentication method tried, each channel opened and closed, each SFTP
packet (debug and info lines), and an ordinary ``disconnected by user`` from
the client as an error.  Its loggers are class attributes (``_log``) of the
transport, the services, the channels and the SFTP protocol, so their events
carry the instance as ``log_source`` and the class as ``log_namespace`` (so
does the avatar's base class); the session module logs under
``twisted.conch.ssh.session``.  The door logs what
an operator needs itself: the login (with the user and address) and the logout.

:func:`install` puts a :class:`~twisted.logger.FilteringLogObserver` in front
of each observer of the global log publisher (the sinks twistd set up before
the service started); :func:`uninstall` takes it away once the last door
stopped.  What it drops comes from conch only: its debug and info events, and a
peer's normal disconnect.  Its warnings, errors and tracebacks stay.
"""

from __future__ import annotations

from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.ssh import channel, factory, filetransfer, service, transport
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogPublisher,
    PredicateResult,
    globalLogPublisher,
)
from zope.interface import implementer

CONCH_TYPES = (ConchUser, transport.SSHTransportBase, service.SSHService, channel.SSHChannel,
               filetransfer.FileTransferBase, factory.SSHFactory)
QUIET_LEVELS = frozenset({LogLevel.debug, LogLevel.info})
# SSHTransportBase.receiveError's line: "Got remote error, code {code} …".
REMOTE_ERROR = "Got remote error"


def from_conch(event: LogEvent) -> bool:
    """Whether conch itself logged ``event`` (not a cmdserver module's logger)."""
    namespace = event.get("log_namespace") or ""
    if namespace.startswith("twisted.conch."):
        return True
    source = event.get("log_source")
    if not isinstance(source, CONCH_TYPES):
        return False
    kind = type(source)  # a class logger names the instance's class
    return namespace == f"{kind.__module__}.{kind.__name__}"


@implementer(ILogFilterPredicate)
class ConchNoise:
    """``no`` for conch's routine events, ``maybe`` (no opinion) for the rest."""

    def __call__(self, event: LogEvent) -> PredicateResult:
        if not from_conch(event) or event.get("log_failure") is not None:
            return PredicateResult.maybe
        if event.get("log_level") in QUIET_LEVELS:
            return PredicateResult.no
        if (str(event.get("log_format", "")).startswith(REMOTE_ERROR)
                and event.get("code") == transport.DISCONNECT_BY_APPLICATION):
            return PredicateResult.no  # the client said goodbye ("disconnected by user")
        return PredicateResult.maybe


conch_noise = ConchNoise()


class QuietConch(FilteringLogObserver):
    """One observer behind the filter.  Equal to that observer, so that removing
    it from the publisher (``removeObserver``) finds the filter in its place."""

    def __init__(self, observer: ILogObserver) -> None:
        super().__init__(observer, [conch_noise])
        self.inner = observer

    def __eq__(self, other: object) -> bool:
        return other is self or self.inner == other

    def __hash__(self) -> int:
        return hash(self.inner)


_installed = 0


def _observers(publisher: LogPublisher) -> list[Any] | None:
    # LogPublisher has no public way to list its observers; without this list
    # (another Twisted) nothing is filtered and nothing breaks.
    observers = getattr(publisher, "_observers", None)
    return observers if isinstance(observers, list) else None


def install(publisher: LogPublisher = globalLogPublisher) -> None:
    """Filter every observer the publisher has now; counted, undone by :func:`uninstall`."""
    global _installed
    _installed += 1
    observers = _observers(publisher)
    if observers is not None:
        observers[:] = [o if isinstance(o, QuietConch) else QuietConch(o) for o in observers]


def uninstall(publisher: LogPublisher = globalLogPublisher) -> None:
    """Undo one :func:`install`; the last one gives the observers back unfiltered."""
    global _installed
    _installed = max(0, _installed - 1)
    observers = _observers(publisher)
    if observers is not None and not _installed:
        observers[:] = [o.inner if isinstance(o, QuietConch) else o for o in observers]
