"""The SSH door (twisted.conch): shell, exec and SFTP on the shared command core.

Logins go through the shared portal (password and public key checkers), by
way of the core's login gate (penalties per address, one check at a time per
connection, the login deadline); the realm builds an :class:`SSHAvatar` per
login.  Each connection is one session
in the core, opened when the connection is made and closed when it is lost;
its channels share it, and each login attempt is reported to the core
(:meth:`CommandCore.login`), which audits it.  Everything a diagnostic server
does not need is refused and logged: port forwarding (global ``tcpip-forward``
and ``direct-tcpip`` channels), agent and X11 forwarding, most environment
variables and every subsystem but ``sftp``.  Limits: the shared connection
limits (through :meth:`CmdServerService.add_door`), three authentication
attempts (refused ones count), the gate's login deadline and the idle timeout.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, cast

from twisted.conch.error import IgnoreAuthentication
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh import _kex, common, connection, factory, transport, userauth
from twisted.conch.ssh.keys import Key
from twisted.internet import protocol
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import ISystemHandle, ITransport
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from cmdserver.auth.gate import refused_because
from cmdserver.auth.portal import Account
from cmdserver.core import CommandCore
from cmdserver.doors.limits import format_peer
from cmdserver.doors.ssh import logfilter
from cmdserver.doors.ssh.avatar import (
    DOOR,
    SSHAvatar,
    SSHSettings,
)
from cmdserver.doors.ssh.keys import load_host_keys, log_fingerprints
from cmdserver.sessions import Session
from cmdserver.text import escape

log = Logger()

MAX_CHANNELS = 10  # open session channels per connection, like OpenSSH's MaxSessions
# Liveness probes a client library sends on its own (libssh2, so parallel-ssh):
# answered "no", as OpenSSH answers them, without a log line each time.
KEEPALIVES = frozenset({b"keepalive@libssh2.org"})
# SSH's names of the login methods, as the audit log names them.
METHODS = {b"password": "password", b"publickey": "key"}


class CmdServerConnection(connection.SSHConnection):
    """``ssh-connection`` that opens only session channels, and only a few."""

    transport: CmdServerTransport  # set by the transport before the service starts

    def ssh_CHANNEL_OPEN(self, packet: bytes) -> None:
        channel_type, rest = common.getNS(packet)
        sender = struct.unpack(">L", rest[:4])[0]
        avatar = self.transport.avatar
        reason = None
        if channel_type != b"session":
            avatar.refused("channel", channel_type)
            reason = "only session channels are allowed"
        elif len(self.channels) >= MAX_CHANNELS:
            avatar.refused("channel", f"session: {MAX_CHANNELS} are open already")
            reason = "too many channels"
        if reason is None:
            super().ssh_CHANNEL_OPEN(packet)
            return
        self.transport.sendPacket(
            connection.MSG_CHANNEL_OPEN_FAILURE,
            struct.pack(">2L", sender, connection.OPEN_ADMINISTRATIVELY_PROHIBITED)
            + common.NS(reason.encode()) + common.NS(b""))

    def gotGlobalRequest(self, requestType: bytes, data: bytes) -> Any:
        if requestType in KEEPALIVES:
            return 0
        return super().gotGlobalRequest(requestType, data)

    def adjustWindow(self, channel: Any, bytesToAdd: int) -> None:
        # A paused channel keeps its window closed: the client stops sending until
        # the command that reads stdin catches up (RefusingSSHSession.resume_input).
        if getattr(channel, "input_paused", False):
            return
        super().adjustWindow(channel, bytesToAdd)


class GatedPortal:
    """The portal as one connection's userauth sees it: every login goes through
    the core's login gate, for that connection's session."""

    def __init__(self, gate: Any, session: Session, portal: Any) -> None:
        self.gate = gate
        self.session = session
        self.portal = portal

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Any:
        return self.gate.login(self.session, self.portal, credentials, mind, *interfaces)

    def listCredentialsInterfaces(self) -> list[Any]:
        return list(self.portal.listCredentialsInterfaces())


class CmdServerUserAuth(userauth.SSHUserAuthServer):
    """``ssh-userauth`` with few attempts, through the login gate, on the door's clock.

    A client may request ``ssh-userauth`` again, which makes conch start a new
    service; the failure count lives on the transport so that this does not
    reset it.  The login deadline is the gate's, set when the connection is
    made, so a client that stalls the key exchange is cut off as well; conch's
    own timer is not used.  A request that arrives while another is being
    checked, or from a penalised address, is refused at once (it counts as an
    attempt) without touching the state of the one being checked.
    """

    transport: CmdServerTransport  # set by the transport before the service starts

    def serviceStarted(self) -> None:
        settings: SSHSettings = self.transport.factory.settings
        self.clock = self.transport.factory.reactor
        # Conch disconnects when failures exceed this number.
        self.attemptsBeforeDisconnect = settings.max_auth_attempts - 1
        super().serviceStarted()
        t = self.transport
        self._cancelLoginTimeout.cancel()  # the gate's deadline runs from the connection
        # conch's serviceStopped cancels it again unless it is None (conch's own idiom).
        self._cancelLoginTimeout = None  # type: ignore[assignment]
        self.portal = GatedPortal(t.factory.core.gate, t.audit_session, self.portal)
        self.loginAttempts = t.auth_failures

    def ssh_USERAUTH_REQUEST(self, packet: bytes) -> Any:
        if self.loginAttempts > self.attemptsBeforeDisconnect:
            return None  # disconnected already: the rest of a pipelined burst is dropped
        user, _, method, _ = common.getNS(packet, 3)
        if method != b"none":  # "none" asks which methods there are
            t = self.transport
            why = t.factory.core.gate.refusal(t.audit_session)
            if why is not None:
                self._refuse(user, method, why)
                return None
        return super().ssh_USERAUTH_REQUEST(packet)

    def _refuse(self, user: bytes, method: bytes, why: str) -> None:
        """Answer a request the gate refuses, as a failed attempt, without checking it."""
        t = self.transport
        t.factory.core.login(t.audit_session, user, _method(method), "refused", why)
        self.loginAttempts += 1
        t.auth_failures = self.loginAttempts
        if self.loginAttempts > self.attemptsBeforeDisconnect:
            t.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
                             b"too many bad auths")
            return
        t.sendPacket(userauth.MSG_USERAUTH_FAILURE,
                     common.NS(b",".join(self.supportedAuthentications)) + b"\x00")

    def _ebPassword(self, f: Failure) -> Failure:
        return f  # the gate answers a wrong password once the penalty it caused is over

    def _cbFinishedAuth(self, result: Any) -> None:
        _, avatar, _ = result
        t = self.transport
        avatar.session_id = t.audit_session.id
        t.factory.core.login(t.audit_session, self.user, _method(self.method), "ok")
        super()._cbFinishedAuth(result)

    def _ebBadAuth(self, reason: Any) -> None:
        if reason.check(CancelledError):  # the connection closed while it was checked
            return
        # "none" is a client asking which methods there are, not a login attempt;
        # IgnoreAuthentication answers a key offered without a signature.
        if self.method != b"none" and not reason.check(IgnoreAuthentication):
            t = self.transport
            refused = refused_because(reason)
            t.factory.core.login(t.audit_session, self.user, _method(self.method),
                                 "failed" if refused is None else "refused", refused)
        super()._ebBadAuth(reason)
        self.transport.auth_failures = self.loginAttempts


class CmdServerTransport(transport.SSHServerTransport, TimeoutMixin):
    """The server transport with TCP_NODELAY and the door's idle timeout."""

    factory: CmdServerSSHFactory
    transport: ITransport  # set in makeConnection, before any other callback
    avatar: SSHAvatar  # set by userauth on a successful login
    audit_session: Session  # the connection's session in the core, from connectionMade
    auth_failures = 0  # failed authentication attempts on this connection

    @property
    def peer(self) -> str:
        return format_peer(self.transport.getPeer())

    def callLater(self, period: float, func: Any) -> Any:  # TimeoutMixin's clock
        return self.factory.reactor.callLater(period, func)

    _quickack: Any = None

    def connectionMade(self) -> None:
        _set_nodelay(self.transport)
        try:
            self._quickack = cast(ISystemHandle, self.transport).getHandle()
        except AttributeError:
            pass
        self.audit_session = self.factory.core.open_session(DOOR, self.peer)
        super().connectionMade()
        self.setTimeout(self.factory.settings.idle_timeout or None)
        self.factory.core.gate.login_deadline(self.audit_session, self._grace_expired)

    def _grace_expired(self) -> None:
        """No login within the gate's grace time (a stalled key exchange included)."""
        log.info("ssh: {peer} did not authenticate within {grace:g} s", peer=self.peer,
                 grace=self.factory.core.gate.settings.login_grace)
        self.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE,
                            b"you took too long")

    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        if self._quickack is not None:
            try:
                self._quickack.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                self._quickack = None
        super().dataReceived(data)

    def timeoutConnection(self) -> None:
        avatar = getattr(self, "avatar", None)
        if avatar is not None and avatar.busy:  # a long command is not idleness
            self.setTimeout(self.timeOut)  # (resetTimeout does nothing once it fired)
            return
        seconds = self.factory.settings.idle_timeout
        log.info("ssh: {peer} idle for {seconds:g} s, disconnecting", peer=self.peer,
                 seconds=seconds)
        self.sendDisconnect(transport.DISCONNECT_BY_APPLICATION,
                            f"Timeout: idle for {seconds:g} s".encode())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.setTimeout(None)
        super().connectionLost(reason)
        session = getattr(self, "audit_session", None)
        if session is not None:
            self.factory.core.close_session(session)


