"""The command registry every door shares.

Nothing is imported here until :func:`default_registry` is called, so that a
client (``cmdserver upload`` needs only :mod:`cmdserver.commands.upload.key`)
does not load every command and the server's machinery with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cmdserver.commands.base import Registry
    from cmdserver.commands.lastlog import LogSource

__all__ = ["default_registry"]


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
