"""The fleet tools' own virtualenv: made once, reused between runs.

Ansible (``ansible-core``), parallel-ssh (with both of its clients: libssh2
through ssh2-python, libssh through ssh-python) and Fabric, from
``tests/fleet/requirements.txt``, installed with pip into
``$CMDSERVER_FLEET_TOOLS`` if set, else ``~/.cache/cmdserver/fleet-tools-HASH``
(``$XDG_CACHE_HOME`` is honoured); HASH follows the requirements and the Python
version, so a change makes a fresh one.  They never go into the project's
virtualenv: Ansible alone brings some twenty packages.

If parallel-ssh cannot be installed with its libssh client (ssh-python has no
wheel for this platform and does not build), the rest is installed without it
and :func:`missing` says why; the tests of that client skip.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
READY = ".cmdserver-ready"
MISSING = ".cmdserver-missing"
# What parallel-ssh needs besides itself when ssh-python will not install.
WITHOUT_LIBSSH = ["ansible-core>=2.16", "fabric>=3.2", "gevent", "ssh2-python"]


def location() -> Path:
    given = os.environ.get("CMDSERVER_FLEET_TOOLS")
    if given:
        return Path(given)
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + sys.version.encode()).hexdigest()[:10]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "cmdserver" / f"fleet-tools-{digest}"


def ensure(log: bool = True) -> Path:
    """The tools' virtualenv, made (a minute or two, once) if it is not there yet."""
    where = location()
    if (where / READY).exists():
        return where
    where.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{where}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time (the suite, the bench)
        if (where / READY).exists():
            return where
        if log:
            print(f"fleet tools: making {where} (once)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(where)], check=True,
                       timeout=300)
        pip = [str(where / "bin" / "python"), "-m", "pip", "install", "-q",
               "--disable-pip-version-check"]
        done = subprocess.run([*pip, "-r", str(REQUIREMENTS)], capture_output=True,
                              text=True, timeout=1200)
        if done.returncode != 0:
            # Most likely ssh-python (parallel-ssh's libssh client): do without it.
            subprocess.run([*pip, *WITHOUT_LIBSSH], check=True, timeout=1200)
            subprocess.run([*pip, "--no-deps", "parallel-ssh"], check=True, timeout=600)
            reason = done.stderr.strip().splitlines()[-1:] or ["pip failed"]
            (where / MISSING).write_text(f"pssh-libssh: {reason[0]}\n")
        (where / READY).write_text("ok\n")
    return where


def missing(where: Path) -> dict[str, str]:
    """Tools that could not be installed here, with pip's reason."""
    try:
        text = (where / MISSING).read_text()
    except FileNotFoundError:
        return {}
    return dict(row.split(": ", 1) for row in text.splitlines() if ": " in row)


if __name__ == "__main__":
    print(ensure())
