"""Errors that reach users as one line of text (``Error: ...`` on the text doors).

The subclasses say what kind of refusal it is, for doors that have a word for
it (the HTTP door's status codes); the text doors print them all alike.
"""

from cmdserver.text import escaped


class CommandError(Exception):
    """A refusal or failure whose message is safe and meant for the user.

    The text doors print ``Error: <message>``; PB raises it as a ``pb.Error``
    with the same message.  Anything else raised by a handler is an internal
    error: its traceback goes to the log and the user only sees a short line.
    """

    def __init__(self, message: str) -> None:
        # It may quote the user's words: one line, nothing that drives a terminal.
        message = escaped(message)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def text(self) -> str:
        """The line a text door prints."""
        return f"Error: {self.message}"


class UsageError(CommandError):
    """The arguments do not fit the command's syntax."""


class MissingArgument(UsageError):
    """A required argument is missing; the text doors print the message as is."""

    @property
    def text(self) -> str:
        return self.message


class NotFound(CommandError):
    """No command has that name."""


class Refused(CommandError):
    """Refused by policy: the file jail, the scan allowlist and limits (HTTP 403)."""


class Conflict(CommandError):
    """At odds with the state of things: an upload's target exists, a scan already
    runs on the connection (HTTP 409)."""


class TooLarge(CommandError):
    """More than a size limit allows: an upload over ``--max-upload`` (HTTP 413)."""


class Throttled(CommandError):
    """Too many attempts: the client must wait or stop (HTTP 429)."""


class PathOutsideRoots(Refused):
    """A path resolves outside every allowed root."""

    def __init__(self) -> None:
        super().__init__("path outside allowed roots")


class RootProtected(Refused):
    """An operation would remove, rename or change the mode of a root itself."""


class DeadlineExceeded(CommandError):
    """A command ran past its deadline and was stopped (exit status 124 on SSH exec,
    as timeout(1) gives)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"deadline exceeded: stopped after {seconds:g} s")
        self.seconds = seconds


class OutputLimitExceeded(CommandError):
    """A command wrote more output than its cap allows and was stopped."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"output limit exceeded: stopped after {limit} bytes")
        self.limit = limit


class TooManyCalls(CommandError):
    """A client has as many commands running as it may: this one was refused
    before it ran (``where``: ``from this address``, ``on this connection``)."""

    def __init__(self, where: str, limit: int) -> None:
        super().__init__(f"too many calls in flight {where} (the limit is {limit})")
        self.limit = limit
