"""comphash of a file that changes under it: a clean error, never a wrong hash."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from typing import cast

import pytest

from cmdserver.commands.files import CHUNK, hash_file
from cmdserver.errors import CommandError
from cmdserver.policy import Policy


class ChangesFileOnFirstCheck:
    """Stands in for the cancel event; changes the file when first asked (mid-read)."""

    def __init__(self, path: str, change: str) -> None:
        self.path = path
        self.change = change
        self.done = False

    def is_set(self) -> bool:
        if not self.done:
            self.done = True
            if self.change == "truncate":
                os.truncate(self.path, CHUNK // 2)
            else:
                with open(self.path, "ab") as f:
                    f.write(b"more")
        return False


@pytest.fixture
def root() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "f.bin"), "wb") as f:
            f.write(os.urandom(3 * CHUNK + 5))
        yield d


@pytest.mark.parametrize("change", ["truncate", "append"])
def test_file_changed_while_hashed(root: str, change: str) -> None:
    event = ChangesFileOnFirstCheck(os.path.join(root, "f.bin"), change)
    with pytest.raises(CommandError, match="file changed while it was being hashed: f.bin"):
        hash_file(Policy([root]), "f.bin", "sha256", cast(threading.Event, event))


def test_stable_file_hash(root: str) -> None:
    class Never:
        def is_set(self) -> bool:
            return False

    with open(os.path.join(root, "f.bin"), "rb") as f:
        expected = hashlib.sha256(f.read()).hexdigest()
    assert hash_file(Policy([root]), "f.bin", "sha256", cast(threading.Event, Never())) == expected
