"""``portscan HOST [PORTS]``: a TCP connect scan of an allowed host.

The command checks everything before a packet leaves: the port list, the
scan policy's limits, one scan per connection, and every address the host
name resolves to against the allowlist.  The scan itself is
:class:`cmdserver.commands.portscan.scanner.Scan`.  Scan limits are daemon-wide, so they are read
from the core's policy, never from a per-user one.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Hashable
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from zope.interface import implementer

from cmdserver.commands.base import Command, Context
from cmdserver.commands.params import Param, Text
from cmdserver.commands.portscan.portspec import PortSpecError, parse_ports
from cmdserver.commands.portscan.scanner import Scan, SocketFactory
from cmdserver.errors import CommandError, Conflict, Refused, UsageError
from cmdserver.policy import IPAddress, ScanPolicy

# Letters, digits, hyphens and dots (and "_", seen in internal names); 253 at most.
_HOST_NAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?", re.ASCII)


@implementer(IResolutionReceiver)
class _Lookup:
    """Collects the addresses an ``IHostnameResolver`` finds for a name, as a Deferred."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.addresses: list[IPAddress] = []
        self.deferred: Deferred = Deferred(lambda _: None)  # cancel: drop the answer

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        try:
            found = ipaddress.ip_address(address.host)
        except ValueError:
            return
        if found not in self.addresses:
            self.addresses.append(found)

    def resolutionComplete(self) -> None:
        if not self.deferred.called:
            self.deferred.callback(self.addresses)


def parse_host(host: str) -> IPAddress | str:
    """An IP literal (``[::1]`` brackets allowed) as an address, or a host name to resolve."""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return ipaddress.ip_address(literal)
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(host):
        raise CommandError(f"bad host {host!r} (an IP address or a host name)")
    return host


def resolve(resolver: IHostnameResolver, name: str) -> Deferred:
    """Resolve ``name`` to IPv4 and IPv6 addresses without blocking (cancellable)."""
    lookup = _Lookup(name)
    resolver.resolveHostName(lookup, name, 0, addressTypes=[IPv4Address, IPv6Address])
    return lookup.deferred


def connection_key(ctx: Context) -> Hashable:
    """What "one connection" means for the one-scan rule, whatever the door."""
    # A session is a connection object: hashed by identity.
    return cast(Hashable, ctx.session) if ctx.session is not None else (ctx.door, ctx.peer)


def checked_target(policy: ScanPolicy, host: str, addresses: list[IPAddress]) -> IPAddress:
    """The address to scan, once every address the host has passed the allowlist."""
    if not addresses:
        raise CommandError(f"cannot resolve host: {host}")
    if not all(policy.allows(a) for a in addresses):
        raise Refused("target not allowed")
    target = addresses[0]
    if isinstance(target, ipaddress.IPv6Address) and target.ipv4_mapped is not None:
        target = target.ipv4_mapped
    return target


def _scope_index(target: IPAddress) -> int:
    scope = getattr(target, "scope_id", None)
    if not scope:
        return 0
    if scope.isdigit():
        return int(scope)
    try:
        return socket.if_nametoindex(scope)
    except OSError:
        raise CommandError(f"no such network interface: {scope}") from None


class Ports(Text):
    """A port list as the text doors write it (``22,80,8000-8100``, ``all``); a
    program may pass a list of port numbers instead."""

    name = "ports"

    def from_value(self, param: Param, value: Any) -> Any:
        if isinstance(value, list):
            if not all(isinstance(p, int) and not isinstance(p, bool) for p in value):
                raise UsageError(f"{param.name} must be a string or a list of integers")
            value = ",".join(map(str, value))
        return super().from_value(param, value)

    def describe(self) -> str:
        return "22,80,8000-8100 | all"

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "string"},
                          {"type": "array", "items": {"type": "integer"}}]}


class PortScan(Command):
    name = "portscan"
    summary = "Find the open TCP ports of an allowed host (a connect scan)."
    usage = "portscan HOST [PORTS]   (PORTS: 22,80,8000-8100 | all; default 1-1024)"
    streams = True
    params = (
        Param("host", missing="Please provide a host.",
              help="an allowed IP address or host name"),
        Param("ports", Ports(), default=None, help="the ports to try (default 1-1024)"),
    )

    def __init__(self, resolver: IHostnameResolver | None = None,
                 socket_factory: SocketFactory = socket.socket) -> None:
        self.resolver = resolver
        self.socket_factory = socket_factory

    def run(self, ctx: Context, host: str, ports: str | None = None) -> Deferred:
        if not isinstance(host, str):
            raise CommandError("the host must be a string")
        policy = ctx.core.policy.scan
        portset = parse_ports(ports)
        if len(portset) > policy.max_ports:
            raise Refused(
                f"too many ports: {len(portset)} (the limit is {policy.max_ports})")
        target = parse_host(host)
        key = connection_key(ctx)
        if not policy.begin(key):
            raise Conflict("a scan is already running on this connection")
        try:
            if isinstance(target, str):
                d = resolve(self.resolver or ctx.reactor.nameResolver, target)
            else:
                d = defer.succeed([target])
        except BaseException:
            policy.end(key)
            raise

        def scan(addresses: list[IPAddress]) -> Deferred:
            address = checked_target(policy, host, addresses)
            family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
            started = ctx.reactor.seconds()
            scanner = Scan(
                ctx.reactor, family, str(address).split("%")[0], portset,
                concurrency=policy.concurrency, timeout=policy.timeout, budget=policy.budget,
                on_open=lambda port: ctx.out.line(f"Connected to port {port}"),
                socket_factory=self.socket_factory, scope_id=_scope_index(address))
            return scanner.start().addCallback(lambda found: {
                "host": host, "address": str(address), "ports": len(portset),
                "open": found, "elapsed": round(ctx.reactor.seconds() - started, 6)})

        def finished(result: Any) -> Any:
            policy.end(key)
            return result

        return d.addCallback(scan).addBoth(finished)

    def text(self, result: Any) -> list[str]:
        return [f"Scanned {result['ports']} ports on {result['host']} in "
                f"{result['elapsed']:.2f}s: {len(result['open'])} open"]

    def audit_args(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        args = dict(kwargs)
        try:
            args["count"] = len(parse_ports(kwargs.get("ports")))
        except PortSpecError:
            args["count"] = None
        return args

    def audit_result(self, result: Any) -> dict[str, Any]:
        return {"address": result["address"], "ports": result["ports"],
                "open": len(result["open"]), "elapsed": result["elapsed"]}
