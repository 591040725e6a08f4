"""How the client subcommands (call, fleet, upload) get a user's password."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Any

PASSWORD_ENV = "CMDSERVER_PASSWORD"


class NoPassword(Exception):
    """No password to be had: ``str()`` is the one line to print (exit status 2)."""


def add_password_argument(p: Any, what: str = "the password") -> None:
    p.add_argument("--password-env", metavar="VAR", default=PASSWORD_ENV,
                   help=f"environment variable with {what} (default: {PASSWORD_ENV}; "
                        "else a prompt on a terminal)")


def read_password(args: argparse.Namespace, user: str) -> str:
    """The password from ``--password-env``, else a prompt on a terminal; with
    neither, :class:`NoPassword`."""
    value = os.environ.get(args.password_env)
    if value:
        return value
    if not sys.stdin.isatty():
        raise NoPassword(f"Error: no password: set {args.password_env} "
                         "(no terminal to ask on)")
    return getpass.getpass(f"Password for {user}: ")
