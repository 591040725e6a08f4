"""The JSON API: ``POST /v1/commands/NAME``, ``GET /v1/commands``, ``GET /v1/openapi.json``.

A command's body is a JSON object with its arguments by name (``{"args":
{"path": "notes.txt"}}``, checked by :meth:`CommandCore.bind`) or its words as
typed on the line door (``{"argv": ["notes.txt"]}``, parsed by
:meth:`CommandCore.parse_words`); an empty body runs it without arguments.
The answer is ``{"result": VALUE, "output": [LINES]}``.  With ``Accept:
application/x-ndjson`` the output comes as it is written, one ``{"line": …}``
object a line, and a last object with the ``result`` (or the ``error`` and its
``status``, which is also the answer's if no line came before it: the answer
starts with the first line).  A client that goes away cancels the command.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET

from cmdserver.commands.base import Command, Context, ListSink
from cmdserver.core import is_deferred
from cmdserver.doors.http import DOOR
from cmdserver.doors.http.door import (
    HTTPDoor,
    answer,
    deferred_answer,
    encode,
    prepare,
)
from cmdserver.doors.http.errors import (
    BAD_REQUEST,
    NOT_FOUND,
    UNSUPPORTED_MEDIA_TYPE,
    HTTPError,
    failure_answer,
)
from cmdserver.doors.http.login import Login
from cmdserver.errors import CommandError, NotFound, OutputLimitExceeded

PREFIX = b"/v1/commands/"
NDJSON = b"application/x-ndjson"


def served(door: HTTPDoor) -> list[Command]:
    """The commands the door serves as commands (``upload`` is ``PUT /v1/files``)."""
    return [c for c in door.core.registry.commands(DOOR) if not c.reads_input]


def command_name(path: bytes, prefix: bytes = PREFIX) -> str:
    raw = unquote_to_bytes(path[len(prefix):])
    if not raw or b"/" in raw:
        raise HTTPError(NOT_FOUND, "Command not found.")
    return raw.decode("utf-8", "replace")


def json_body(request: Any) -> Any:
    """The request's JSON body (None if empty); 415 if it does not say it is JSON."""
    content = request.content.getvalue() if request.content is not None else b""
    kind = request.requestHeaders.getRawHeaders(b"content-type")
    if not kind or kind[0].split(b";")[0].strip().lower() != b"application/json":
        raise HTTPError(UNSUPPORTED_MEDIA_TYPE,
                        "the body must be JSON (Content-Type: application/json)")
    if not content.strip():
        return None
    try:
        return json.loads(content)
    except (ValueError, RecursionError) as e:
        raise HTTPError(BAD_REQUEST, f"the body is not valid JSON: {str(e)[:200]}") from None


def arguments(body: Any) -> tuple[dict[str, Any] | None, list[str] | None]:
    """``(args, argv)`` from a command's body: named values, or words."""
    if body is None:
        return {}, None
    if not isinstance(body, dict) or not set(body) <= {"args", "argv"}:
        raise HTTPError(BAD_REQUEST, 'the body is {"args": {NAME: VALUE, ...}} or '
                        '{"argv": [WORD, ...]}')
    if "args" in body and "argv" in body:
        raise HTTPError(BAD_REQUEST, "give args or argv, not both")
    if "argv" in body:
        argv = body["argv"]
        if not isinstance(argv, list) or not all(isinstance(w, str) for w in argv):
            raise HTTPError(BAD_REQUEST, "argv must be a list of strings")
        return None, argv
    args = body.get("args", {})
    if not isinstance(args, dict):
        raise HTTPError(BAD_REQUEST, "args must be an object of named values")
    return args, None


def bad_arguments(error: CommandError) -> HTTPError:
    """A refusal of the arguments, before the command ran: 400 (404 for an unknown
    command), worded as on the other doors."""
    return HTTPError(NOT_FOUND if isinstance(error, NotFound) else BAD_REQUEST, error.message)


def prepare_call(core: Any, ctx: Context, name: str, args: dict[str, Any] | None,
                 argv: list[str] | None) -> tuple[Command, dict[str, Any]]:
    """The command and its checked arguments (refusals audited by the core)."""
    try:
        if argv is not None:
            return core.parse_words(ctx, name, argv)
        command = core.lookup(ctx, name)
        if not (args or command.params):  # ping, whoami: nothing to check
            return command, {}
        return command, core.bind(ctx, command, args or {})
    except CommandError as e:
        raise bad_arguments(e) from None


