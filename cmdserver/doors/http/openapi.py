"""``GET /v1/openapi.json``: the JSON API as an OpenAPI 3.1 document, from the registry.

One path per command the door serves, its request body the JSON Schema of its
declared parameters (each parameter's ``Param.describe()["schema"]``, with its
help, default and whether it is required); the files, metrics and health
endpoints; Bearer and Basic security schemes.  A client generator (for any
language) gets a typed function per command.
"""

from __future__ import annotations

from typing import Any

from cmdserver import __version__
from cmdserver.commands.base import Command
from cmdserver.commands.upload.mac import ALGORITHMS
from cmdserver.doors.http.door import HTTPDoor

ERROR = {"$ref": "#/components/schemas/Error"}
ERRORS = {
    "400": "Bad arguments (usage), or a body that is not the JSON described.",
    "401": "No credentials, or wrong ones.",
    "403": "Refused by policy: outside the allowed roots, a scan target not allowed.",
    "404": "No such command on this door.",
    "409": "A scan already runs on this connection.",
    "413": "The body is over 1 MiB.",
    "415": "The body is not JSON.",
    "421": "The Host header names none of this server's names.",
    "422": "The command refused or failed (no such file, …).",
    "429": "Too many failed logins on this connection.",
    "500": "A bug; the traceback is in the server's log.",
    "504": "The command ran past its deadline and was stopped.",
}


def _responses(codes: dict[str, str], ok: dict[str, Any]) -> dict[str, Any]:
    responses: dict[str, Any] = dict(ok)
    for code, text in codes.items():
        responses[code] = {"description": text,
                           "content": {"application/json": {"schema": ERROR}}}
    return responses


def param_schema(command: Command) -> dict[str, Any]:
    """The JSON Schema of a command's named arguments."""
    properties: dict[str, Any] = {}
    required = []
    for param in command.params:
        info = param.describe()
        schema = dict(info["schema"])
        if param.help:
            schema["description"] = param.help
        if not param.required and param.default is not None:
            schema["default"] = param.default
        properties[param.name] = schema
        if param.required:
            required.append(param.name)
    whole: dict[str, Any] = {"type": "object", "properties": properties,
                             "additionalProperties": False}
    if required:
        whole["required"] = required
    return whole


def command_path(command: Command) -> dict[str, Any]:
    name = command.name
    body = {
        "type": "object",
        "properties": {
            "args": param_schema(command),
            "argv": {"type": "array", "items": {"type": "string"},
                     "description": "the words as typed on the line door, instead of args"},
        },
        "additionalProperties": False,
    }
    ok = {"200": {
        "description": "The command's value and the lines it wrote.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Result"}},
            "application/x-ndjson": {"schema": {"$ref": "#/components/schemas/StreamItem"}},
        }}}
    return {"post": {
        "operationId": name,
        "summary": command.summary,
        "description": f"Usage on the line door: `{command.usage}`."
                       + (" Streams its output (`Accept: application/x-ndjson`)."
                          if command.streams else ""),
        "tags": ["commands"],
        "requestBody": {"required": False,
                        "content": {"application/json": {"schema": body}}},
        "responses": _responses(ERRORS, ok),
    }}


def openapi_document(door: HTTPDoor) -> dict[str, Any]:
    from cmdserver.doors.http.api import served

    # The MAC algorithms this server takes (--upload-macs), not every one it knows.
    macs = door.uploads.settings.macs if door.uploads is not None else ALGORITHMS
    paths: dict[str, Any] = {}
    for command in served(door):
        paths[f"/v1/commands/{command.name}"] = command_path(command)
    paths["/v1/commands"] = {"get": {
        "operationId": "describeCommands", "summary": "Describe every command served here.",
        "tags": ["meta"],
        "responses": _responses({"401": ERRORS["401"]}, {"200": {
            "description": "Each command's name, summary, usage and parameters.",
            "content": {"application/json": {"schema": {"type": "object"}}}}})}}
    path_param = [{"name": "path", "in": "path", "required": True,
                   "description": "a path inside the allowed roots; slashes as they are",
                   "schema": {"type": "string"}}]
    paths["/v1/files/{path}"] = {
        "get": {
            "operationId": "downloadFile", "summary": "Download a file (Range works).",
            "tags": ["files"], "parameters": path_param,
            "responses": _responses(
                {k: v for k, v in ERRORS.items() if k in ("401", "403", "404", "422")},
                {"200": {"description": "The file.",
                         "content": {"application/octet-stream": {}}},
                 "206": {"description": "The range asked for.",
                         "content": {"application/octet-stream": {}}},
                 "416": {"description": "The range lies outside the file."}})},
        "put": {
            "operationId": "uploadFile",
            "summary": "Upload a file; it appears only if its MAC matches.",
            "tags": ["files"],
            "parameters": [*path_param, {
                "name": "X-Cmdserver-HMAC", "in": "header", "required": True,
                "description": "hex MAC of the content (HMAC-SHA256 unless "
                               "X-Cmdserver-MAC-Algorithm says otherwise) under the "
                               "user's or the server's upload key",
                "schema": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}}, {
                "name": "X-Cmdserver-MAC-Algorithm", "in": "header", "required": False,
                "description": "the MAC: hmac-sha256 (the default) or blake2b (keyed "
                               "BLAKE2b, 32 bytes); refused, never replaced, where the "
                               "server does not take it",
                "schema": {"type": "string", "enum": list(macs)}}],
            "requestBody": {"required": True,
                            "content": {"application/octet-stream": {}}},
            "responses": _responses(
                {k: v for k, v in ERRORS.items() if k in ("400", "401", "403", "422")}
                | {"409": "The target exists (without --overwrite).",
                   "411": "No Content-Length.",
                   "413": "Over --max-upload."},
                {"201": {"description": "The file is in place.",
                         "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/Result"}}}}})},
    }
    paths["/metrics"] = {"get": {
        "operationId": "metrics", "summary": "Prometheus metrics.", "tags": ["meta"],
        "responses": {"200": {"description": "The Prometheus exposition format.",
                              "content": {"text/plain": {}}}}}}
    paths["/healthz"] = {"get": {
        "operationId": "health", "summary": "200 while every door listens, else 503.",
        "tags": ["meta"], "security": [],
        "responses": {"200": {"description": "Every door listens."},
                      "503": {"description": "A door does not listen."}}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "cmdserver", "version": __version__,
                 "description": "Diagnostic commands of a cmdserver daemon, one path a "
                                "command (docs/protocol.md, \"The HTTP door\")."},
        "paths": paths,
        "security": [{"bearer": []}, {"basic": []}],
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "an API token (cmdserver token add USER)"},
                "basic": {"type": "http", "scheme": "basic"},
            },
            "schemas": {
                "Result": {"type": "object", "required": ["result"],
                           "properties": {"result": {"description": "the command's value"},
                                          "output": {"type": "array",
                                                     "items": {"type": "string"}}}},
                "Error": {"type": "object", "required": ["error"],
                          "properties": {"error": {"type": "string"},
                                         "output": {"type": "array",
                                                    "items": {"type": "string"}}}},
                "StreamItem": {"type": "object", "properties": {
                    "line": {"type": "string"}, "result": {},
                    "error": {"type": "string"}, "status": {"type": "integer"}}},
            },
        },
    }
