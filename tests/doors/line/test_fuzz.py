"""Bad input, property-based: arbitrary bytes, split at arbitrary points, fed to
the line door (through the shared connection limits) and to the parsers."""

from __future__ import annotations

import inspect
import os
import tempfile
from typing import cast

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.python.failure import Failure

from cmdserver.commands import default_registry
from cmdserver.commands.base import Command, Context
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore, split_line
from cmdserver.doors.limits import ConnectionLimits, LimitedFactory
from cmdserver.doors.line.protocol import TOO_MANY, LineFactory, LineSettings
from cmdserver.errors import CommandError, UsageError
from cmdserver.policy import Policy

MAX_LINE = 64
_ROOT_DIR = tempfile.TemporaryDirectory(prefix="cmdserver-fuzz-")  # removed at exit
ROOT = _ROOT_DIR.name
with open(os.path.join(ROOT, "file.txt"), "wb") as _f:
    _f.write(b"some bytes\n")
os.mkdir(os.path.join(ROOT, "dir"))

# Pieces a hostile or confused client might send; st.binary() covers the rest.
PIECES = [
    b"ping", b"help", b"help ping", b"stats", b"ls", b"ls dir", b"ls ../..",
    b"comphash file.txt", b"comphash --algo md5 file.txt", b"comphash /etc/passwd",
    b"lastlog 3", b"lastlog x", b"exit", b"quit", b"nope", b"'", b'"unclosed', b"\\",
    b"\r", b"\n", b"\r\n", b"\t", b" ", b"\x00", b"ping\x00", b"\x1b[2J", b"\x7f",
    b"\xff\xfb\x01\xff\xfd\x03", b"\xff\xf4\xff\xfd\x06", b"\xff", b"\xc3\x28", b"\xed\xa0\x80",
    "caf\u00e9 \u202e\u200b".encode(), b"x" * (MAX_LINE - 1), b"x" * (MAX_LINE + 1),
    b"x" * 5000,
]
chunks = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=40)), max_size=30)


def build(greeting: str = "") -> tuple[CommandCore, LimitedFactory]:
    # lastlog with no source gives a clean error without spawning a process.
    registry = default_registry(LogSource(""))
    core = CommandCore(registry, Policy([ROOT]), MemoryReactorClock(),
                       run_in_thread=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))
    factory = LineFactory(core, LineSettings(max_line=MAX_LINE, idle_timeout=0,
                                             greeting=greeting))
    return core, LimitedFactory(factory, ConnectionLimits(3, 2), core.stats, "line", TOO_MANY)


def connect(limited: LimitedFactory, port: int) -> tuple[IProtocol, StringTransport]:
    addr = IPv4Address("TCP", "127.0.0.1", port)
    proto = limited.buildProtocol(addr)
    transport = StringTransport(peerAddress=addr)
    proto.makeConnection(transport)
    return proto, transport


def check_output(data: bytes) -> list[str]:
    """Every reply is whole lines of printable UTF-8; no tracebacks, no internal errors."""
    assert data.endswith(b"\r\n") or data == b""
    lines = data.decode("utf-8").split("\r\n")[:-1]
    for line in lines:
        assert line.isprintable(), line
        assert "Traceback" not in line and "internal error" not in line, line
    return lines


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=chunks, data=st.data())
def test_line_door_holds(pieces: list[bytes], data: st.DataObject) -> None:
    failures: list[dict] = []

    def observer(event: dict) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    try:
        greeting = data.draw(st.sampled_from(["", "cmdserver ready"]))
        core, limited = build(greeting)
        blob = b"\n".join(pieces) + b"\n"
        cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=8)))
        proto, transport = connect(limited, 1000)
        other, other_transport = connect(limited, 1001)  # a quiet neighbour
        for start, end in zip([0, *cuts], [*cuts, len(blob)], strict=True):
            if transport.disconnecting:
                break
            proto.dataReceived(blob[start:end])
        if not transport.disconnecting:
            # Still open: it must still answer, and answer in turn.
            proto.dataReceived(b"ping\n")
            assert transport.value().endswith(b"pong\r\n")
        lines = check_output(transport.value())
        if greeting:  # sent first, once; without one the first line is a reply
            assert lines[0] == greeting and greeting not in lines[1:]
        if transport.disconnecting:
            assert lines[-1] in ("bye !", f"Error: line too long (the limit is {MAX_LINE} bytes)")
        assert core.stats.connections["line"] == 2
        assert core.stats.in_flight == 0
        other.dataReceived(b"ping\n")
        assert other_transport.value().endswith(b"pong\r\n")
        proto.connectionLost(Failure(ConnectionDone()))
        other.connectionLost(Failure(ConnectionDone()))
        assert core.stats.connections["line"] == 0
        assert limited.limits.total == 0 and not limited.limits.per_host
        assert failures == []
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observer))


def test_limits_refuse_and_count_exactly() -> None:
    core, limited = build()
    a, _ = connect(limited, 1)
    b, _ = connect(limited, 2)
    c, c_transport = connect(limited, 3)  # third from one host: over max_per_ip=2
    assert c_transport.value() == TOO_MANY and c_transport.disconnecting
    assert core.stats.refused == 1 and core.stats.connections["line"] == 2
    for p in (a, b):
        p.connectionLost(Failure(ConnectionDone()))
    assert core.stats.connections["line"] == 0 and limited.limits.total == 0


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_split_line_only_raises_usage_error(line: str) -> None:
    try:
        words = split_line(line)
    except UsageError as e:
        assert e.text.startswith("Error: ") and "\n" not in e.text
        return
    assert all(isinstance(w, str) for w in words)


COMMANDS = default_registry(LogSource("")).commands()


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(COMMANDS), st.lists(st.one_of(
    st.text(max_size=12),
    st.sampled_from(["--", "--algo", "--algo=md5", "--algo=", "-x", "10", "0", "-1", "1001",
                     "99999999999999999999", "\x00", ".."]),
), max_size=5))
def test_each_parser_refuses_cleanly_or_fits_run(command: Command, argv: list[str]) -> None:
    try:
        kwargs = command.parse(argv)
    except CommandError as e:
        assert e.text and "\n" not in e.text
        return
    assert isinstance(kwargs, dict)
    # What parse gives is exactly what run accepts.
    inspect.signature(command.run).bind(Context.__new__(Context), **kwargs)
