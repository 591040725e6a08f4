"""The upload MACs and the trailer line that carries one after the content.

Two algorithms, each named by the client and never replaced by another:

- ``hmac-sha256`` (the default): HMAC (RFC 2104) with SHA-256, any key length;
- ``blake2b``: keyed BLAKE2b (RFC 7693) with a 32-byte digest, for machines
  without SHA instructions, where it runs about 1.8 to 2.4 times as fast as SHA-256;
  its key is at most 64 bytes.

Both give 32 bytes, sent as 64 hex digits: in the command line (``upload NAME
SIZE HMAC``), or in the trailer line after the content (``upload NAME SIZE -``)::

    MAC <64 hex digits>\\n        (a \\r before the \\n is allowed)

Only the standard library: the upload client imports this module too.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

HMAC_SHA256 = "hmac-sha256"
BLAKE2B = "blake2b"
ALGORITHMS = (HMAC_SHA256, BLAKE2B)
DIGEST_SIZE = 32
BLAKE2B_MAX_KEY = 64  # hashlib.blake2b.MAX_KEY_SIZE
TRAILER_WORD = b"MAC"
TRAILER_MAX = 256  # bytes of a trailer line the doors read before giving up on it
TRAILER_LINE_LENGTH = len(TRAILER_WORD) + 1 + 2 * DIGEST_SIZE  # without the newline

_HEX = re.compile(rb"[0-9a-fA-F]*")
BAD_HEX = f"the MAC must be {2 * DIGEST_SIZE} hex digits"

__all__ = ["ALGORITHMS", "BLAKE2B", "HMAC_SHA256", "BadTrailer", "mac_error", "new_mac",
           "parse_hex", "parse_trailer", "trailer_line"]


class BadTrailer(ValueError):
    """A trailer line that is not ``MAC <64 hex digits>``; ``str()`` says what is wrong."""


def mac_error(algorithm: str, key: bytes) -> str | None:
    """Why ``algorithm`` cannot be used with ``key``, or None if it can."""
    if algorithm not in ALGORITHMS:
        return f"unknown MAC {algorithm[:32]!r} (use one of {', '.join(ALGORITHMS)})"
    if algorithm == BLAKE2B and len(key) > BLAKE2B_MAX_KEY:
        return (f"MAC blake2b takes a key of at most {BLAKE2B_MAX_KEY} bytes; "
                f"this key is longer: use {HMAC_SHA256}")
    return None


def new_mac(algorithm: str, key: bytes) -> Any:
    """A fresh MAC object (``update``, ``digest``, ``hexdigest``) for ``algorithm``.

    Both kinds release the GIL while they hash a buffer of 2 KiB or more, so a
    thread hashing large blocks lets the reactor and the writer run.
    """
    problem = mac_error(algorithm, key)
    if problem is not None:
        raise ValueError(problem)
    if algorithm == BLAKE2B:
        return hashlib.blake2b(key=key, digest_size=DIGEST_SIZE)
    return hmac.new(key, digestmod=hashlib.sha256)


def trailer_line(digest: bytes) -> bytes:
    """The line a client sends after the content: ``MAC <hex>\\n``."""
    return TRAILER_WORD + b" " + digest.hex().encode("ascii") + b"\n"


def parse_trailer(line: bytes) -> bytes:
    """The MAC in a trailer line (without its ``\\n``; a final ``\\r`` is dropped).

    Raises :class:`BadTrailer` with a one-line reason for anything else: another
    word, no MAC, a MAC of the wrong length or not hex, bytes after it.
    """
    if line.endswith(b"\r"):
        line = line[:-1]
    word, space, value = line.partition(b" ")
    if word != TRAILER_WORD or not space:
        raise BadTrailer("expected the trailer line 'MAC <64 hex digits>' after the content")
    size = 2 * DIGEST_SIZE
    if len(value) > size and _HEX.fullmatch(value[:size]):
        raise BadTrailer("extra bytes after the MAC in the trailer line")
    return _from_hex(value)


def parse_hex(text: str) -> bytes:
    """A MAC given as hex text on its own (the command's HMAC argument, PB's
    ``close(MAC)``, HTTP's header): 64 hex digits, either case."""
    if not isinstance(text, str) or not text.isascii():
        raise BadTrailer(BAD_HEX)
    return _from_hex(text.encode("ascii"))


def _from_hex(value: bytes) -> bytes:
    if len(value) != 2 * DIGEST_SIZE or not _HEX.fullmatch(value):
        raise BadTrailer(BAD_HEX)
    return bytes.fromhex(value.decode("ascii"))

