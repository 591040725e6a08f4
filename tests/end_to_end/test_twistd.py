"""The installed package as an operator meets it: the twistd plugin, a real daemon process."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]
SITE = sysconfig.get_paths()["purelib"]
TWISTD = ["-c", "from twisted.scripts.twistd import run; run()"]  # the twistd script


def isolated_env(path_first: str) -> dict[str, str]:
    """Run Python with ``path_first`` ahead of the venv's packages and no .pth files,
    so the editable install of the work tree cannot be what gets found."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([path_first, SITE])
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A plain (non-editable) ``pip install .`` into a target directory."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    src = build / "src"
    shutil.copytree(PROJECT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.egg-info", "build", "__pycache__", "cmdserver-data"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(src)],
        check=True, capture_output=True, timeout=300,
    )
    return target


def list_plugins(target: Path) -> str:
    code = ("from twisted.plugin import getPlugins; "
            "from twisted.application.service import IServiceMaker; "
            "print(sorted(p.tapname for p in getPlugins(IServiceMaker)))")
    done = subprocess.run([sys.executable, "-S", "-c", code], env=isolated_env(str(target)),
                          capture_output=True, text=True, timeout=60, check=True)
    return done.stdout


def test_plain_install_has_the_plugin_and_no_package_init(installed):
    plugins = installed / "twisted" / "plugins"
    assert (plugins / "cmdserver_plugin.py").is_file()
    assert not (plugins / "__init__.py").exists()
    assert not (installed / "twisted" / "__init__.py").exists()
    assert "'cmdserver'" in list_plugins(installed)


def test_a_stale_dropin_cache_breaks_nothing(installed):
    cache = installed / "twisted" / "plugins" / "dropin.cache"
    cache.write_bytes(b"\x80\x04garbage, not a pickle")
    output = list_plugins(installed)
    assert "'cmdserver'" in output
    assert "'conch'" in output  # Twisted's own plugins are still there


def test_twistd_help_documents_every_option(installed):
    done = subprocess.run([sys.executable, "-S", *TWISTD, "cmdserver", "--help"],
                          env=isolated_env(str(installed)), capture_output=True, text=True,
                          timeout=60, check=True)
    for option in ("--line", "--data-dir", "--root", "--max-clients", "--max-per-ip",
                   "--idle-timeout", "--max-line", "--log-source", "--config", "--audit-log"):
        assert option in done.stdout


def test_twistd_rejects_bad_values_before_listening(tmp_path):
    done = subprocess.run([sys.executable, *TWISTD, "-n", "cmdserver", "--max-line",
                           "zero", "--data-dir", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert "--max-line: 'zero' is not a whole number" in done.stdout + done.stderr
    assert not (tmp_path / "d").exists()


def test_the_daemon_runs_serves_and_stops_on_sigterm():
    tmp = tempfile.mkdtemp(prefix="cmdd", dir="/tmp")  # short: AF_UNIX paths are limited
    try:
        sock = os.path.join(tmp, "line.sock")
        daemon = subprocess.Popen(
            [sys.executable, *TWISTD, "-n", "--pidfile=", "cmdserver", "--line",
             f"unix:{sock}", "--ssh", "none", "--pb", "none", "--http", "none",
             "--data-dir", os.path.join(tmp, "data")],
            cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        assert daemon.stdout is not None
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(sock):
                assert daemon.poll() is None, daemon.stdout.read().decode()
                assert time.monotonic() < deadline, "the daemon did not start"
                time.sleep(0.05)
            client = socket.socket(socket.AF_UNIX)
            client.settimeout(10)
            client.connect(sock)
            client.sendall(b"ping\nexit\n")
            data = b""
            while chunk := client.recv(4096):
                data += chunk
            assert data.endswith(b"pong\r\nbye !\r\n")
            daemon.send_signal(signal.SIGTERM)
            # twistd shuts down cleanly, then exits by the signal that stopped it.
            assert daemon.wait(timeout=30) in (0, -signal.SIGTERM)
            log = daemon.stdout.read().decode()
            assert "line door listening on" in log
            assert "Main loop terminated." in log
            assert "Traceback" not in log
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            daemon.stdout.close()
        assert os.stat(os.path.join(tmp, "data")).st_mode & 0o777 == 0o700
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
