"""The jail, and the commands on it, under the rename race (tests/helpers/race.py).

- ``test_rename_race_*``: another thread swaps a directory of the root for a
  symlink that leads out, in a tight loop, while reads, listings, stats, uploads
  (unnamed and named temporary files), renames, removals, mkdir/rmdir and mode
  and time changes go through the jail on paths through that directory.  A
  fixed number of rounds, no timing: it asserts that nothing outside is ever
  read, listed, created or changed.
- ``test_every_interleaving_*``: ``ls``, ``comphash`` and ``upload``, and each
  operation of the jail itself, with the swap made before each of their system
  calls in turn (and back before each later one): deterministic, no threads.
  The code before the jail (``realpath``, then open the absolute name) got out
  of the jail in every one of the commands.  The threads find wide windows
  like that one; these find a window of a single system call (a check, then
  an open by name, put back into one operation, is caught here at once).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cmdserver.commands import files
from cmdserver.commands.upload.spool import open_spool
from cmdserver.policy import Policy
from tests.helpers.race import (
    INSIDE_SECRET,
    OUTSIDE_ONLY,
    OUTSIDE_SECRET,
    Interleaver,
    RaceLayout,
    Swapper,
)

ROUNDS = 200  # each round runs every operation once

try:
    from cmdserver.jail import Jail, have_openat2
except ImportError:  # the code before the jail: one way to resolve
    Jail = None  # type: ignore[assignment,misc]

    def have_openat2() -> bool:
        return False

RESOLVERS = ["openat2", "walk"] if Jail is not None else ["realpath"]


@pytest.fixture(params=RESOLVERS)
def resolver(request: Any, monkeypatch: Any) -> str:
    if request.param == "openat2" and not have_openat2():
        pytest.skip("this kernel has no openat2")
    if Jail is not None:
        monkeypatch.setattr(Jail, "use_openat2", request.param == "openat2")
    return request.param


@pytest.fixture
def layout(tmp_path: Any) -> Iterator[RaceLayout]:
    layout = RaceLayout(str(tmp_path))
    yield layout
    layout.close()


@pytest.fixture
def fast_switches() -> Iterator[None]:
    """Hand the GIL over often, so that the threads meet between any two steps."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(old)


def attempt(f: Callable[..., Any], *args: Any) -> Any:
    try:
        return f(*args)
    except Exception:  # noqa: BLE001 - refusals and errors are expected
        return None


def read(jail: Any, path: str) -> bytes | None:
    fd = attempt(lambda: jail.open_file(path))
    if fd is None:
        return None
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def upload(jail: Any, path: str, replace: bool) -> None:
    entry = attempt(lambda: jail.entry(path))
    if entry is None:
        return
    with entry:
        temp = attempt(lambda: entry.create_temp("0123abcd"))
    if temp is None:
        return
    os.write(temp.fd, b"written by the race")
    try:
        temp.publish(replace=replace)
    except OSError:
        temp.discard()


def rename(jail: Any, old: str, new: str) -> None:
    def move() -> None:
        with jail.entry(old) as a, jail.entry(new) as b:
            a.rename_to(b)
    attempt(move)


def on_entry(jail: Any, path: str, action: Callable[[Any], Any]) -> None:
    def act() -> None:
        with jail.entry(path) as entry:
            action(entry)
    attempt(act)


def on_node(jail: Any, path: str, action: Callable[[Any], Any]) -> None:
    def act() -> None:
        with jail.node(path) as node:
            action(node)
    attempt(act)


