"""The ``cmdserver`` console script (administration and client subcommands)."""

from __future__ import annotations

import argparse
import sys

from cmdserver import __version__
from cmdserver.cli import upload as upload_client


def build_parser(only_upload: bool = False) -> argparse.ArgumentParser:
    """The console script's parser; with ``only_upload``, just ``cmdserver upload``
    (the upload client then starts without importing Twisted: its run time counts)."""
    parser = argparse.ArgumentParser(
        prog="cmdserver",
        description="cmdserver administration. Start the daemon with: twistd -n cmdserver",
    )
    parser.add_argument("--version", action="version", version=f"cmdserver {__version__}")
    subparsers = parser.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
    if not only_upload:
        from cmdserver.cli.call import add_call_parser
        from cmdserver.cli.fleet import add_fleet_parser
        from cmdserver.cli.users import add_user_commands

        add_user_commands(subparsers)
        add_call_parser(subparsers)
        add_fleet_parser(subparsers)
    upload_client.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(only_upload=argv[:1] == ["upload"])
    args = parser.parse_args(argv)
    if args.subcommand is None:
        parser.print_help()
        return 0
    return args.func(args)
