"""The kinds of refusal: each raise site says what kind of error it is."""

from __future__ import annotations

import ipaddress
import os

import pytest

from cmdserver.commands.portscan.command import checked_target
from cmdserver.commands.upload.engine import check_request
from cmdserver.errors import CommandError, Conflict, PathOutsideRoots, Refused, TooLarge
from cmdserver.policy import Policy, ScanPolicy


def test_every_kind_is_a_command_error_with_its_line():
    for kind in (Refused, Conflict, TooLarge):
        error = kind("nope")
        assert isinstance(error, CommandError)
        assert error.text == "Error: nope"
    assert issubclass(PathOutsideRoots, Refused)


def test_the_jail_refuses(tmp_path):
    with pytest.raises(Refused, match="outside allowed roots"):
        Policy([str(tmp_path)]).jail.stat("../x")


def test_a_scan_target_outside_the_allowlist_is_refused():
    with pytest.raises(Refused, match="target not allowed"):
        checked_target(ScanPolicy(), "example", [ipaddress.ip_address("192.0.2.1")])


def test_an_upload_over_the_limit_is_too_large():
    with pytest.raises(TooLarge, match="upload too large"):
        check_request("a", 11, "ab" * 32, 10)


def test_an_existing_target_is_a_conflict(tmp_path):
    from cmdserver.commands.upload.spool import open_spool

    (tmp_path / "there").write_bytes(b"x")
    with pytest.raises(Conflict, match="target exists: there"):
        open_spool(Policy([str(tmp_path)]), "there", 1, b"k" * 32, False, "run", os.writev)
