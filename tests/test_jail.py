"""The file jail (cmdserver/jail.py): what resolves inside the roots, what is refused,
and the operations on files, directories and entries.  Every test runs with the
kernel's openat2 (where there is one) and with the component-by-component walk."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from cmdserver.errors import CommandError, PathOutsideRoots, Refused, RootProtected
from cmdserver.jail import Jail, ReservedName, have_openat2, temp_name

RESOLVERS = ["openat2", "walk"]


@pytest.fixture(params=RESOLVERS)
def resolver(request):
    if request.param == "openat2" and not have_openat2():
        pytest.skip("this kernel has no openat2")
    return request.param


@pytest.fixture
def tree(tmp_path):
    base = tmp_path.resolve()
    root = base / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f.txt").write_text("x")
    other = base / "other"
    other.mkdir()
    (other / "secret").write_text("s")
    return root, other


@pytest.fixture
def make(resolver):
    def make(*roots, tmpfile=None):
        return Jail([str(r) for r in roots], openat2=resolver == "openat2", tmpfile=tmpfile)
    return make


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_relative_paths_start_at_the_first_root(tree, make):
    root, _ = tree
    jail = make(root)
    assert jail.real_path("sub/f.txt") == str(root / "sub" / "f.txt")
    for path in (None, "", ".", "sub/..", "./sub/../."):
        assert jail.real_path(path) == str(root)


def test_absolute_path_inside_a_root(tree, make):
    root, _ = tree
    jail = make(root)
    assert jail.real_path(str(root / "sub")) == str(root / "sub")
    assert jail.real_path(f"{root}/./sub/../sub//f.txt") == str(root / "sub" / "f.txt")


@pytest.mark.parametrize("path", ["..", "../other/secret", "sub/../../other", "/etc/passwd",
                                  "/", "sub/../..", "../root/sub"])
def test_escapes_are_refused(tree, make, path):
    root, _ = tree
    jail = make(root)
    for operation in (jail.real_path, jail.stat, jail.lstat, jail.open_file, jail.list_dir,
                      jail.node, jail.entry):
        with pytest.raises(PathOutsideRoots) as e:
            operation(path)
        assert e.value.text == "Error: path outside allowed roots"


def test_symlinks_leading_out_are_refused(tree, make):
    root, other = tree
    os.symlink(other, root / "escape")  # absolute
    os.symlink("../../other/secret", root / "sub" / "link")  # relative
    os.symlink("..", root / "up")
    os.symlink("sub/link", root / "chain")  # a link to a link that leads out
    jail = make(root)
    for path in ("escape", "escape/secret", "sub/link", "up", "up/other/secret", "chain"):
        with pytest.raises(PathOutsideRoots):
            jail.open_file(path) if "secret" in path or "link" in path else jail.list_dir(path)
        with pytest.raises(PathOutsideRoots):
            jail.stat(path)
    # Through an entry's parent too.
    with pytest.raises(PathOutsideRoots):
        jail.entry("escape/new")
    # The link itself is inside: it can be looked at and removed.
    assert stat.S_ISLNK(jail.lstat("escape").st_mode)
    with jail.entry("escape") as entry:
        entry.unlink()
    assert not os.path.lexists(root / "escape") and (other / "secret").exists()


def test_symlinks_inside_the_root_are_followed(tree, make):
    root, _ = tree
    os.symlink(root / "sub" / "f.txt", root / "absolute")
    os.symlink("sub/f.txt", root / "relative")
    os.symlink(root / "sub", root / "dir")
    os.symlink("../sub/./f.txt", root / "sub" / "sibling")
    jail = make(root)
    for path in ("absolute", "relative", "dir/f.txt", "sub/sibling", "dir/sibling"):
        assert jail.real_path(path) == str(root / "sub" / "f.txt"), path
        fd = jail.open_file(path)
        try:
            assert os.read(fd, 10) == b"x"
        finally:
            os.close(fd)
    assert jail.list_dir("dir") == ["f.txt", "sibling"]


def test_symlink_into_another_root(tree, make):
    root, other = tree
    os.symlink(other / "secret", root / "there")
    assert make(root, other).real_path("there") == str(other / "secret")
    with pytest.raises(PathOutsideRoots):
        make(root).real_path("there")


def test_symlink_loop(tree, make):
    root, _ = tree
    os.symlink("b", root / "a")
    os.symlink("a", root / "b")
    with pytest.raises(OSError) as e:
        make(root).stat("a")
    assert e.value.errno == errno.ELOOP


def test_second_root_by_absolute_path(tree, make):
    root, other = tree
    jail = make(root, other)
    assert jail.real_path(str(other / "secret")) == str(other / "secret")
    with pytest.raises(PathOutsideRoots):
        jail.real_path("../other/x/../../..")
    with pytest.raises(PathOutsideRoots):
        jail.real_path(f"{other}/..")


def test_nested_roots_are_entered_at_the_outermost(tree, make):
    root, _ = tree
    jail = make(root / "sub", root)
    assert jail.real_path(f"{root}/sub/../sub/f.txt") == str(root / "sub" / "f.txt")
    # A root is never removed, renamed or replaced, even through another root.
    with jail.entry(f"{root}/sub") as entry:
        with pytest.raises(RootProtected):
            entry.rmdir()
        with jail.entry("moved") as target, pytest.raises(RootProtected):
            entry.rename_to(target)
    assert (root / "sub" / "f.txt").exists()


def test_sibling_with_a_common_prefix_is_outside(tmp_path, make):
    (tmp_path / "root").mkdir()
    (tmp_path / "root2").mkdir()
    with pytest.raises(PathOutsideRoots):
        make(tmp_path / "root").real_path(str(tmp_path / "root2"))


def test_nul_byte(tree, make):
    root, _ = tree
    jail = make(root)
    for operation in (jail.real_path, jail.open_file, jail.entry):
        with pytest.raises(CommandError) as e:
            operation("a\0b")
        assert e.value.text == "Error: invalid path: NUL byte"


def test_needs_a_root():
    with pytest.raises(ValueError):
        Jail([])


def test_missing_paths(tree, make):
    root, _ = tree
    jail = make(root)
    # REALPATH of a name about to be created: the last component may be missing.
    assert jail.real_path("sub/new") == str(root / "sub" / "new")
    for operation in (jail.stat, jail.open_file, jail.list_dir):
        with pytest.raises(FileNotFoundError):
            operation("sub/new")
    with pytest.raises(FileNotFoundError):
        jail.real_path("nope/new")
    with pytest.raises(NotADirectoryError):
        jail.stat("sub/f.txt/x")
    with pytest.raises(NotADirectoryError):
        jail.entry("sub/f.txt/x")


def test_open_file_only_opens_regular_files(tree, make):
    root, _ = tree
    os.mkfifo(root / "fifo")
    jail = make(root)
    fd = jail.open_file("sub/f.txt")
    try:
        assert os.get_blocking(fd) and os.read(fd, 10) == b"x"
    finally:
        os.close(fd)
    with pytest.raises(IsADirectoryError):
        jail.open_file("sub")
    with pytest.raises(CommandError) as e:
        jail.open_file("fifo")  # refused from the resolved descriptor: never opened
    assert e.value.message == "not a regular file: fifo"


def test_upload_temporary_files_are_not_part_of_the_jail(tree, make):
    root, _ = tree
    temp = temp_name("f.txt", "0123abcd")
    (root / "sub" / temp).write_text("partial")
    os.symlink(temp, root / "sub" / "alias")
    jail = make(root)
    assert jail.list_dir("sub") == ["alias", "f.txt"]
    assert [name for name, _ in jail.scan_dir("sub")] == ["alias", "f.txt"]
    for operation in (jail.open_file, jail.stat, jail.entry, jail.node):
        with pytest.raises(ReservedName):
            operation(f"sub/{temp}")
    with pytest.raises(ReservedName):
        jail.open_file("sub/alias")  # not through a symlink either


def test_scan_dir_gives_each_entrys_lstat(tree, make):
    root, _ = tree
    os.symlink("sub", root / "link")
    found = dict(make(root).scan_dir("."))
    assert sorted(found) == ["link", "sub"]
    assert stat.S_ISLNK(found["link"].st_mode) and stat.S_ISDIR(found["sub"].st_mode)
    targets: dict[str, str] = {}  # the symlinks' targets, if asked for
    assert [name for name, _ in make(root).scan_dir(".", targets)] == ["link", "sub"]
    assert targets == {"link": "sub"}


def test_entries(tree, make):
    root, _ = tree
    jail = make(root)
    with jail.entry("sub/new") as entry:
        assert entry.name == "new" and entry.lstat() is None
        entry.mkdir(0o700)
        assert stat.S_ISDIR(entry.lstat().st_mode)
        entry.rmdir()
    with jail.entry("sub/../sub/f.txt") as f, jail.entry("g.txt") as g:
        f.rename_to(g)
    assert (root / "g.txt").read_text() == "x"
    (root / "h.txt").write_text("h")
    with jail.entry("g.txt") as g, jail.entry("h.txt") as h:
        with pytest.raises(FileExistsError):
            g.rename_to(h)  # never replaces unless asked
        assert (root / "h.txt").read_text() == "h"
        g.rename_to(h, replace=True)
    assert (root / "h.txt").read_text() == "x"
    for path in (".", "", "sub/..", str(root)):
        with pytest.raises(RootProtected):
            jail.entry(path)
    with jail.entry("sub") as sub, pytest.raises(IsADirectoryError):
        sub.unlink()


def test_a_root_keeps_its_mode(tree, make):
    root, _ = tree
    os.chmod(root, 0o755)
    os.symlink(".", root / "self")
    jail = make(root)
    for path in (".", "self", str(root)):
        with jail.node(path) as node, pytest.raises(RootProtected) as e:
            node.chmod(0o700)
        assert isinstance(e.value, Refused)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    with jail.node("sub/f.txt") as node:
        node.chmod(0o400)
        node.utime((1000, 2000))
    st = os.stat(root / "sub" / "f.txt")
    assert (stat.S_IMODE(st.st_mode), st.st_mtime) == (0o400, 2000)


@pytest.mark.parametrize("tmpfile", [True, False])
def test_temporary_files(tree, make, tmpfile):
    root, _ = tree
    jail = make(root, tmpfile=tmpfile)
    if tmpfile and not jail.use_tmpfile:
        pytest.skip("no O_TMPFILE here")
    fds = open_fds()
    with jail.entry("sub/new.bin") as entry:
        temp = entry.create_temp("0123abcd")
    assert temp.unnamed == tmpfile
    os.write(temp.fd, b"data")
    visible = sorted(os.listdir(root / "sub"))
    assert len(visible) == (1 if tmpfile else 2)  # f.txt, and a named temp file
    temp.publish(replace=False)
    assert (root / "sub" / "new.bin").read_bytes() == b"data"
    assert sorted(os.listdir(root / "sub")) == ["f.txt", "new.bin"]
    # Not over an existing file unless asked; a refused publish keeps the file to drop.
    with jail.entry("sub/new.bin") as entry:
        temp = entry.create_temp("0123abcd")
    os.write(temp.fd, b"other")
    with pytest.raises(FileExistsError):
        temp.publish(replace=False)
    temp.discard()
    assert sorted(os.listdir(root / "sub")) == ["f.txt", "new.bin"]
    with jail.entry("sub/new.bin") as entry:
        temp = entry.create_temp("0123abcd")
    os.write(temp.fd, b"replaced")
    temp.publish(replace=True)
    assert (root / "sub" / "new.bin").read_bytes() == b"replaced"
    assert sorted(os.listdir(root / "sub")) == ["f.txt", "new.bin"]
    assert open_fds() == fds


@pytest.mark.parametrize("tmpfile", [True, False])
def test_renaming_the_directory_of_an_open_upload_loses_nothing(tree, make, tmpfile):
    root, _ = tree
    jail = make(root, tmpfile=tmpfile)
    with jail.entry("sub/new.bin") as entry:
        temp = entry.create_temp("0123abcd")
    os.write(temp.fd, b"data")
    os.rename(root / "sub", root / "moved")
    temp.publish(replace=True)
    assert sorted(os.listdir(root / "moved")) == ["f.txt", "new.bin"]
    with jail.entry("moved/other.bin") as entry:
        temp = entry.create_temp("0123abcd")
    os.rename(root / "moved", root / "again")
    temp.discard()  # dropped: no file left behind under any name
    assert sorted(os.listdir(root / "again")) == ["f.txt", "new.bin"]


def test_no_descriptor_is_left_open(tree, make):
    root, other = tree
    os.symlink(other, root / "escape")
    os.symlink(root / "sub", root / "dir")
    jail = make(root)
    fds = open_fds()
    for path in ("sub/f.txt", "dir/f.txt", "escape/secret", "nope", "sub/f.txt/x", "..",
                 "dir/../sub/f.txt"):
        for operation in (jail.stat, jail.lstat, jail.real_path, jail.list_dir):
            try:
                operation(path)
            except (OSError, CommandError):
                pass
    assert open_fds() == fds
