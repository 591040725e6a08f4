"""API tokens: logins that cost a SHA-256, not a bcrypt check.

A token is ``cmdserver_<id>_<secret>``: ``id`` (8 hex digits) names it in
listings and the audit log, ``secret`` is 32 random bytes (base64url).  The
server keeps only the SHA-256 of the whole token, in ``DATA-DIR/tokens``
(JSON, mode 0600, replaced atomically): a secret of 256 random bits needs no
slow hash, since nothing can be guessed from its digest.  ``cmdserver token
add USER`` prints a token once; ``token list`` and ``token revoke`` manage
them.  A token logs in wherever a password does on the line and PB doors
(``login USER TOKEN``, ``authenticate(user, token)``), as its user only, until
it expires or is revoked; revoking it ends the sessions it opened.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface, implementer

from cmdserver.auth.users import (
    CredentialError,
    check_name,
    credentials_lock,
    write_atomically,
)

TOKENS_FILE = "tokens"
PREFIX = "cmdserver_"
_TOKEN = re.compile(r"cmdserver_([0-9a-f]{8})_([A-Za-z0-9_-]{43})\Z")
_LABEL = re.compile(r"[\w.@:+-]{0,64}\Z")


@dataclass(frozen=True)
class TokenRecord:
    """One token as the server keeps it: never the token itself."""

    id: str
    user: str
    sha256: str  # hex digest of the whole token
    name: str = ""  # the operator's label
    created: float = 0.0  # Unix time
    expires: float | None = None  # Unix time, or never

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires


def looks_like_token(secret: str | bytes) -> bool:
    """True if ``secret`` has a token's form (so it is checked as one, not as a password)."""
    if isinstance(secret, bytes):
        return secret.startswith(PREFIX.encode())
    return secret.startswith(PREFIX)


def secret_method(secret: str | bytes) -> tuple[str, str | None]:
    """How a login by ``secret`` is audited: ``("token", ID)`` for an API token,
    else ``("password", None)``."""
    text = secret.decode("ascii", "replace") if isinstance(secret, bytes) else secret
    match = _TOKEN.match(text)
    return ("token", match.group(1)) if match else ("password", None)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def new_token() -> tuple[str, str]:
    """A fresh ``(id, token)``."""
    token_id = secrets.token_hex(4)
    return token_id, f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


def check(records: dict[str, TokenRecord], user: str | None, token: str | bytes,
          now: float | None = None) -> TokenRecord | None:
    """The record ``token`` matches, if it is ``user``'s, known and not expired."""
    if isinstance(token, bytes):
        token = token.decode("ascii", "replace")
    match = _TOKEN.match(token)
    if match is None:
        return None
    record = records.get(match.group(1))
    if record is None:
        hmac.compare_digest(digest(token), "0" * 64)  # the same work either way
        return None
    if not hmac.compare_digest(digest(token), record.sha256):
        return None
    if user is not None and record.user != user:
        return None
    if record.expired(time.time() if now is None else now):
        return None
    return record


def parse_duration(text: str) -> float:
    """``90d``, ``12h``, ``30m``, ``45s`` or plain seconds."""
    match = re.fullmatch(r"([0-9]+)([smhdw]?)", text.strip())
    if match is None:
        raise CredentialError(f"not a duration: {text!r} (e.g. 90d, 12h, 30m)")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    seconds = int(match.group(1)) * unit
    if seconds <= 0:
        raise CredentialError(f"not a positive duration: {text!r}")
    return float(seconds)


class ITokenCredentials(Interface):
    """A token alone, as ``Authorization: Bearer TOKEN`` gives it: the token says who."""

    token = Attribute("the token (str)")


@implementer(ITokenCredentials)
@dataclass(frozen=True)
class TokenCredentials:
    token: str


@implementer(ICredentialsChecker)
class TokenChecker:
    """The portal's checker for :class:`TokenCredentials`: the token's user."""

    credentialInterfaces = (ITokenCredentials,)

    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials  # auth.credentials.Credentials

    def requestAvatarId(self, credentials: Any) -> Deferred:
        try:
            return defer.succeed(self.credentials.check_token(None, credentials.token))
        except UnauthorizedLogin:
            return defer.fail(UnauthorizedLogin())


class TokenStore:
    """The tokens file of one data directory."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.path = os.path.join(data_dir, TOKENS_FILE)

    def load(self) -> dict[str, TokenRecord]:
        """The tokens on file, by id (none if there is no file)."""
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialError(f"{self.path}: {getattr(e, 'strerror', None) or e}") from None
        return parse_tokens(text, self.path)

    def save(self, records: dict[str, TokenRecord]) -> None:
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        data = {"tokens": [asdict(r) for r in sorted(records.values(), key=lambda r: r.id)]}
        write_atomically(self.path, (json.dumps(data, indent=1) + "\n").encode("utf-8"))

    @contextmanager
    def locked(self) -> Iterator[dict[str, TokenRecord]]:
        """Read-modify-write under the data directory's credentials lock."""
        with credentials_lock(self.data_dir):
            records = self.load()
            before = dict(records)
            yield records
            if records != before:
                self.save(records)

    def add(self, user: str, name: str = "", lifetime: float | None = None) -> tuple[str, str]:
        """A new token for ``user``: ``(id, token)``; the token is not kept."""
        check_name(user)
        if not _LABEL.match(name):
            raise CredentialError(f"bad token name {name!r} (letters, digits, . @ : + - _; "
                                  "at most 64)")
        now = time.time()
        with self.locked() as records:
            token_id, token = new_token()
            while token_id in records:
                token_id, token = new_token()
            records[token_id] = TokenRecord(token_id, user, digest(token), name, round(now, 3),
                                            None if lifetime is None else round(now + lifetime))
        return token_id, token

    def revoke(self, token_id: str, user: str | None = None) -> list[TokenRecord]:
        """Remove the token ``token_id`` (``all``: every token of ``user``)."""
        with self.locked() as records:
            if token_id == "all":
                if user is None:
                    raise CredentialError("revoke all needs --user")
                gone = [r for r in records.values() if r.user == user]
            else:
                found = records.get(token_id)
                gone = [found] if found is not None and user in (None, found.user) else []
            if not gone:
                raise CredentialError(f"no such token: {token_id}")
            for record in gone:
                del records[record.id]
        return gone


def parse_tokens(text: str, source: str) -> dict[str, TokenRecord]:
    try:
        data: Any = json.loads(text) if text.strip() else {"tokens": []}
        records = {}
        for item in data["tokens"]:
            record = TokenRecord(**item)
            if not re.fullmatch(r"[0-9a-f]{8}", record.id) or len(record.sha256) != 64:
                raise ValueError(f"bad token record {record.id!r}")
            records[record.id] = record
        return records
    except (ValueError, KeyError, TypeError) as e:
        raise CredentialError(f"{source}: not a tokens file ({e})") from None
