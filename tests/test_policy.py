"""Policy: the roots (resolution itself is tested in tests/test_jail.py) and how the
audit log names paths."""

from __future__ import annotations

import os

import pytest

from cmdserver.policy import Policy


@pytest.fixture
def jail(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f.txt").write_text("x")
    other = tmp_path / "other"
    other.mkdir()
    (other / "secret").write_text("s")
    return root, other


def test_roots_are_real_paths_and_the_jail_holds_them(tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    policy = Policy([str(tmp_path / "alias")])
    assert policy.roots == [os.path.realpath(tmp_path / "real")]
    assert policy.jail.roots == policy.roots  # what the jail resolves in (tests/test_jail.py)


def test_needs_a_root():
    with pytest.raises(ValueError):
        Policy([])


def test_jail_path_names_a_path_as_the_jail_sees_it(jail):
    root, other = jail
    policy = Policy([str(root), str(other)])
    real_root, real_other = os.path.realpath(root), os.path.realpath(other)
    assert policy.jail_path("sub/f.txt") == "sub/f.txt"
    assert policy.jail_path(f"{real_root}/sub/../sub/f.txt") == "sub/f.txt"
    assert policy.jail_path(real_root) == "."
    assert policy.jail_path("") == "."
    assert policy.jail_path(f"{real_other}/secret") == "root2:secret"
    assert policy.jail_path(real_other) == "root2:."
    assert policy.jail_path("../outside") is None
    assert policy.jail_path("/etc/passwd") is None
    assert policy.jail_path("a\0b") is None
