"""Port lists: what is accepted, and an error naming the bad part for everything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmdserver.commands.portscan.portspec import PortSet, PortSpecError, parse_ports


@pytest.mark.parametrize(("spec", "ranges"), [
    (None, ((1, 1024),)),
    ("all", ((1, 65535),)),
    ("ALL", ((1, 65535),)),
    ("22", ((22, 22),)),
    ("22,80,8000-8100", ((22, 22), (80, 80), (8000, 8100))),
    ("80,22", ((22, 22), (80, 80))),
    ("1-10,5-20,21", ((1, 21),)),
    ("80,80,80", ((80, 80),)),
    ("1,65535", ((1, 1), (65535, 65535))),
    ("0080", ((80, 80),)),
    ("7-7", ((7, 7),)),
])
def test_accepted(spec: str | None, ranges: tuple) -> None:
    assert parse_ports(spec).ranges == ranges


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty port list"),
    ("   ", "empty port list"),
    ("22,,80", "empty item in port list '22,,80'"),
    ("22,", "empty item in port list '22,'"),
    (",22", "empty item in port list ',22'"),
    ("0", "port out of range: 0 (ports are 1-65535)"),
    ("0-10", "port out of range: 0 (ports are 1-65535)"),
    ("65536", "port out of range: 65536 (ports are 1-65535)"),
    ("1-70000", "port out of range: 70000 (ports are 1-65535)"),
    ("9" * 200, f"port out of range: {'9' * 200} (ports are 1-65535)"),
    ("100-10", "reversed port range '100-10'"),
    ("http", "bad port 'http' (ports are numbers 1-65535)"),
    ("22,abc", "bad port 'abc' (ports are numbers 1-65535)"),
    ("-5", "bad port range '-5' (use FIRST-LAST)"),
    ("5-", "bad port range '5-' (use FIRST-LAST)"),
    ("1-2-3", "bad port range '1-2-3' (use FIRST-LAST)"),
    ("-", "bad port range '-' (use FIRST-LAST)"),
    ("+80", "bad port '+80' (ports are numbers 1-65535)"),
    (" 80", "bad port ' 80' (ports are numbers 1-65535)"),
    ("1_000", "bad port '1_000' (ports are numbers 1-65535)"),
    ("\N{FULLWIDTH DIGIT EIGHT}0",
     "bad port '\N{FULLWIDTH DIGIT EIGHT}0' (ports are numbers 1-65535)"),
    ("8.0", "bad port '8.0' (ports are numbers 1-65535)"),
    ("22;80", "bad port '22;80' (ports are numbers 1-65535)"),
])
def test_refused_with_the_bad_part_named(spec: str, message: str) -> None:
    with pytest.raises(PortSpecError) as e:
        parse_ports(spec)
    assert str(e.value) == message
    assert e.value.text == f"Error: {message}"


def test_not_a_string() -> None:
    with pytest.raises(PortSpecError, match="must be a string"):
        parse_ports([22, 80])  # type: ignore[arg-type]  # the wrong type on purpose


def test_full_range_is_small_and_lazy() -> None:
    ports = parse_ports("all")
    assert len(ports) == 65535
    it = iter(ports)
    assert [next(it), next(it)] == [1, 2]
    assert 65535 in ports and 0 not in ports


port_lists = st.lists(
    st.tuples(st.integers(1, 65535), st.integers(0, 300)).map(
        lambda t: (t[0], min(65535, t[0] + t[1]))), min_size=1, max_size=8)


@given(port_lists)
def test_any_list_of_ranges_means_exactly_its_ports(ranges: list[tuple[int, int]]) -> None:
    spec = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)
    expected = sorted({p for a, b in ranges for p in range(a, b + 1)})
    parsed = parse_ports(spec)
    assert list(parsed) == expected
    assert len(parsed) == len(expected)
    assert isinstance(parsed, PortSet)
