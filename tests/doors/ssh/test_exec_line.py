"""The exec line's shell separators: found outside quotes, never inside a word."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmdserver.core import split_line
from cmdserver.doors.ssh.session import shell_separator


@pytest.mark.parametrize("line, separator", [
    ("stats; ping", ";"),
    ("ping;", ";"),
    ("ping && ping", "&&"),
    ("ping||ping", "||"),
    ("ls | ls", "|"),
    ("ping\nping", "\n"),
    ('comphash "a;b"; ping', ";"),
    ("comphash 'a' && ping", "&&"),
    ('comphash "a\\"b" | x', "|"),
])
def test_separators_outside_quotes(line, separator):
    assert shell_separator(line) == separator


@pytest.mark.parametrize("line", [
    "ping", "comphash notes.txt", 'comphash "a;b"', "comphash 'x|y'", "comphash a\\;b",
    'comphash "p&&q"', "comphash 'it''s;'", "comphash a&b", "ls 'open", 'ls "a\\";b"',
    "comphash --algo md5 'a b'", "",
])
def test_no_separator(line):
    assert shell_separator(line) is None


WORDS = st.lists(st.text(alphabet="ab ;|&'\"\\\n", min_size=1, max_size=8), min_size=1,
                max_size=4)


@given(WORDS)
def test_quoted_words_have_no_separator(words):
    line = " ".join(shlex.quote(w) for w in words)
    assert shell_separator(line) is None
    assert split_line(line) == words


@given(WORDS, WORDS, st.sampled_from([";", "&&", "||", "|", "\n"]))
def test_a_separator_between_quoted_words_is_found(first, second, separator):
    line = " ".join(map(shlex.quote, first)) + separator + " ".join(map(shlex.quote, second))
    assert shell_separator(line) == separator
