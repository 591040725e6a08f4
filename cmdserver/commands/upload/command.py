"""``upload NAME SIZE HMAC``: receive a file whose MAC is checked before it appears.

The MAC comes in the command (64 hex digits) or, with ``-`` in its place, in a
trailer line after the content (``MAC <64 hex digits>``): then the client
hashes the file while it sends it, in one pass.

The command asks the door's session for the raw byte stream:
``ctx.session.receive_raw(size, consumer, trailer)`` must hand the next
``size`` bytes the client sends to ``consumer.write`` (and honour the producer
the consumer is given for back-pressure); with ``trailer`` it then reads one
line and hands it, without its newline, to ``consumer.trailer`` (or calls
``consumer.fail(why)`` if the stream ends first); then it goes back to reading
commands.  The line door and the SSH exec channel do this; a door without it
cannot run ``upload``, and ``ctx.session.raw_input_unavailable(usage)``, where
a door has it, may refuse before anything is created (the SSH shell has no
stdin to read).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from cmdserver.commands.base import Command, Context
from cmdserver.commands.params import SWITCH, Choice, Param, ParamType
from cmdserver.commands.upload.engine import (
    TRAILER,
    TrailerUploadResult,
    Upload,
    UploadResult,
    Uploads,
)
from cmdserver.commands.upload.mac import ALGORITHMS, HMAC_SHA256
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
    summary = ("Receive a file: SIZE raw bytes follow 'Ready', checked against their "
               "MAC (HMAC-SHA256 unless --mac says otherwise).")
    params = (
        Param("name", help="where the file goes, inside the allowed roots"),
        Param("size", Size(), help="the file's size in bytes"),
        Param("hmac", help="the content's MAC in hex (64 digits), or - to send it after "
              "the content in a trailer line 'MAC <hex>'"),
        Param("mac", Choice(ALGORITHMS), default=HMAC_SHA256, flag=True, metavar="ALG",
              help="the MAC algorithm: hmac-sha256, or blake2b (keyed BLAKE2b, "
              "32 bytes); refused, never replaced, where the server does not take it"),
        Param("sha256", SWITCH, default=False, flag=True,
              help="also compute the content's SHA-256 for the answer (with -; the "
              "form with the MAC in the command always has it)"),
    )
    # ``upload NAME SIZE HMAC``: the usage without its options, for a door's hints.
    synopsis = " ".join([name, *(p.shown for p in params if not p.flag)])
    reads_input = True
    timeout = 0  # no deadline: a big file takes long; a stalled one meets the idle timeout

    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads

    def run(self, ctx: Context, name: str, size: int, hmac: str, mac: str = HMAC_SHA256,
            sha256: bool = False) -> Deferred:
        receive = getattr(ctx.session, "receive_raw", None)
        if receive is None:
            raise CommandError("upload needs a door that can stream raw bytes")
        # A door may stream bytes on some channels only (SSH: exec, not the shell):
        # it says why not before anything is created.
        unavailable = getattr(ctx.session, "raw_input_unavailable", None)
        reason = unavailable(self.synopsis) if unavailable is not None else None
        if reason is not None:
            raise CommandError(reason)

        def ready(upload: Upload) -> Deferred:
            ctx.out.line(READY.format(size=size))
            if hmac == TRAILER:
                receive(size, upload, trailer=True)
            else:
                receive(size, upload)
            return upload.done

        return self.uploads.begin(ctx, name, size, hmac, mac, sha256).addCallback(ready)

    def text(self, result: UploadResult | TrailerUploadResult) -> list[str]:
        if isinstance(result, TrailerUploadResult):
            sha = f" sha256={result.sha256}" if result.sha256 is not None else ""
            return [f"Upload OK {result.name} {result.size} mac={result.mac}{sha}"]
        return [f"Upload OK {result.name} {result.size} sha256={result.sha256}"]

    def audit_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return audit_args(kwargs)


def audit_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What the audit log keeps of an upload, on every door: the name, the size and
    the MAC algorithm the client named, the one that authenticates the file (never
    the MAC itself)."""
    return {"name": kwargs.get("name"), "size": kwargs.get("size"),
            "mac": kwargs.get("mac", HMAC_SHA256)}
