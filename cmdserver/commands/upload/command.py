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

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred

from cmdserver.commands.base import Command, Context
from cmdserver.commands.upload.engine import Upload, UploadResult, Uploads
from cmdserver.errors import CommandError

READY = "Ready for {size} bytes"


def parse_size(word: str) -> int:
    """A byte count as the client wrote it: decimal digits only."""
    if not (word.isascii() and word.isdigit()):
        raise CommandError(f"SIZE must be a whole number of bytes: {word}")
    return int(word)


class UploadCommand(Command):
    name = "upload"
    summary = "Receive a file: SIZE raw bytes follow 'Ready', checked against HMAC-SHA256."
    usage = "upload NAME SIZE HMAC"
    reads_input = True

    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads

    def parse(self, argv: Sequence[str]) -> dict[str, Any]:
        if len(argv) != 3:
            raise self.usage_error()
        name, size, mac = argv
        return {"name": name, "size": parse_size(size), "hmac": mac}

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
