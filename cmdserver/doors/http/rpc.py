"""XML-RPC on ``/RPC2``: every command the door serves is a method, built from the registry.

``twisted.web.xmlrpc.XMLRPC`` with a ``lookupProcedure`` that finds the
command (no method of our own per command), and Twisted's introspection:
``system.listMethods`` and ``system.methodHelp`` (the command's usage, summary
and parameters; ``system.methodSignature`` answers ``""``: a command's value
has no one XML-RPC type).  Positional parameters map
onto the command's declared parameters in order, as on PB; a struct as the
only parameter passes them by name.  Each call runs through the core as the
JSON API's do, after the same login; a failure is a fault whose code is the
HTTP status the JSON API gives for it (400 usage, 403 refused, 404 unknown
method, 422 failed, 504 deadline, 500 internal), and whose string is the
message the other doors give.  A client that goes away cancels its call.
"""

from __future__ import annotations

from typing import Any

from twisted.python.failure import Failure
from twisted.web import xmlrpc as web_xmlrpc

from cmdserver.commands.base import Command
from cmdserver.core import NOT_FOUND_TEXT, is_deferred
from cmdserver.doors.http import DOOR
from cmdserver.doors.http.api import bad_arguments
from cmdserver.doors.http.door import COMMON_HEADERS, HTTPDoor
from cmdserver.doors.http.errors import (
    BAD_REQUEST,
    NOT_FOUND,
    UNSUPPORTED_MEDIA_TYPE,
    HTTPError,
    failure_answer,
)
from cmdserver.doors.http.login import Login
from cmdserver.errors import CommandError

XML_TYPES = (b"text/xml", b"application/xml")


def rpc_usage(command: Command) -> str:
    words = [p.name if p.required else f"{p.name}={p.default!r}" for p in command.params]
    return f"usage: {command.name}({', '.join(words)})"


class Procedure:
    """One command as an XML-RPC method: called with the request and the positional
    parameters of the call."""

    withRequest = True

    def __init__(self, rpc: CommandRPC, command: Command) -> None:
        self.rpc = rpc
        self.command = command
        self.help = method_help(command)  # system.methodHelp

    def __call__(self, request: Any, *args: Any) -> Any:
        login: Login = request.rpc_login
        core, command = self.rpc.door.core, self.command
        names = [p.name for p in command.params]
        if len(args) == 1 and isinstance(args[0], dict):  # no parameter takes a struct
            named = dict(args[0])
        elif len(args) > len(names):
            raise fault(BAD_REQUEST, rpc_usage(command))
        else:
            named = dict(zip(names, args, strict=False))
        try:
            kwargs = core.bind(login.ctx, command, named) if (named or names) else {}
        except CommandError as e:
            error = bad_arguments(e)
            raise fault(error.status, error.message) from None
        result = core.invoke(login.ctx, command, kwargs)
        if is_deferred(result):
            request.notifyFinish().addErrback(lambda _: result.cancel())
            return result.addErrback(as_fault)
        if isinstance(result, Failure):
            return as_fault(result)
        return result


def method_help(command: Command) -> str:
    """``system.methodHelp``: the call's usage, the summary, a line per parameter."""
    lines = [rpc_usage(command), command.summary]
    for param in command.params:
        detail = param.help
        values = param.type.describe()
        if values:
            detail = f"{detail} ({values})" if detail else values
        lines.append(f"  {param.name}: {detail}".rstrip(": "))
    return "\n".join(lines)


def fault(code: int, message: str) -> web_xmlrpc.Fault:
    return web_xmlrpc.Fault(code, message)


def as_fault(failure: Failure) -> web_xmlrpc.Fault:
    """A command's failure as the fault the client gets (the core logged any bug)."""
    status, message = failure_answer(failure)
    return fault(status, message)


class CommandRPC(web_xmlrpc.XMLRPC):
    """``/RPC2``: the registry's commands as XML-RPC methods."""

    NOT_FOUND = NOT_FOUND
    FAILURE = BAD_REQUEST  # Twisted's code for a call it cannot read

    def __init__(self, door: HTTPDoor) -> None:
        super().__init__(allowNone=True)
        self.door = door
        self.procedures: dict[str, Procedure] = {}
        self._calling: Login | None = None  # the login of the call being dispatched
        web_xmlrpc.addIntrospection(self)

    def call(self, request: Any, login: Login) -> int:
        """Handle one call once its sender is logged in."""
        kind = request.requestHeaders.getRawHeaders(b"content-type")
        if not kind or kind[0].split(b";")[0].strip().lower() not in XML_TYPES:
            raise HTTPError(UNSUPPORTED_MEDIA_TYPE,
                            "an XML-RPC call is XML (Content-Type: text/xml)")
        for name, value in COMMON_HEADERS:
            request.setHeader(name, value)
        request.rpc_login = login
        self._calling = login
        try:
            return self.render_POST(request)
        finally:
            self._calling = None

    def lookupProcedure(self, procedurePath: str) -> Any:
        if procedurePath.startswith("system."):
            return super().lookupProcedure(procedurePath)
        procedure = self.procedure(procedurePath)
        if procedure is None:
            if self._calling is not None:  # audited and counted as on the other doors
                try:
                    self.door.core.lookup(self._calling.ctx, procedurePath[:64])
                except CommandError:
                    pass
            raise web_xmlrpc.NoSuchFunction(NOT_FOUND, NOT_FOUND_TEXT)
        return procedure

    def procedure(self, name: str) -> Procedure | None:
        command = self.door.core.registry.get(name)
        if command is None or not command.serves(DOOR) or command.reads_input:
            return None
        procedure = self.procedures.get(name)
        if procedure is None or procedure.command is not command:
            procedure = self.procedures[name] = Procedure(self, command)
        return procedure

    def listProcedures(self) -> list[str]:
        from cmdserver.doors.http.api import served

        return [c.name for c in served(self.door)]

    def _ebRender(self, failure: Failure) -> Any:
        if isinstance(failure.value, web_xmlrpc.Fault):
            return failure.value
        return as_fault(failure)

