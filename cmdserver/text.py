"""Untrusted text made safe for a terminal or a log line.

Python's ``str.isprintable`` is False for every control character (C0, DEL,
C1 such as CSI U+009B and OSC U+009D), every format character (the bidi
overrides U+202A–U+202E and isolates U+2066–U+2069, zero-width characters),
line and paragraph separators and unassigned or private code points: all that
can drive a terminal, hide text or reorder it.  Both functions keep printable
text as it is (the common case costs one ``isprintable`` call).
"""

from __future__ import annotations

from typing import Any

MAX_LENGTH = 256  # characters kept of one logged value; a longer one ends with "…"

REPLACEMENT = "\N{REPLACEMENT CHARACTER}"


def shown(text: str) -> str:
    """``text`` as a text door prints it: each unprintable character (but tab)
    becomes U+FFFD, so output reads as it is and cannot drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == "\t" else REPLACEMENT for c in text)


def escaped(text: str) -> str:
    """``text`` for one log or error line: each unprintable character is written
    as its escape (``\\x1b``, ``\\u202e``), so it stays visible and on one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def escape(value: Any, limit: int = MAX_LENGTH) -> str:
    """A client-chosen value (a user name tried, an SSH channel name, a certificate's
    common name) for the main log or an audit field: bytes decoded as UTF-8 (bad
    bytes as ``\\xNN``), :func:`escaped`, and at most ``limit`` characters kept.
    Written raw, a newline would forge a log line and an escape sequence would act
    on the terminal of whoever reads the log."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    elif not isinstance(value, str):
        value = str(value)
    if len(value) > limit:
        value = value[:limit] + "…"
    return escaped(value)


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
