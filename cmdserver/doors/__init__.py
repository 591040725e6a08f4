"""The front doors: each turns one endpoint string into a factory on the shared core.

Every door has a builder with the same signature, ``build(env, endpoint) ->
Door``: ``env`` (:class:`DoorEnv`) is everything a door may need from the
daemon (the service with its core and portal, the parsed options, the
credentials, the upload engine), and the :class:`Door` it returns is what
:meth:`CmdServerService.add_door` serves under the shared connection limits.
``tap.makeService`` loops over :data:`BUILDERS`; a builder's module is only
imported when its door is switched on (conch is not imported without SSH).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DoorEnv:
    """What the daemon hands every door's builder."""

    service: Any  # CmdServerService: core, portal, realm
    options: Any  # tap.Options, parsed and checked
    credentials: Any  # auth.credentials.Credentials
    uploads: Any  # commands.upload.engine.Uploads
    reactor: Any

    @property
    def core(self) -> Any:
        return self.service.core


@dataclass(frozen=True)
class Door:
    """A door ready to listen: its factory, the words it says when a connection is
    refused (for the limits or a login penalty: bytes, or a function of the
    reason giving them), and its endpoint if the builder made it itself."""

    factory: Any
    refusal: Any = None
    endpoint: Any = None


# door name -> "module:function" of its builder, in the order doors are started.
BUILDERS: dict[str, str] = {
    "line": "cmdserver.doors.line.protocol:build",
    "ssh": "cmdserver.doors.ssh.door:build",
    "pb": "cmdserver.doors.pb.door:build",
    "http": "cmdserver.doors.http.door:build",
}


def builder(door: str) -> Callable[[DoorEnv, str], Door]:
    """The builder of ``door``, imported now."""
    module, _, name = BUILDERS[door].partition(":")
    built: Callable[[DoorEnv, str], Door] = getattr(importlib.import_module(module), name)
    return built
