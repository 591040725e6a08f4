"""The command registry every door shares.

Imported lazily: ``cmdserver upload`` (the client) imports
:mod:`cmdserver.commands.upload.key` and :mod:`cmdserver.commands.upload.mac`,
which need only the standard library, and must not pay for Twisted and every
command on its way in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmdserver.commands.base import Command, Context, ListSink, NullSink, Registry
    from cmdserver.commands.lastlog import LogSource

__all__ = ["Command", "Context", "ListSink", "NullSink", "Registry", "default_registry"]

_FROM_BASE = frozenset({"Command", "Context", "ListSink", "NullSink", "Registry"})


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        from cmdserver.commands import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_registry(log_source: LogSource) -> Registry:
    """Every built-in command, each declared once."""
    from cmdserver.commands.account import Whoami
    from cmdserver.commands.base import Registry
    from cmdserver.commands.basic import Exit, Help, Ping, StatsCommand
    from cmdserver.commands.files import ComputeHash, ListDir
    from cmdserver.commands.lastlog import LastLog
    from cmdserver.commands.portscan.command import PortScan

    registry = Registry([Help(), Ping(), StatsCommand(), ListDir(), ComputeHash(),
                         LastLog(log_source), PortScan()])
    registry.add(Exit(), "quit")
    registry.add(Whoami())  # `login` needs the portal: tap.makeService adds it
    return registry
