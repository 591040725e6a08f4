"""The tree stays ruff clean and type-checks with mypy (both are test dependencies)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    done = subprocess.run([ruff, "check", "--no-cache", str(PROJECT)], capture_output=True,
                          text=True, cwd=PROJECT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean():
    pytest.importorskip("mypy")
    pytest.importorskip("mypy_zope")
    # The configuration (files, plugins) is [tool.mypy] in pyproject.toml.
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental",
                           "--cache-dir", os.devnull],
                          capture_output=True, text=True, cwd=PROJECT, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
