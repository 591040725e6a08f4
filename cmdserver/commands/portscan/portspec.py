"""Port lists for ``portscan``: ``22,80,8000-8100``, ``all``, with errors naming the bad part.

A :class:`PortSet` keeps merged ranges, not one entry per port, so a full
``1-65535`` costs a few bytes and iterating it creates ports one at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from cmdserver.errors import UsageError

MIN_PORT = 1
MAX_PORT = 65535
DEFAULT_SPEC = "1-1024"
ALL = "all"
_NUMBER = re.compile(r"[0-9]+", re.ASCII)  # no signs, spaces, "_" or non-ASCII digits


class PortSpecError(UsageError):
    """A port list the user typed cannot be read; the message names the bad part."""


@dataclass(frozen=True)
class PortSet:
    """Ports as sorted, disjoint, inclusive ``(first, last)`` ranges."""

    ranges: tuple[tuple[int, int], ...]

    def __len__(self) -> int:
        return sum(last - first + 1 for first, last in self.ranges)

    def __iter__(self) -> Iterator[int]:
        for first, last in self.ranges:
            yield from range(first, last + 1)

    def __contains__(self, port: object) -> bool:
        # ``in`` passes any object; an int (or anything that compares with one) is what counts.
        return any(first <= port <= last for first, last in self.ranges)  # type: ignore[operator]


def parse_ports(spec: str | None) -> PortSet:
    """Read a port list; None means the default ``1-1024``.

    Duplicates and overlaps are merged, so every port is probed once.
    """
    if spec is None:
        spec = DEFAULT_SPEC
    if not isinstance(spec, str):
        raise PortSpecError("the port list must be a string like 22,80,8000-8100")
    if spec.strip().lower() == ALL:
        return PortSet(((MIN_PORT, MAX_PORT),))
    if not spec.strip():
        raise PortSpecError("empty port list")
    ranges: list[tuple[int, int]] = []
    for item in spec.split(","):
        ranges.append(_parse_item(item, spec))
    return PortSet(_merge(ranges))


def _parse_item(item: str, spec: str) -> tuple[int, int]:
    if not item:
        raise PortSpecError(f"empty item in port list {spec!r}")
    if "-" in item:
        parts = item.split("-")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise PortSpecError(f"bad port range {item!r} (use FIRST-LAST)")
        first, last = _parse_port(parts[0]), _parse_port(parts[1])
        if first > last:
            raise PortSpecError(f"reversed port range {item!r}")
        return first, last
    port = _parse_port(item)
    return port, port


def _parse_port(text: str) -> int:
    if not _NUMBER.fullmatch(text):
        raise PortSpecError(f"bad port {text!r} (ports are numbers 1-65535)")
    # Strip leading zeros first so a long run of digits is cheap to judge.
    digits = text.lstrip("0") or "0"
    if len(digits) > 5 or not MIN_PORT <= int(digits) <= MAX_PORT:
        raise PortSpecError(f"port out of range: {text} (ports are 1-65535)")
    return int(digits)


def _merge(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return tuple(merged)
