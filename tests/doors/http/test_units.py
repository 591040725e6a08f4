"""The HTTP door's small parts: Host names, Authorization headers, ranges, statuses."""

from __future__ import annotations

import base64
import json

import pytest
from twisted.cred.credentials import UsernamePassword

from cmdserver.auth.tokens import TokenCredentials
from cmdserver.doors.http.door import host_names, refusal, split_host
from cmdserver.doors.http.errors import HTTPError, status_of
from cmdserver.doors.http.files import byte_range
from cmdserver.doors.http.login import parse_authorization
from cmdserver.doors.limits import TOO_MANY_CONNECTIONS
from cmdserver.errors import (
    CommandError,
    Conflict,
    DeadlineExceeded,
    MissingArgument,
    NotFound,
    PathOutsideRoots,
    Throttled,
    TooLarge,
    UsageError,
)


def test_host_names_of_an_endpoint():
    names, any_address = host_names("tcp:9898:interface=127.0.0.1", ["Cmd.Example.org."])
    assert names == {"localhost", "127.0.0.1", "::1", "cmd.example.org"}
    assert not any_address
    names, any_address = host_names(r"tcp6:9898:interface=\:\:1")
    assert names is not None and "::1" in names and not any_address
    names, any_address = host_names("tcp:9898:interface=192.0.2.7")
    assert names is not None and "192.0.2.7" in names and not any_address
    assert host_names("tcp:9898")[1] and host_names("tcp:9898:interface=0.0.0.0")[1]
    assert host_names("unix:/run/c.sock") == (None, False)


@pytest.mark.parametrize("header, name", [
    (b"localhost:9898", "localhost"), (b"[::1]:9898", "::1"), (b"[::1]", "::1"),
    (b"Example.ORG.", "example.org"), (b"::1", "::1"), (b"127.0.0.1", "127.0.0.1")])
def test_split_host(header, name):
    assert split_host(header) == name


def test_authorization_headers():
    creds, user, method, token_id = parse_authorization(b"Bearer cmdserver_0a1b2c3d_x")
    assert isinstance(creds, TokenCredentials) and method == "token"
    basic = b"Basic " + base64.b64encode(b"ops:pa:ss")
    creds, user, method, token_id = parse_authorization(basic)
    assert isinstance(creds, UsernamePassword)
    assert (creds.username, creds.password, user, method) == (b"ops", b"pa:ss", "ops",
                                                              "password")
    for bad in (b"Basic", b"Basic " + base64.b64encode(b"nocolon"), b"Digest x", b"Bearer",
                b"Basic " + base64.b64encode(b":pw"), b"Basic " + base64.b64encode(b"\xff:x")):
        with pytest.raises(HTTPError) as e:
            parse_authorization(bad)
        assert e.value.status == 401


def test_byte_ranges():
    assert byte_range(None, 10) is None
    assert byte_range(b"bytes=2-4", 10) == (2, 4)
    assert byte_range(b"bytes=-3", 10) == (7, 9)
    assert byte_range(b"bytes=-30", 10) == (0, 9)
    assert byte_range(b"bytes=8-", 10) == (8, 9)
    assert byte_range(b"bytes=0-1,4-5", 10) is None  # several: the whole file
    assert byte_range(b"lines=1-2", 10) is None
    for bad in (b"bytes=10-", b"bytes=5-2", b"bytes=-0"):
        with pytest.raises(HTTPError) as e:
            byte_range(bad, 10)
        assert e.value.status == 416


def test_statuses():
    cases = [(MissingArgument("Please provide a path."), 400), (UsageError("x"), 400),
             (NotFound("x"), 404), (PathOutsideRoots(), 403), (Conflict("x"), 409),
             (TooLarge("x"), 413), (Throttled("x"), 429), (DeadlineExceeded(5), 504),
             (CommandError("x"), 422), (ValueError("bug"), 500), (HTTPError(418, "x"), 418)]
    for error, status in cases:
        assert status_of(error) == status, error


def test_a_refused_connection_gets_an_http_answer():
    for reason, status in ((TOO_MANY_CONNECTIONS, b"503"),
                           ("Too many failed logins from your address; try again in 3 s",
                            b"429")):
        head, _, body = refusal(reason).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status + b" ")
        assert f"Content-Length: {len(body)}".encode() in head
        assert json.loads(body) == {"error": reason}
