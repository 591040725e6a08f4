"""The one service: the command core, the connection limits and every door."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from cmdserver.audit import AuditFile, audit_publisher
from cmdserver.auth.portal import Realm, build_portal
from cmdserver.core import CommandCore
from cmdserver.doors.limits import ConnectionLimits, LimitedFactory, Refusal

log = Logger()

SHUTDOWN = "the server is shutting down"


class DoorService(Service):
    """Listens on one endpoint string for one door; ``listening`` fires with the port."""

    def __init__(self, door: str, description: str, factory: LimitedFactory,
                 reactor: Any, endpoint: Any = None) -> None:
        self.endpoint = endpoint  # built by the caller when a string cannot say it all
        self.door = door
        self.description = description
        self.factory = factory
        self.reactor = reactor
        self.port: IListeningPort | None = None
        self.listening: Deferred = Deferred()
        self._listen_called = False
        self.setName(f"{door} {description}")

    def privilegedStartService(self) -> None:
        # Listen before twistd drops privileges (ports below 1024), fail loudly if we cannot.
        self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        self._listen()
        super().startService()

    def _listen(self) -> None:
        if self._listen_called:
            return
        self._listen_called = True
        endpoint = self.endpoint or serverFromString(self.reactor, self.description)
        endpoint.listen(self.factory).addCallbacks(self._listening, self._failed)

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        address: Any = port.getHost()  # an IPv4/IPv6 (host, port) or a UNIX (name) address
        where = getattr(address, "name", None) or f"{address.host}:{address.port}"
        log.info("{door} door listening on {where}", door=self.door, where=where)
        self.listening.callback(port)

    def _failed(self, failure: Any) -> None:
        log.failure("{door} door cannot listen on {description}", failure,
                    door=self.door, description=self.description)
        self.listening.errback(failure)
        # A daemon that cannot open a door it was asked for must not run half-open.
        if self.reactor.running:
            self.reactor.stop()

    def stopService(self) -> Deferred | None:
        super().stopService()
        self._listen_called = False
        self.factory.disconnect_all()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


@dataclass
class Limits:
    max_clients: int = 100
    max_per_ip: int = 10


class CmdServerService(MultiService):
    """Owns the core, the shared connection limits, the audit log and the doors."""

    def __init__(self, core: CommandCore, limits: Limits, audit_log: str | None = None,
                 portal: Portal | None = None) -> None:
        super().__init__()
        self.core = core
        self.portal = portal or build_portal(Realm())
        # A portal given here is built on a cmdserver Realm (build_portal).
        self.realm = cast(Realm, self.portal.realm)
        self.limits = ConnectionLimits(limits.max_clients, limits.max_per_ip)
        self.audit = AuditFile(audit_log, core.reactor) if audit_log else None
        self.doors: list[DoorService] = []

    def add_door(self, door: str, description: str, factory: Factory[Any],
                 refusal: Refusal = None, endpoint: Any = None) -> DoorService:
        """Serve ``factory`` on the endpoint ``description``, under the shared limits
        and the login gate's refusal of penalised addresses.

        ``endpoint``, if given, is used instead of parsing ``description``.
        """
        limited = LimitedFactory(factory, self.limits, self.core.stats, door, refusal,
                                 self.core.gate)
        service = DoorService(door, description, limited, self.core.reactor, endpoint)
        service.setServiceParent(self)
        self.doors.append(service)
        return service

    def privilegedStartService(self) -> None:
        self._open_audit()
        super().privilegedStartService()

    def startService(self) -> None:
        self._open_audit()
        super().startService()

    def _open_audit(self) -> None:
        if self.audit is not None and not self.audit.is_open:
            self.audit.open()
            audit_publisher.addObserver(self.audit)

    def stopService(self) -> Deferred:
        d = super().stopService()

        def close_audit(result: Any) -> Any:
            self.core.close_sessions(SHUTDOWN)  # each session's end, before the log closes
            if self.audit is not None:
                audit_publisher.removeObserver(self.audit)
                self.audit.close()
            return result

        return d.addBoth(close_audit)
