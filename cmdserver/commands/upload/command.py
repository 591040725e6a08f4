"""``upload NAME SIZE HMAC``: receive a file whose HMAC is checked before it appears.

The command asks the door's session for the raw byte stream:
``ctx.session.receive_raw(size, consumer)`` must hand the next ``size`` bytes
the client sends to ``consumer.write`` (and honour the producer the consumer
is given for back-pressure), then go back to reading commands.  The line door
and the SSH exec channel do this; a door without it cannot run ``upload``, and
``ctx.session.raw_input_unavailable(usage)``, where a door has it, may refuse
before anything is created (the SSH shell has no stdin to read).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from cmdserver.commands.base import Command, Context
from cmdserver.commands.params import Param, ParamType
from cmdserver.commands.upload.engine import Upload, UploadResult, Uploads
from cmdserver.errors import CommandError

READY = "Ready for {size} bytes"


def parse_size(word: str) -> int:
    """A byte count as the client wrote it: decimal digits only."""
    if not (word.isascii() and word.isdigit()):
        raise CommandError(f"SIZE must be a whole number of bytes: {word}")
    return int(word)


class Size(ParamType):
    """A byte count: decimal digits on the text doors, a whole number >= 0 otherwise."""

    name = "int"

    def from_text(self, param: Param, word: str) -> int:
        return parse_size(word)

    def from_value(self, param: Param, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CommandError(f"SIZE must be a whole number of bytes: {value}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": 0}


class UploadCommand(Command):
    name = "upload"
    summary = "Receive a file: SIZE raw bytes follow 'Ready', checked against HMAC-SHA256."
    params = (
        Param("name", help="where the file goes, inside the allowed roots"),
        Param("size", Size(), help="the file's size in bytes"),
        Param("hmac", help="the hex HMAC-SHA256 of the content"),
    )
    reads_input = True
    timeout = 0  # no deadline: a big file takes long; a stalled one meets the idle timeout

    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads

    def run(self, ctx: Context, name: str, size: int, hmac: str) -> Deferred:
        receive = getattr(ctx.session, "receive_raw", None)
        if receive is None:
            raise CommandError("upload needs a door that can stream raw bytes")
        # A door may stream bytes on some channels only (SSH: exec, not the shell):
        # it says why not before anything is created.
        unavailable = getattr(ctx.session, "raw_input_unavailable", None)
        reason = unavailable(self.usage) if unavailable is not None else None
        if reason is not None:
            raise CommandError(reason)

        def ready(upload: Upload) -> Deferred:
            ctx.out.line(READY.format(size=size))
            receive(size, upload)
            return upload.done

        return self.uploads.begin(ctx, name, size, hmac).addCallback(ready)

    def text(self, result: UploadResult) -> list[str]:
        return [f"Upload OK {result.name} {result.size} sha256={result.sha256}"]

    def audit_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"name": kwargs.get("name"), "size": kwargs.get("size")}
