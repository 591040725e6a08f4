"""``cmdserver`` subcommands for credentials: useradd, passwd, userdel, addkey, users, token,
gencert.

They edit the files the daemon reads (it notices within ``--users-poll-interval``
seconds, or at once on SIGHUP).  Every failure is one line on stderr and exit
status 1; the users file is replaced whole or not at all.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from typing import Any

from cmdserver.auth.users import (
    DEFAULT_COST,
    CredentialError,
    UserRecord,
    UserStore,
    check_name,
    check_password,
    hash_password,
)

DEFAULT_DATA_DIR = "cmdserver-data"  # the daemon's --data-dir default


def _read_password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        return password[:-1] if password.endswith("\r") else password
    if not sys.stdin.isatty():
        raise CredentialError("no terminal to prompt for a password: use --password-stdin")
    first = getpass.getpass("Password: ")
    check_password(first)
    if getpass.getpass("Password (again): ") != first:
        raise CredentialError("the passwords do not match")
    return first


def _roots(paths: list[str] | None) -> tuple[str, ...] | None:
    if not paths:
        return None
    roots = []
    for path in paths:
        if not os.path.isdir(path):
            raise CredentialError(f"--root {path}: not an existing directory")
        roots.append(os.path.abspath(path))
    return tuple(roots)


def cmd_useradd(args: argparse.Namespace) -> None:
    store = UserStore(args.data_dir)
    name = check_name(args.name)
    roots = _roots(args.root)
    if name in store.load():
        raise CredentialError(f"user {name} already exists")
    hashed = hash_password(_read_password(args), args.cost)
    with store.locked() as users:
        if name in users:
            raise CredentialError(f"user {name} already exists")
        users[name] = UserRecord(name, hashed, roots)
    print(f"added user {name}")


def cmd_passwd(args: argparse.Namespace) -> None:
    store = UserStore(args.data_dir)
    name = check_name(args.name)
    if name not in store.load():
        raise CredentialError(f"no such user: {name}")
    hashed = hash_password(_read_password(args), args.cost)
    with store.locked() as users:
        if name not in users:
            raise CredentialError(f"no such user: {name}")
        users[name] = UserRecord(name, hashed, users[name].roots)
    print(f"password of {name} changed")


def cmd_userdel(args: argparse.Namespace) -> None:
    store = UserStore(args.data_dir)
    name = check_name(args.name)
    with store.locked() as users:
        if users.pop(name, None) is None:
            raise CredentialError(f"no such user: {name}")
    store.remove_keys(name)
    print(f"removed user {name}")


def cmd_addkey(args: argparse.Namespace) -> None:
    store = UserStore(args.data_dir)
    name = check_name(args.name)
    if name not in store.load():
        raise CredentialError(f"no such user: {name}")
    try:
        with open(args.keyfile, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialError(f"{args.keyfile}: {getattr(e, 'strerror', None) or e}") from None
    added = store.add_keys(name, text)
    print(f"{added} new key(s) for {name} in {store.key_path(name)}")


def cmd_users(args: argparse.Namespace) -> None:
    store = UserStore(args.data_dir)
    if not os.path.exists(store.users_path):  # a mistyped --data-dir, or no first start yet
        raise CredentialError(f"no users file in {args.data_dir} (is --data-dir right? "
                              "the daemon creates it on its first start)")
    users = store.load()
    found_keys = store.load_keys(set(users))
    for user in sorted(users.values(), key=lambda u: u.name):
        roots = ", ".join(user.roots) if user.roots else "(default roots)"
        print(f"{user.name}\tkeys: {len(found_keys.get(user.name, ()))}\troots: {roots}")


def cmd_gencert(args: argparse.Namespace) -> None:
    from cmdserver.auth.tls import gencert

    key_path, cert_path, endpoint = gencert(args.data_dir, args.host, args.port, args.days,
                                            args.force)
    print(f"wrote {key_path} (mode 0600) and {cert_path}", file=sys.stderr)
    print(endpoint)


def cmd_token(args: argparse.Namespace) -> None:
    from cmdserver.auth.tokens import TokenStore, parse_duration

    store = TokenStore(args.data_dir)
    if args.action == "add":
        name = check_name(args.user)
        if name not in UserStore(args.data_dir).load():
            raise CredentialError(f"no such user: {name}")
        lifetime = parse_duration(args.expires) if args.expires else None
        token_id, token = store.add(name, args.name or "", lifetime)
        print(f"token {token_id} for {name} (shown once; the server keeps only its SHA-256):",
              file=sys.stderr)
        print(token)
    elif args.action == "list":
        import time

        now = time.time()
        for record in sorted(store.load().values(), key=lambda r: (r.user, r.created)):
            if args.user and record.user != args.user:
                continue
            expires = ("never" if record.expires is None else
                       time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.expires))
                       + (" (expired)" if record.expired(now) else ""))
            created = time.strftime("%Y-%m-%d %H:%M", time.gmtime(record.created))
            print(f"{record.id}\t{record.user}\t{record.name or '-'}\tcreated {created}"
                  f"\texpires {expires}")
    else:
        for record in store.revoke(args.id, args.user):
            print(f"revoked token {record.id} of {record.user}")


def _cost(value: str) -> int:
    try:
        cost = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value}") from None
    if not 4 <= cost <= 31:
        raise argparse.ArgumentTypeError(f"bcrypt cost must be 4 to 31, not {cost}")
    return cost


def add_user_commands(subparsers: Any) -> None:
    """Declare the credential subcommands on the ``cmdserver`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", "-d", default=DEFAULT_DATA_DIR,
                        help=f"the daemon's data directory (default: ./{DEFAULT_DATA_DIR})")
    password = argparse.ArgumentParser(add_help=False)
    password.add_argument("--password-stdin", action="store_true",
                          help="read the password from the first line of standard input")
    password.add_argument("--cost", type=_cost, default=DEFAULT_COST,
                          help=f"bcrypt cost (default: {DEFAULT_COST})")

    def add(name: str, handler: Callable[[argparse.Namespace], None], help: str,
            parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help, description=help, parents=parents)
        p.set_defaults(func=run(handler))
        return p

    p = add("useradd", cmd_useradd, "Add a user (password from a prompt or stdin).",
            [common, password])
    p.add_argument("name")
    p.add_argument("--root", action="append", metavar="DIR",
                   help="a directory this user's file commands are confined to "
                        "(repeatable; default: the daemon's --root)")
    add("passwd", cmd_passwd, "Change a user's password.", [common, password]
        ).add_argument("name")
    add("userdel", cmd_userdel, "Remove a user and their SSH keys.", [common]
        ).add_argument("name")
    p = add("addkey", cmd_addkey, "Add the SSH public keys in KEYFILE to a user.", [common])
    p.add_argument("name")
    p.add_argument("keyfile")
    add("users", cmd_users, "List the users (never their password hashes).", [common])
    p = add("gencert", cmd_gencert, "Write a self-signed TLS key and certificate for HOST "
            "and print the ssl: endpoint that uses them.", [common])
    p.add_argument("host")
    p.add_argument("--port", type=int, default=9443, help="port in the printed endpoint")
    p.add_argument("--days", type=int, default=825, help="validity (default: 825)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p = add("token", cmd_token, "API tokens: add USER prints a new token once; list; "
            "revoke ID (or 'all' with --user). A token logs in like a password on the line "
            "and PB doors, without a bcrypt check.", [])
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = actions.add_parser("add", help="make a token for USER and print it once",
                           parents=[common])
    q.add_argument("user")
    q.add_argument("--name", help="a label for it (e.g. the tool that uses it)")
    q.add_argument("--expires", metavar="DURATION", help="lifetime: 90d, 12h, 30m "
                   "(default: never)")
    q = actions.add_parser("list", help="the tokens (never the tokens themselves)",
                           parents=[common])
    q.add_argument("--user", help="only this user's")
    q = actions.add_parser("revoke", help="remove a token; its sessions end",
                           parents=[common])
    q.add_argument("id", help="the token's id (as listed), or 'all' with --user")
    q.add_argument("--user", help="whose tokens")


def run(handler: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    """Turn a handler into a subcommand: a one-line error and status 1 on failure."""

    def wrapped(args: argparse.Namespace) -> int:
        try:
            handler(args)
        except CredentialError as e:
            print(f"Error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            print(f"Error: {where}{e.strerror or e}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, EOFError):
            print("Error: interrupted", file=sys.stderr)
            return 1
        return 0

    return wrapped
