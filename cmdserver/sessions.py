"""Sessions: one per connection, on every door, opened and closed in the core.

A door opens a session when a connection starts (:meth:`CommandCore.open_session`),
reports its logins (:meth:`CommandCore.login`) and closes it when the
connection ends (:meth:`CommandCore.close_session`); the core audits each of
these, and every command and file operation of the connection carries the
session's id (``Context.session_id``) into its audit record.  What a session
is on each door: a line connection (TCP, TLS or UNIX socket); an SSH
connection, whose channels (exec, shell, SFTP) all share it; a PB connection.

An id is the daemon run's 8 random hex digits followed by a counter (4 hex
digits, more past 65535 sessions): unique within a run, and two runs share a
prefix once in about four billion starts.  The records of one run can be
picked out by the prefix.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from cmdserver.auth.portal import ANONYMOUS


@dataclass(eq=False, slots=True)
class Session:
    """One connection, from its start to its end, as the audit log sees it."""

    id: str
    door: str
    peer: str
    started: float  # the core's clock (reactor.seconds)
    user: str = ANONYMOUS  # who logged in on it (else no one did)
    method: str | None = None  # how: password, key, certificate
    commands: int = 0  # commands run (not those refused before they ran)
    file_operations: int = 0  # SFTP operations audited
    login_failures: int = 0
    running: int = 0  # commands still running (the core's per-connection limit)
    closed: bool = False
    token: str | None = None  # the id of the API token it logged in with
    transport: Any = None  # the connection's, which the core closes to end it (revocation)


class SessionIds:
    """Makes the session ids of one daemon run (see the module's description)."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else secrets.token_hex(4)
        self.count = 0

    def __call__(self) -> str:
        self.count += 1
        return f"{self.prefix}{self.count:04x}"