@pytest.mark.skipif(Jail is None, reason="the jail's own operations")
@pytest.mark.parametrize("tmpfile", [True, False], ids=["unnamed", "named"])
def test_rename_race_through_the_jail(layout: RaceLayout, resolver: str, tmpfile: bool,
                                      fast_switches: None) -> None:
    jail = Jail([layout.root], tmpfile=tmpfile)
    swapper = Swapper(layout)
    swapper.start()
    reads = listings = 0
    try:
        for _ in range(ROUNDS):
            data = read(jail, "d/secret")
            assert data != OUTSIDE_SECRET, "read a file outside the jail"
            reads += data == INSIDE_SECRET
            names = attempt(lambda: jail.list_dir("d")) or []
            scanned = attempt(lambda: jail.scan_dir("d")) or []
            assert OUTSIDE_ONLY not in names + [n for n, _ in scanned], "listed outside"
            listings += bool(names)
            attempt(lambda: jail.stat("d/secret"))
            attempt(lambda: jail.real_path("d/secret"))
            upload(jail, "d/new", replace=True)
            upload(jail, "d/secret", replace=False)
            rename(jail, "d/x", "d/x2")
            rename(jail, "d/x2", "d/x")
            on_entry(jail, "d/victim", lambda e: e.unlink())
            on_entry(jail, "d/made", lambda e: e.mkdir(0o700))
            on_entry(jail, "d/made", lambda e: e.rmdir())
            on_node(jail, "d/secret", lambda n: n.chmod(0o400))
            on_node(jail, "d/secret", lambda n: n.utime((5, 5)))
            assert layout.outside_unchanged(), "changed something outside"
            layout.put_inside("victim", b"victim")
            if "x2" in layout.inside():
                os.rename("x2", "x", src_dir_fd=layout.real_dir, dst_dir_fd=layout.real_dir)
    finally:
        swapper.stop()
    assert layout.outside_unchanged()
    assert sorted(os.listdir(layout.base)) == ["outside", "root"]
    assert swapper.swaps > 0 and reads > 0 and listings > 0  # the race really ran


def test_rename_race_through_the_commands(layout: RaceLayout, resolver: str,
                                          fast_switches: None) -> None:
    """``ls``, ``comphash`` and ``upload``'s file side against the same race."""
    policy = Policy([layout.root])
    never = threading.Event()
    key = b"k" * 32
    swapper = Swapper(layout)
    swapper.start()
    hashes = 0
    outside_hash = hashlib.sha256(OUTSIDE_SECRET).hexdigest()
    try:
        for n in range(ROUNDS):
            names = attempt(lambda: files.list_dir(policy, "d", never)) or []
            assert OUTSIDE_ONLY not in names, "ls listed a directory outside"
            digest = attempt(lambda: files.hash_file(policy, "d/secret", "sha256", never))
            assert digest != outside_hash, "comphash read a file outside"
            hashes += digest is not None
            data = b"uploaded %d" % n
            spool = attempt(open_spool, policy, f"d/up{n}", len(data), key, False, "0123abcd")
            if spool is not None:
                spool.write(memoryview(data), lambda: None)
                attempt(spool.publish, hmac.new(key, data, "sha256").digest())
                spool.discard()
            assert layout.outside_unchanged(), "changed something outside"
    finally:
        swapper.stop()
    assert layout.outside_unchanged()
    assert hashes > 0


class Commands:
    """One command at a time under every interleaving, on a fresh layout each."""

    def __init__(self, tmp_path: Any) -> None:
        self.tmp_path = tmp_path
        self.count = 0

    def escapes(self, operation: Callable[[Policy], Any],
                escaped: Callable[[Any], bool]) -> dict[int, str] | None:
        """The first schedule under which ``operation`` got out, or None."""
        self.count += 1
        base = self.tmp_path / f"run{self.count}"
        base.mkdir()
        layout = RaceLayout(str(base))
        try:
            policy = Policy([layout.root])
            interleaver = Interleaver(layout)
            results: list[Any] = []
            calls = interleaver.run(lambda: results.append(operation(policy)), {})
            assert results and not escaped(results[0]), "no swap: the operation must work"
            for plan in interleaver.schedules(calls):
                results.clear()
                interleaver.run(lambda: results.append(operation(policy)), plan)
                if (results and escaped(results[0])) or not layout.outside_unchanged():
                    return plan
                self.reset(layout)
            return None
        finally:
            layout.close()

    @staticmethod
    def reset(layout: RaceLayout) -> None:
        """Back to the start inside ``d``: what an operation made goes, what it
        removed or renamed comes back."""
        for name in os.listdir(layout.real_dir):
            if name.startswith("up"):
                st = os.stat(name, dir_fd=layout.real_dir, follow_symlinks=False)
                remove = os.rmdir if stat.S_ISDIR(st.st_mode) else os.unlink
                remove(name, dir_fd=layout.real_dir)
        layout.put_inside("x", b"x")
        layout.put_inside("victim", b"victim")


