"""PB uploads through the daemon's real upload engine, as makeService wires it.

Skipped where the build has no upload engine (``cmdserver.commands.upload.engine``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any

import pytest
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.spread import pb
from twisted.trial import unittest

from cmdserver import client, tap

pytest.importorskip("cmdserver.commands.upload.engine")
server_key = pytest.importorskip("cmdserver.commands.upload.key").server_key


class RealUploadTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.tmp = tempfile.mkdtemp(prefix="cmdserver-pb-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.data = os.path.join(self.tmp, "data")
        self.root = os.path.join(self.tmp, "files")
        os.makedirs(self.root)
        options = tap.Options()
        fast_bcrypt = ["--bcrypt-cost", "4"] if "bcrypt-cost" in tap.SETTINGS else []
        other_doors_off = [arg for name in ("ssh", "http") if name in tap.SETTINGS
                           for arg in (f"--{name}", "none")]
        options.parseOptions([*other_doors_off, "--data-dir", self.data, "--root", self.root,
                              "--line", "none",
                              "--pb", "tcp:0:interface=127.0.0.1", "--audit-log", "none",
                              "--log-source", os.devnull, *fast_bcrypt])
        self.service = tap.makeService(options)
        first_run = os.path.join(self.data, "initial-admin-password")
        if os.path.exists(first_run):  # the daemon's own users: its first admin
            with open(first_run) as f:
                self.login = ("admin", f.read().strip())
        else:
            self.login = ("ops", "pw")
            self.service.portal.registerChecker(
                InMemoryUsernamePasswordDatabaseDontUse(ops=b"pw"))
        self.service.startService()
        self.addCleanup(self.service.stopService)
        [door] = [d for d in self.service.doors if d.door == "pb"]
        self.port = (yield door.listening).getHost().port
        self.key = server_key(self.data)

    def local(self, data: bytes) -> str:
        path = os.path.join(self.tmp, "local")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def names(self) -> list[str]:
        return sorted(os.listdir(self.root))

    @defer.inlineCallbacks
    def test_good_and_bad_hmac(self) -> Any:
        data = os.urandom(1_500_000)
        session = yield client.connect("127.0.0.1", self.port, *self.login)
        self.addCleanup(session.close)
        result = yield session.upload_file(self.local(data), "big.bin", self.key)
        self.assertEqual((result["size"], result["sha256"]),
                         (len(data), hashlib.sha256(data).hexdigest()))
        with open(os.path.join(self.root, "big.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        e = yield self.assertFailure(
            session.upload_file(self.local(b"payload"), "bad.bin", b"wrong key " * 4),
            client.RemoteCommandError)
        self.assertEqual(str(e), "HMAC mismatch, upload discarded")
        self.assertEqual(self.names(), ["big.bin"])

    @defer.inlineCallbacks
    def test_disconnect_mid_way_leaves_nothing(self) -> Any:
        factory = pb.PBClientFactory()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        root = yield factory.getRootObject()
        avatar = yield root.callRemote("authenticate", *self.login)
        writer = yield avatar.callRemote("upload", "half.bin", 1000, "0" * 64)
        yield writer.callRemote("write", b"x" * 500)
        gone: defer.Deferred = defer.Deferred()
        assert factory._broker is not None  # connected
        factory._broker.notifyOnDisconnect(lambda: gone.callback(None))
        factory.disconnect()
        yield gone
        core = self.service.core
        while core.stats.in_flight or self.names():
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.names(), [])