def _set_nodelay(tcp: Any) -> None:
    """Send small packets at once: each SSH round trip otherwise waits on Nagle."""
    try:
        tcp.setTcpNoDelay(True)
        return
    except (AttributeError, OSError):
        pass
    try:  # a wrapping transport without the method still has the socket
        tcp.getHandle().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass  # a UNIX socket: nothing to do


class CmdServerSSHFactory(factory.SSHFactory):
    """Builds SSH server transports sharing the core, host keys, portal and settings."""

    protocol = CmdServerTransport
    noisy = False
    services = {
        b"ssh-userauth": CmdServerUserAuth,
        b"ssh-connection": CmdServerConnection,
    }

    def __init__(self, core: CommandCore, portal: Any, host_keys: dict[bytes, Key],
                 settings: SSHSettings) -> None:
        self.core = core
        self.portal = portal
        self.settings = settings
        self.reactor = core.reactor
        self.privateKeys = host_keys
        self.publicKeys = {kind: key.public() for kind, key in host_keys.items()}
        self.primes = None  # fixed groups and curve25519 only
        self._host_key_algorithms = [
            algorithm for key in host_keys.values()
            for algorithm in key.supportedSignatureAlgorithms()]
        self._key_exchanges = [
            kex for kex in transport.SSHServerTransport.supportedKeyExchanges
            if not _kex.isDynamicPrimesGroup(kex)]

    def getPrimes(self) -> None:
        return None

    def startFactory(self) -> None:
        super().startFactory()
        logfilter.install()  # conch's per-packet chatter stays out of the main log

    def stopFactory(self) -> None:
        logfilter.uninstall()
        super().stopFactory()

    def buildProtocol(self, addr: Any) -> CmdServerTransport:
        # SSHFactory.buildProtocol logs on every connection that it drops the
        # group-exchange methods (no moduli file); do the same, once, quietly.
        t = protocol.Factory.buildProtocol(self, addr)
        t = cast(CmdServerTransport, t)  # built from self.protocol
        t.supportedPublicKeys = self._host_key_algorithms
        t.supportedKeyExchanges = self._key_exchanges
        return t


