"""What commands may touch: the file jail and the scan targets and limits."""

from __future__ import annotations

import ipaddress
import os
import resource
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING

from cmdserver.jail import Jail

if TYPE_CHECKING:
    from cmdserver.commands.portscan.scanner import Scan

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_SCAN_ALLOW = ("127.0.0.0/8", "::1/128")


class Policy:
    """Limits shared by every command and every door.

    ``roots`` are the directories file commands may touch (their real paths);
    ``jail`` (:class:`~cmdserver.jail.Jail`) is the one way to touch them: every
    door and command opens, lists, creates and changes files through it.
    """

    def __init__(self, roots: Sequence[str], scan: ScanPolicy | None = None) -> None:
        self.jail = Jail(roots)
        self.roots = self.jail.roots
        self.scan = scan if scan is not None else ScanPolicy()

    def jail_path(self, path: str) -> str | None:
        """``path`` as the jail names it, for the audit log: relative to the first
        root (``.`` for the root itself), ``rootN:…`` inside the Nth root (N ≥ 2),
        None outside every root.

        Only the text is looked at (``..`` is folded, symlinks are not followed):
        no disk access, and the name the client used is the one shown."""
        if "\0" in path:
            return None
        full = os.path.normpath(os.path.join(self.roots[0], path))
        for n, root in enumerate(self.roots, 1):
            if full == root:
                relative = "."
            elif full.startswith(prefix := root.rstrip(os.sep) + os.sep):
                relative = full[len(prefix):]
            else:
                continue
            return relative if n == 1 else f"root{n}:{relative}"
        return None


class ScanPolicy:
    """What ``portscan`` may do: which targets, how many ports, how many connects at once.

    It also holds the state every scan shares: the global :class:`ConnectBudget`
    (connects in flight over all scans) and the connections running a scan.
    """

    DEFAULT_CONCURRENCY = 1024

    def __init__(self, allow: Sequence[str] = DEFAULT_SCAN_ALLOW, max_ports: int = 65535,
                 concurrency: int = DEFAULT_CONCURRENCY, timeout: float = 1.0,
                 max_in_flight: int = 4096) -> None:
        if max_ports < 1 or concurrency < 1 or max_in_flight < 1 or not timeout > 0:
            raise ValueError("scan limits must be positive")
        self.networks = tuple(ipaddress.ip_network(cidr) for cidr in allow)
        self.max_ports = max_ports
        self.concurrency = concurrency
        self.timeout = timeout
        self.budget = ConnectBudget(max_in_flight)
        self._running: set[Hashable] = set()

    def allows(self, address: IPAddress) -> bool:
        """True if ``address`` lies in one of the allowed networks."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:a.b.c.d reaches a.b.c.d
        return any(address in network for network in self.networks)

    def begin(self, connection: Hashable) -> bool:
        """Mark a scan as running for ``connection``; False if one already is."""
        if connection in self._running:
            return False
        self._running.add(connection)
        return True

    def end(self, connection: Hashable) -> None:
        self._running.discard(connection)


def default_max_in_flight(ceiling: int = 4096) -> int:
    """The default global cap on scan connects: at most half the open-files limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return ceiling
    return max(1, min(ceiling, soft // 2))


class ConnectBudget:
    """A cap on connects in flight across every scan, so scans cannot run out of fds.

    Only connects that outlive the call that started them count (loopback
    connects settle at once).  Scans blocked by the cap wait here and are woken
    when a slot frees.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the connect budget needs at least one slot")
        self.limit = limit
        self.in_flight = 0
        self.probed = 0  # ports probed by every scan since start (counted for /metrics)
        self._waiting: dict[Scan, None] = {}

    def acquire(self) -> None:
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1
        if self._waiting:
            waiting, self._waiting = self._waiting, {}
            for scan in waiting:
                scan.wake()

    def wait(self, scan: Scan) -> None:
        self._waiting[scan] = None

    def forget(self, scan: Scan) -> None:
        self._waiting.pop(scan, None)