def test_every_interleaving_of_the_file_commands(tmp_path: Any, resolver: str) -> None:
    never = threading.Event()
    key = b"k" * 32
    data = b"uploaded"

    def upload_command(policy: Policy) -> None:
        spool = open_spool(policy, "d/up.bin", len(data), key, False, "0123abcd")
        try:
            spool.write(memoryview(data), lambda: None)
            spool.publish(hmac.new(key, data, "sha256").digest())
        finally:
            spool.discard()

    commands = Commands(tmp_path)
    escapes = {
        "ls": commands.escapes(lambda p: files.list_dir(p, "d", never),
                               lambda names: OUTSIDE_ONLY in names),
        "comphash": commands.escapes(
            lambda p: files.hash_file(p, "d/secret", "sha256", never),
            lambda digest: digest == hashlib.sha256(OUTSIDE_SECRET).hexdigest()),
        "upload": commands.escapes(upload_command, lambda _: False),
    }
    # Each command that got out, with the first schedule that let it: {call: "link"}.
    assert {name: plan for name, plan in escapes.items() if plan} == {}


@pytest.mark.skipif(Jail is None, reason="the jail's own operations")
@pytest.mark.parametrize("tmpfile", [True, False], ids=["unnamed", "named"])
def test_every_interleaving_of_the_jail_operations(tmp_path: Any, resolver: str,
                                                   tmpfile: bool) -> None:
    def jail_of(policy: Policy) -> Any:
        policy.jail.use_tmpfile = tmpfile
        return policy.jail

    def read_secret(policy: Policy) -> bytes | None:
        return read(jail_of(policy), "d/secret")

    def real(policy: Policy) -> str:
        return jail_of(policy).real_path("d/secret")

    def existing(policy: Policy) -> bytes:
        with jail_of(policy).entry("d/secret") as entry:
            fd = entry.open_existing()
        try:
            return os.read(fd, 100)
        finally:
            os.close(fd)

    def must_work(f: Callable[[Policy], Any]) -> Callable[[Policy], bool]:
        def run(policy: Policy) -> bool:
            f(policy)
            return True
        return run

    commands = Commands(tmp_path)
    inside = str(tmp_path)
    escapes = {
        "open_file": commands.escapes(read_secret, lambda data: data == OUTSIDE_SECRET),
        "list_dir": commands.escapes(lambda p: jail_of(p).list_dir("d"),
                                     lambda names: OUTSIDE_ONLY in names),
        "scan_dir": commands.escapes(lambda p: [n for n, _ in jail_of(p).scan_dir("d")],
                                     lambda names: OUTSIDE_ONLY in names),
        "real_path": commands.escapes(real, lambda path: "/outside/" in path[len(inside):]),
        "open_existing": commands.escapes(existing, lambda data: data == OUTSIDE_SECRET),
        "upload": commands.escapes(must_work(lambda p: upload(jail_of(p), "d/up", True)),
                                   lambda _: False),
        "rename": commands.escapes(must_work(lambda p: rename(jail_of(p), "d/x", "d/up")),
                                   lambda _: False),
        "unlink": commands.escapes(
            must_work(lambda p: on_entry(jail_of(p), "d/victim", lambda e: e.unlink())),
            lambda _: False),
        "mkdir": commands.escapes(
            must_work(lambda p: on_entry(jail_of(p), "d/up", lambda e: e.mkdir(0o700))),
            lambda _: False),
        "chmod": commands.escapes(
            must_work(lambda p: on_node(jail_of(p), "d/secret", lambda n: n.chmod(0o400))),
            lambda _: False),
        "utime": commands.escapes(
            must_work(lambda p: on_node(jail_of(p), "d/secret", lambda n: n.utime((5, 5)))),
            lambda _: False),
    }
    assert {name: plan for name, plan in escapes.items() if plan} == {}
