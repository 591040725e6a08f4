"""The server's upload HMAC key: 32 random bytes kept as hex in ``DATA-DIR/hmac.key`` (0600).

The admin prints it with ``cmdserver hmac-key`` and gives it to the clients that
may upload; the same hex text works as a client's ``--key-file``.
"""

from __future__ import annotations

import os
import secrets
import string

KEY_FILE = "hmac.key"
KEY_BYTES = 32
MIN_KEY_BYTES = 16


class BadKeyError(ValueError):
    """A key file or value that cannot be used."""


def parse_key(data: bytes | str) -> bytes:
    """A key from hex text (white space ignored) or, failing that, raw bytes."""
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    compact = "".join(text.split())
    if compact and len(compact) % 2 == 0 and all(c in string.hexdigits for c in compact):
        key = bytes.fromhex(compact)
    elif isinstance(data, bytes):
        key = data
    else:
        raise BadKeyError("the key is not hex")
    if len(key) < MIN_KEY_BYTES:
        raise BadKeyError(f"the key is too short ({len(key)} bytes, at least {MIN_KEY_BYTES})")
    return key


def read_key_file(path: str) -> bytes:
    """Read a key file (hex text as ``cmdserver hmac-key`` prints it, or raw bytes)."""
    with open(path, "rb") as f:
        return parse_key(f.read())


def server_key(data_dir: str) -> bytes:
    """The server key, created on first use (0600, written then linked into place,
    so a crash or a second process never sees a half-written key)."""
    path = os.path.join(data_dir, KEY_FILE)
    try:
        return read_key_file(path)
    except FileNotFoundError:
        pass
    tmp = os.path.join(data_dir, f".{KEY_FILE}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_bytes(KEY_BYTES).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
    finally:
        os.unlink(tmp)
    return read_key_file(path)
