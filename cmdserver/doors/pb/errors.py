"""The errors the PB door sends back: ``pb.Error`` subclasses with one-line messages.

``pb.Error`` subclasses travel to the client as a remote failure naming the class
and carrying the message, with no traceback (the door never sets
``unsafeTracebacks``).  Anything else a call raises is turned into
:class:`InternalError` here, after its traceback is logged on the server.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.spread import pb

from cmdserver.core import INTERNAL_ERROR
from cmdserver.errors import CommandError, DeadlineExceeded

log = Logger()


class CommandFailed(pb.Error):
    """A command refused or failed; the message is the text door's line without
    its ``Error: `` prefix (``path outside allowed roots``)."""


class BadArguments(pb.Error):
    """The call's arguments do not fit the method (wrong count, name or type); the
    message ends with the method's ``usage: NAME(ARGS)``, as a text door's usage
    error ends with the command's usage."""


class UnknownMethod(pb.Error):
    """No remote method has that name (``Command not found.``, as on a text door)."""


class LoginRequired(pb.Error):
    """A command was called on the root object, before ``authenticate``."""


class LoginFailed(pb.Error):
    """Wrong user name or password (the same message for both)."""


class CommandTimedOut(pb.Error):
    """The command ran past its deadline and was stopped (a text door prints
    ``Error: deadline exceeded: …``; SSH exec exits 124)."""


class Cancelled(pb.Error):
    """The command was cancelled before it finished."""


class InternalError(pb.Error):
    """Something broke on the server; the traceback is in the server's log only."""


def to_remote(failure: Failure, where: str, logged: bool = False) -> Failure:
    """Map a failure to a ``pb.Error`` the client may see; log the unexpected ones.

    ``logged`` says the core has logged the traceback already (a command's own failure).
    """
    if failure.check(pb.Error):
        return failure
    if failure.check(DeadlineExceeded):
        return Failure(CommandTimedOut(cast(CommandError, failure.value).message))
    if failure.check(CommandError):
        return Failure(CommandFailed(cast(CommandError, failure.value).message))
    if failure.check(CancelledError):
        return Failure(Cancelled("cancelled"))
    if not logged:
        log.failure("pb: {where} failed", failure, where=where)
    return Failure(InternalError(INTERNAL_ERROR))
