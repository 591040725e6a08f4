"""Bad input, property-based: the ports-spec parser, the upload command's
arguments and the SSH door's command-line decoding never raise anything but
their documented error, and every refusal names what was wrong."""

from __future__ import annotations

import ast
import re
import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cmdserver.commands.portscan.portspec import MAX_PORT, PortSpecError, parse_ports
from cmdserver.commands.upload.command import UploadCommand, parse_size
from cmdserver.commands.upload.engine import Uploads, UploadSettings, check_request
from cmdserver.doors.ssh.shell import command_text
from cmdserver.errors import CommandError

# -- ports ------------------------------------------------------------------

SPEC_CHARS = st.text(alphabet=list("0123456789,- \tall+_.;x\N{FULLWIDTH DIGIT ONE}"),
                     max_size=30)
ports = st.integers(1, MAX_PORT)


def named_part(message: str) -> str:
    """The part of the spec an error message names (quoted, or after "out of range")."""
    m = re.fullmatch(r"port out of range: (.*) \(ports are 1-65535\)", message, re.DOTALL)
    if m:
        return m.group(1)
    m = re.fullmatch(r"[a-z ]+ ('.*'|\".*\")(?: \(.*\))?", message, re.DOTALL)
    assert m, message
    return ast.literal_eval(m.group(1))


def canonical(ranges: tuple[tuple[int, int], ...]) -> str:
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=40), SPEC_CHARS))
@example("0")
@example("65536")
@example("5-1")
@example(",")
@example("1--2")
@example("\x00")
def test_ports_only_raise_portspecerror_naming_the_bad_part(spec: str) -> None:
    try:
        parsed = parse_ports(spec)
    except PortSpecError as e:
        assert e.text == f"Error: {e.message}" and "\n" not in e.message
        # The message names the spec, item or port it could not read (or says it is empty).
        if spec.strip():
            assert named_part(e.message) in spec, (spec, e.message)
        else:
            assert e.message == "empty port list"
        return
    assert parsed.ranges, spec
    assert all(1 <= a <= b <= MAX_PORT for a, b in parsed.ranges)
    # Sorted, disjoint and not touching: the canonical form of the set.
    assert all(b1 + 1 < a2 for (_, b1), (a2, _) in zip(parsed.ranges, parsed.ranges[1:],
                                                      strict=False))


@given(st.lists(st.tuples(ports, st.integers(0, 2000)).map(
    lambda t: (t[0], min(MAX_PORT, t[0] + t[1]))), min_size=1, max_size=10), st.data())
def test_ports_round_trip(ranges: list[tuple[int, int]], data: st.DataObject) -> None:
    items = [str(a) if a == b and data.draw(st.booleans()) else f"{a}-{b}" for a, b in ranges]
    parsed = parse_ports(",".join(items))
    assert list(parsed) == sorted({p for a, b in ranges for p in range(a, b + 1)})
    assert parse_ports(canonical(parsed.ranges)) == parsed  # its canonical form reads back


@given(st.lists(ports.map(str), max_size=4), st.lists(ports.map(str), max_size=4),
       st.one_of(st.just(0), st.integers(MAX_PORT + 1, 10**30)), st.booleans(), st.data())
def test_out_of_range_port_is_named(before: list[str], after: list[str], bad: int,
                                    in_range: bool, data: st.DataObject) -> None:
    zeros = "0" * data.draw(st.integers(0, 3))
    text = zeros + str(bad)
    item = f"{text}-{MAX_PORT}" if in_range and bad == 0 else (f"1-{text}" if in_range
                                                               else text)
    with pytest.raises(PortSpecError) as e:
        parse_ports(",".join([*before, item, *after]))
    assert e.value.message == f"port out of range: {text} (ports are 1-65535)"


@given(st.lists(ports.map(str), max_size=4), ports, ports)
def test_reversed_range_is_named(before: list[str], a: int, b: int) -> None:
    if a == b:
        return
    first, last = max(a, b), min(a, b)
    with pytest.raises(PortSpecError) as e:
        parse_ports(",".join([*before, f"{first}-{last}"]))
    assert e.value.message == f"reversed port range '{first}-{last}'"


# -- upload arguments ---------------------------------------------------------

UPLOAD = UploadCommand(Uploads(UploadSettings(max_upload=1 << 30), b"k" * 32))
HEX = st.text(alphabet="0123456789abcdefABCDEF", min_size=64, max_size=64)
words = st.one_of(st.text(max_size=20), HEX, st.integers(-5, 1 << 40).map(str),
                  st.sampled_from(["-", "..", "../x", "/etc/passwd", "\x00", "1e3", "0x10", "+5",
                                   " 5", "\N{ARABIC-INDIC DIGIT FIVE}", "1" * 400]))


@settings(max_examples=400, deadline=None)
@given(st.lists(words, max_size=5))
def test_upload_parse_refuses_cleanly_or_gives_a_request(argv: list[str]) -> None:
    try:
        kwargs = UPLOAD.parse(argv)
    except CommandError as e:
        assert e.text.startswith("Error: ") and "\n" not in e.text
        if len(argv) == 3 and "\0" not in argv[0] + argv[2]:  # the size was refused
            assert e.message == CommandError(
                f"SIZE must be a whole number of bytes: {argv[1]}").message
        return
    assert len(argv) == 3
    assert kwargs == {"name": argv[0], "size": int(argv[1]), "hmac": argv[2],
                      "mac": "hmac-sha256", "sha256": False}
    assert argv[1].isascii() and argv[1].isdigit()
    try:
        mac = check_request(kwargs["name"], kwargs["size"], kwargs["hmac"], 1 << 30)
    except CommandError as e:
        assert "\n" not in e.text
        return
    if kwargs["hmac"] == "-":  # the MAC follows the content
        assert mac is None
        return
    assert mac == bytes.fromhex(kwargs["hmac"]) and len(mac) == 32


@given(st.text(alphabet=string.digits, min_size=1, max_size=30))
def test_upload_size_round_trips(word: str) -> None:
    assert parse_size(word) == int(word)


# -- SSH exec command lines ---------------------------------------------------

@settings(max_examples=500, deadline=None)
@given(st.one_of(st.binary(max_size=60), st.text(max_size=30).map(str.encode),
                 st.sampled_from([b"ping\x00", b"\xff\xfe", b"\xed\xa0\x80", b"ls\tsub",
                                  b"\x1b[2J", b"\xff\xf4\xff\xfd\x06", "caf\u00e9".encode()])))
def test_ssh_command_text_decodes_or_refuses_in_one_line(raw: bytes) -> None:
    text, error = command_text(raw)
    if error is not None:
        assert text == ""
        assert error in ("Error: the command is not valid UTF-8",
                         "Error: control characters are not allowed in a command")
        return
    assert text.encode("utf-8") == raw  # nothing lost or changed on the way
    assert text.replace("\t", " ").isprintable()


@given(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn",
                                                   "Zs"))))
def test_ssh_command_text_keeps_printable_commands(text: str) -> None:
    assert command_text(text.encode("utf-8")) == (text, None)
