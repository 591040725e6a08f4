#!/usr/bin/env python3
"""bench/jail: what the file jail costs per operation, in process.

Side by side in one run, on the same tree (a file five directories deep, a
symlink inside the root on the way): the code before the jail
(``os.path.realpath``, the containment check, then ``open`` of the absolute
name, ``fstat``), the jail with the kernel's ``openat2`` and the jail with its
descriptor walk.  Each is timed opening the file for reading, listing its
directory and ``stat``; uploads (an entry, a temporary file, publish) are timed
unnamed (``O_TMPFILE``) and named.  Microseconds per operation, best of five
rounds; last line: the jail's open with openat2 as a multiple of the old one.

    .venv/bin/python bench/jail.py [--rounds 5] [--count 20000]
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine  # noqa: E402  (bench/ is the script's directory)

from cmdserver.jail import Jail, have_openat2  # noqa: E402

PATH = "a/b/link/d/f.txt"  # link -> c: a symlink inside the root, followed


def best(f: Callable[[], object], count: int, rounds: int) -> float:
    """Microseconds per call, best of ``rounds`` rounds of ``count`` calls."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(count):
            f()
        times.append(time.perf_counter() - started)
    return min(times) / count * 1e6


def old_open(root: str, path: str) -> int:
    real = os.path.realpath(os.path.join(root, path))
    if not (real == root or real.startswith(root + os.sep)):
        raise PermissionError(path)
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise OSError(path)
    return fd


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000)
    args = parser.parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.realpath(tmp)
        os.makedirs(os.path.join(root, "a", "b", "c", "d"))
        os.symlink("c", os.path.join(root, "a", "b", "link"))
        with open(os.path.join(root, PATH), "w") as f:
            f.write("x")
        directory = os.path.dirname(PATH)
        jails = {"walk": Jail([root], openat2=False)}
        if have_openat2():
            jails = {"openat2": Jail([root], openat2=True), **jails}
        n, r = args.count, args.rounds
        rows: dict[str, dict[str, float]] = {"before the jail": {
            "open": best(lambda: os.close(old_open(root, PATH)), n, r),
            "list": best(lambda: os.listdir(old_dir(root, directory)), n, r),
            "stat": best(lambda: os.stat(old_dir(root, PATH)), n, r),
        }}
        for name, jail in jails.items():
            rows[f"jail, {name}"] = {
                "open": best(lambda j=jail: os.close(j.open_file(PATH)), n, r),
                "list": best(lambda j=jail: j.list_dir(directory), n, r),
                "stat": best(lambda j=jail: j.stat(PATH), n, r),
            }
        print(f"{'microseconds per call':<24}{'open':>8}{'list':>8}{'stat':>8}")
        for name, row in rows.items():
            print(f"{name:<24}{row['open']:>8.1f}{row['list']:>8.1f}{row['stat']:>8.1f}")
        jail = next(iter(jails.values()))
        for unnamed in (True, False):
            jail.use_tmpfile = unnamed
            upload = best(lambda j=jail: put(j), n // 10, r)
            print(f"upload of 0 bytes, {'unnamed' if unnamed else 'named'} temporary file: "
                  f"{upload:.1f} us")
        first = next(iter(jails))
        ratio = rows[f"jail, {first}"]["open"] / rows["before the jail"]["open"]
        print(f"jail open ({first}) / open before the jail: {ratio:.2f}")


def old_dir(root: str, path: str) -> str:
    real = os.path.realpath(os.path.join(root, path))
    if not (real == root or real.startswith(root + os.sep)):
        raise PermissionError(path)
    return real


def put(jail: Jail) -> None:
    with jail.entry("a/b/c/new.bin") as entry:
        temp = entry.create_temp("0123abcd")
    temp.publish(replace=True)


if __name__ == "__main__":
    main()
