"""The command registry every door shares."""

from cmdserver.commands.account import Whoami
from cmdserver.commands.base import Command, Context, ListSink, NullSink, Registry
from cmdserver.commands.basic import Exit, Help, Ping, StatsCommand
from cmdserver.commands.files import ComputeHash, ListDir
from cmdserver.commands.lastlog import LastLog, LogSource
from cmdserver.commands.portscan.command import PortScan

__all__ = ["Command", "Context", "ListSink", "NullSink", "Registry", "default_registry"]


def default_registry(log_source: LogSource) -> Registry:
    """Every built-in command, each declared once."""
    registry = Registry([Help(), Ping(), StatsCommand(), ListDir(), ComputeHash(),
                         LastLog(log_source), PortScan()])
    registry.add(Exit(), "quit")
    registry.add(Whoami())  # `login` needs the portal: tap.makeService adds it
    return registry
