"""The file jail: what resolves inside the roots and what is refused."""

from __future__ import annotations

import os

import pytest

from cmdserver.errors import CommandError, PathOutsideRoots
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


def test_relative_paths_start_at_the_first_root(jail):
    root, _ = jail
    policy = Policy([str(root)])
    assert policy.resolve("sub/f.txt") == os.path.realpath(root / "sub" / "f.txt")
    assert policy.resolve(None) == os.path.realpath(root)
    assert policy.resolve("") == os.path.realpath(root)
    assert policy.resolve(".") == os.path.realpath(root)


def test_absolute_path_inside_a_root(jail):
    root, _ = jail
    assert Policy([str(root)]).resolve(str(root / "sub")) == os.path.realpath(root / "sub")


@pytest.mark.parametrize("path", ["..", "../other/secret", "sub/../../other", "/etc/passwd",
                                  "/", "sub/../.."])
def test_escapes_are_refused(jail, path):
    root, _ = jail
    with pytest.raises(PathOutsideRoots) as e:
        Policy([str(root)]).resolve(path)
    assert e.value.text == "Error: path outside allowed roots"


def test_symlink_leading_out_is_refused(jail):
    root, other = jail
    os.symlink(other, root / "escape")
    os.symlink(other / "secret", root / "sub" / "link")
    policy = Policy([str(root)])
    for path in ("escape", "escape/secret", "sub/link"):
        with pytest.raises(PathOutsideRoots):
            policy.resolve(path)


def test_symlink_inside_the_root_is_fine(jail):
    root, _ = jail
    os.symlink(root / "sub" / "f.txt", root / "alias")
    assert Policy([str(root)]).resolve("alias") == os.path.realpath(root / "sub" / "f.txt")


def test_second_root_by_absolute_path(jail):
    root, other = jail
    policy = Policy([str(root), str(other)])
    assert policy.resolve(str(other / "secret")) == os.path.realpath(other / "secret")
    with pytest.raises(PathOutsideRoots):
        policy.resolve("../other/x/../../..")


def test_sibling_with_a_common_prefix_is_outside(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root2").mkdir()
    with pytest.raises(PathOutsideRoots):
        Policy([str(tmp_path / "root")]).resolve(str(tmp_path / "root2"))


def test_nul_byte(jail):
    root, _ = jail
    with pytest.raises(CommandError) as e:
        Policy([str(root)]).resolve("a\0b")
    assert e.value.text == "Error: invalid path: NUL byte"


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
