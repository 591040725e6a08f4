"""The SSH avatar: one logged-in user, the settings of the door, and what it refuses.

Its own module, so that the session, shell and SFTP modules can name it
without importing the transport and factory of :mod:`cmdserver.doors.ssh.door`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.conch.avatar import ConchUser
from twisted.conch.interfaces import IConchUser, ISession
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python import components

from cmdserver import __version__
from cmdserver.auth.portal import Account
from cmdserver.commands.base import Context, OutputSink
from cmdserver.commands.upload.engine import DEFAULT_MAX_UPLOAD
from cmdserver.commands.upload.spool import new_run_id
from cmdserver.core import CommandCore
from cmdserver.doors.limits import format_peer
from cmdserver.doors.ssh.session import CommandSession, RefusingSSHSession
from cmdserver.doors.ssh.sftp import JailedFileTransferServer, JailedSFTPServer
from cmdserver.policy import Policy
from cmdserver.text import escape

log = Logger()

DOOR = "ssh"
MAX_AUTH_ATTEMPTS = 3
SFTP_MAX_HANDLES = 64
# Answered "no" without a log line: liveness probes and hints, not features we refuse.
QUIET_REQUESTS = frozenset({b"keepalive@openssh.com", b"no-more-sessions@openssh.com"})


@dataclass(frozen=True)
class SSHSettings:
    idle_timeout: float = 300
    max_line: int = 4096  # longest command line, as on the line door
    max_auth_attempts: int = MAX_AUTH_ATTEMPTS  # refused ones count (the login gate)
    greeting: str = f"cmdserver {__version__} ready; type 'help' for the commands."
    # The run token in SFTP temporary file names; the start-up sweep of the upload
    # engine spares its own run's files, so makeService passes the engine's token.
    temp_run_id: str = field(default_factory=new_run_id)
    max_upload: int = DEFAULT_MAX_UPLOAD  # --max-upload: the largest SFTP upload too
    sftp_max_handles: int = SFTP_MAX_HANDLES  # open files and directories per SFTP session


class SSHAvatar(ConchUser):
    """One logged-in SSH user: opens session channels, refuses the rest."""

    def __init__(self, core: CommandCore, account: Account, settings: SSHSettings) -> None:
        super().__init__()
        self.core = core
        self.account = account
        self.settings = settings
        self.policy = Policy(account.roots) if account.roots else core.policy
        self.busy = 0  # commands running on this connection: it is not idle
        self.session_id = ""  # the connection's session in the core, set at login
        self.channelLookup[b"session"] = RefusingSSHSession
        self.subsystemLookup[b"sftp"] = self._sftp

    @property
    def peer(self) -> str:
        try:
            return format_peer(self.conn.transport.transport.getPeer())
        except AttributeError:
            return "unknown"

    def context(self, out: OutputSink, session: Any) -> Context:
        """A command context for this user with the given output sink."""
        return Context(self.core, user=self.account.name, peer=self.peer, door=DOOR,
                       out=out, session=session, policy=self.policy,
                       session_id=self.session_id)

    def refused(self, what: str, detail: Any = None) -> None:
        """Log one refused request (forwarding, subsystem, env …); what the client
        asked for is escaped (:func:`cmdserver.text.escape`)."""
        if detail is not None:
            detail = escape(detail)
        log.info("ssh: refused {what} {detail} for {user}@{peer}", what=what, detail=detail,
                 user=self.account.name, peer=self.peer)

    def lookupSubsystem(self, subsystem: bytes, data: bytes) -> Protocol | None:
        if subsystem not in self.subsystemLookup:
            self.refused("subsystem", subsystem)
            return None
        return super().lookupSubsystem(subsystem, data)

    def _sftp(self, data: bytes, avatar: IConchUser) -> Protocol:
        log.info("ssh: sftp session for {user}@{peer}", user=self.account.name, peer=self.peer)
        return JailedFileTransferServer(JailedSFTPServer(self))

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> int:
        # tcpip-forward and anything else a client may ask for the whole connection.
        if requestType not in QUIET_REQUESTS:
            self.refused("global request", requestType)
        return 0

    def logout(self) -> None:
        log.info("ssh: {user}@{peer} logged out", user=self.account.name, peer=self.peer)


components.registerAdapter(CommandSession, SSHAvatar, ISession)