def output_cap(core: Any, command: Command) -> int:
    return command.max_output if command.max_output is not None else core.max_output


class StreamSink:
    """Output lines straight to the client, one JSON object a line (NDJSON)."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.started = False

    def start(self) -> None:
        if not self.started:
            self.started = True
            prepare(self.request, 200, NDJSON)

    def line(self, text: str) -> None:
        if self.request.gone:
            return
        self.start()
        self.request.write(encode({"line": text}))

    def end(self, value: dict[str, Any], status: int = 200) -> None:
        """The last object; the status only counts if nothing was sent before."""
        request = self.request
        if request.gone or request.finished:
            return
        if not self.started:
            prepare(request, status, NDJSON)
            self.started = True
        request.write(encode(value))
        request.finish()


class CommandAPI:
    """The JSON API's handlers (each runs once the request's sender is logged in)."""

    def __init__(self, door: HTTPDoor) -> None:
        self.door = door
        self.core = door.core
        self._openapi: bytes | None = None

    def run(self, request: Any, login: Login) -> bytes | int:
        name = command_name(request.path)
        args, argv = arguments(json_body(request))
        ctx = login.ctx
        command, kwargs = prepare_call(self.core, ctx, name, args, argv)
        if request.accepts_stream():
            return self._stream(request, replace(ctx, out=StreamSink(request)), command, kwargs)
        lines = None
        if command.streams:
            lines = ListSink()
            ctx = replace(ctx, out=lines)
        result = self.core.invoke(ctx, command, kwargs)
        if is_deferred(result):
            return deferred_answer(request, result,
                                   lambda value: self._success(command, value, lines),
                                   lambda message: _error(message, lines))
        if isinstance(result, Failure):
            status, message = failure_answer(result)
            prepare(request, status)
            return encode(_error(message, lines))
        status, value = self._success(command, result, lines)
        prepare(request, status)
        return encode(value)

    def _success(self, command: Command, value: Any, lines: ListSink | None
                 ) -> tuple[int, Any]:
        output = lines.lines if lines is not None else []
        cap = output_cap(self.core, command)
        if cap and not command.streams:
            # A value too large to show (a huge listing): one error, as the text doors say.
            size = len(encode(value))
            if size > cap:
                return 422, {"error": OutputLimitExceeded(cap).message}
        return 200, {"result": value, "output": output}

    def _stream(self, request: Any, ctx: Context, command: Command,
                kwargs: dict[str, Any]) -> int:
        sink: StreamSink = ctx.out  # type: ignore[assignment]  # set by run
        result = self.core.invoke(ctx, command, kwargs)
        if not is_deferred(result):
            if isinstance(result, Failure):
                status, message = failure_answer(result)
                sink.end({"error": message, "status": status}, status)
            else:
                sink.end({"result": result})
            return NOT_DONE_YET
        # The headers go with the first line: a command that fails before it writes
        # one still gets its own status.
        request.notifyFinish().addErrback(lambda _: result.cancel())

        def failed(failure: Failure) -> None:
            status, message = failure_answer(failure)
            sink.end({"error": message, "status": status}, status)

        result.addCallbacks(lambda value: sink.end({"result": value}), failed)
        result.addErrback(request.processingFailed)
        return NOT_DONE_YET

    def describe(self, request: Any, login: Login) -> bytes:
        """``{"commands": [...]}``: each command's :meth:`Command.describe`, and
        whether it streams its output."""
        prepare(request, 200)
        return encode({"commands": [dict(c.describe(), streams=c.streams)
                                    for c in served(self.door)]})

    def openapi(self, request: Any, login: Login) -> bytes:
        if self._openapi is None:
            from cmdserver.doors.http.openapi import openapi_document

            self._openapi = encode(openapi_document(self.door))
        prepare(request, 200)
        return self._openapi


def _error(message: str, lines: ListSink | None) -> dict[str, Any]:
    """An error answer, with the lines the command wrote before it failed."""
    if lines is not None and lines.lines:
        return {"error": message, "output": lines.lines}
    return {"error": message}


__all__ = ["CommandAPI", "answer", "served"]
