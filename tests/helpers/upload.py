"""Shared pieces for the upload tests: a core with the upload command, MACs, waiting."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import tempfile
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, inlineCallbacks

from cmdserver.commands import default_registry
from cmdserver.commands.base import Context, ListSink
from cmdserver.commands.lastlog import LogSource
from cmdserver.commands.upload.command import UploadCommand
from cmdserver.commands.upload.engine import Uploads, UploadSettings
from cmdserver.commands.upload.spool import TEMP_MARK
from cmdserver.core import CommandCore
from cmdserver.policy import Policy

KEY = bytes(range(32))


def temp_dir(test) -> str:
    """A fresh directory for one test, removed after it (outside the work tree)."""
    path = os.path.realpath(tempfile.mkdtemp(prefix="cmdserver-upload-test-"))
    test.addCleanup(shutil.rmtree, path, True)
    return path


def mac_of(data: bytes, key: bytes = KEY) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def make_core(root: str, writer: Callable | None = None, max_upload: int = 1 << 30,
              overwrite: bool = False) -> tuple[CommandCore, Uploads]:
    """A real core (global reactor, real thread pool) with the upload command."""
    uploads = Uploads(UploadSettings(max_upload, overwrite), KEY,
                      **({"writer": writer} if writer is not None else {}))
    registry = default_registry(LogSource(os.devnull))
    registry.add(UploadCommand(uploads))
    return CommandCore(registry, Policy([root]), reactor), uploads


def context(core: CommandCore) -> Context:
    return Context(core, user="anonymous", peer="test", door="test", out=ListSink())


def leftovers(root: str) -> list[str]:
    """Every temporary upload file under ``root``."""
    found = []
    for dirpath, _dirs, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if TEMP_MARK in f]
    return found


def listing(root: str) -> list[str]:
    return sorted(os.listdir(root))


@inlineCallbacks
def wait_until(predicate: Callable[[], bool],
               limit: float = 20.0) -> Generator[Deferred[Any], Any, None]:
    """Let the reactor run until ``predicate()`` holds (a safety net, not a timing test)."""
    waited = 0.0
    while not predicate():
        if waited > limit:
            raise AssertionError("condition never became true")
        yield task.deferLater(reactor, 0.005, lambda: None)
        waited += 0.005


@inlineCallbacks
def settle(uploads: Uploads) -> Generator[Deferred[Any], Any, None]:
    """Wait until every upload in flight has finished and cleaned up."""
    yield wait_until(lambda: not uploads.active)