def _method(name: bytes) -> str:
    """The audit log's name of an SSH login method."""
    return METHODS.get(name) or escape(name, 64)


def ssh_factory(service: Any, data_dir: str, settings: SSHSettings) -> CmdServerSSHFactory:
    """Register the SSH avatar with the service's realm and build the door's factory."""
    core = service.core

    def avatar_factory(account: Account, mind: Any) -> tuple[SSHAvatar, Any]:
        avatar = SSHAvatar(core, account, settings)
        return avatar, avatar.logout

    service.realm.register(IConchUser, avatar_factory)
    keys = load_host_keys(data_dir)
    log_fingerprints(keys)
    return CmdServerSSHFactory(core, service.portal, keys, settings)


def build(env: Any, endpoint: str) -> Any:
    """The SSH door (shell, exec, SFTP) on ``endpoint``."""
    from cmdserver.doors import Door

    options = env.options
    settings = SSHSettings(idle_timeout=options["idle-timeout"], max_line=options["max-line"],
                           temp_run_id=env.uploads.run_id, max_upload=options["max-upload"],
                           sftp_max_handles=options["sftp-max-handles"])
    return Door(ssh_factory(env.service, options["data-dir"], settings))


def add_ssh_door(service: Any, endpoint: str, data_dir: str, settings: SSHSettings) -> Any:
    """Serve SSH on ``endpoint`` under the service's shared connection limits."""
    return service.add_door(DOOR, endpoint, ssh_factory(service, data_dir, settings))
