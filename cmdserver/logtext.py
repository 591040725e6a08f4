"""Untrusted text on its way into a log: control characters escaped, length capped.

A client chooses the user name it tries, the SSH method, channel and
subsystem names it asks for, the common name of its certificate.  Written as
they are, a newline would forge a log line and an escape sequence would act on
the terminal of whoever reads the log (``tail -f``, ``jq -r``).  :func:`escape`
makes such a value printable and short before it goes into the main text log
or into the ``user`` field of an audit record.
"""

from __future__ import annotations

from typing import Any

MAX_LENGTH = 256  # characters kept of one value; a longer one ends with "…"


def escape(value: Any, limit: int = MAX_LENGTH) -> str:
    """``value`` as printable text: bytes decoded as UTF-8 (bad bytes as ``\\xNN``),
    every character that ``str.isprintable`` refuses (controls, line separators,
    other separators but the space) written as ``\\xNN``, ``\\uNNNN`` or
    ``\\UNNNNNNNN``, and at most ``limit`` characters of the value kept."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    elif not isinstance(value, str):
        value = str(value)
    if len(value) > limit:
        value = value[:limit] + "…"
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else _escape_char(c) for c in value)


def _escape_char(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
