"""The fleet suite's fixtures: 20 cmdserver daemons and the fleet tools.

Run with ``.venv/bin/python -m pytest tests/fleet`` (the default run skips this
directory).  The first run makes the tools' virtualenv (tests/fleet/toolenv.py,
a minute or two); later runs reuse it.  Everything is on loopback; every tool
run has a timeout, and the daemons are stopped by their pids at the end.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fleet import toolenv
from tests.fleet.cluster import Fleet, Result, ssh_all

HOSTS = 20
# A declared command that outlives its deadline: `ssh host nap` exits with 124.
CONFIG = """\
[commands.nap]
summary = "Sleep past the deadline (the fleet suite's exit status 124)"
argv = ["/bin/sleep", "30"]
timeout = 1
"""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "after_all: run after every other fleet test")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("after_all") is not None)


@pytest.fixture(scope="session")
def tools() -> Path:
    if shutil.which("ssh") is None:
        pytest.skip("OpenSSH's ssh client is not installed")
    return toolenv.ensure()


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if shutil.which("ssh") is None:
        pytest.skip("OpenSSH's ssh client is not installed")
    workdir = tmp_path_factory.mktemp("fleet")
    config = workdir / "cmdserver.toml"
    config.write_text(CONFIG)
    fleet = Fleet(workdir, HOSTS, cost=4, args=["--config", str(config)])
    fleet.start()
    try:
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="session")
def plain(fleet: Fleet) -> dict[str, Result]:
    """``ssh host ls`` on every host: what every tool must print."""
    return ssh_all(fleet, "ls")


@pytest.fixture(scope="session")
def plain_tty(fleet: Fleet) -> dict[str, Result]:
    """``ssh -tt host ls``: what a tool with a terminal must print."""
    return ssh_all(fleet, "ls", tty=True)


def python_can_import(tools: Path, module: str) -> str | None:
    """None if the tools' Python imports ``module``, else the error's last line."""
    done = subprocess.run([str(tools / "bin" / "python"), "-c", f"import {module}"],
                          capture_output=True, text=True, timeout=60)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]
