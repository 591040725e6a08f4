"""PB uploads through the daemon's real upload engine, as makeService wires it.

Skipped where the build has no upload engine (``cmdserver.commands.upload.engine``).
"""

from __future__ import annotations

import hashlib
import hmac
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
from tests.helpers.upload import wait_until

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
        # One pass on each side: the MAC after the content, no SHA-256 unless asked.
        mac = hmac.new(self.key, data, "sha256").hexdigest()
        self.assertEqual(result, {"name": "big.bin", "size": len(data), "sha256": None,
                                  "mac": f"hmac-sha256:{mac}"})
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

    @defer.inlineCallbacks
    def test_blake2b_and_sha256_on_request(self) -> Any:
        data = os.urandom(300_000)
        session = yield client.connect("127.0.0.1", self.port, *self.login)
        self.addCleanup(session.close)
        result = yield session.upload_file(self.local(data), "b2.bin", self.key, mac="blake2b",
                                           sha256=True)
        mac = hashlib.blake2b(data, key=self.key, digest_size=32).hexdigest()
        self.assertEqual(result, {"name": "b2.bin", "size": len(data), "mac": f"blake2b:{mac}",
                                  "sha256": hashlib.sha256(data).hexdigest()})

    @defer.inlineCallbacks
    def writer(self, size: int, **options: Any) -> Any:
        factory = pb.PBClientFactory()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        self.addCleanup(factory.disconnect)
        root = yield factory.getRootObject()
        avatar = yield root.callRemote("authenticate", *self.login)
        writer = yield avatar.callRemote("upload", "t.bin", size, "-", **options)
        return writer

    def settled(self) -> Any:
        """Until no command runs and no upload is left (its temporary file removed)."""
        uploads = self.service.getServiceNamed("uploads").uploads
        return wait_until(lambda: not self.service.core.stats.in_flight and not uploads.active)

    @defer.inlineCallbacks
    def test_close_carries_the_mac_and_every_bad_one_leaves_nothing(self) -> Any:
        data = b"payload"
        good = hmac.new(self.key, data, "sha256").hexdigest()
        cases = [((), "the MAC is missing: close(MAC) ends an upload whose MAC follows "
                      "the content, upload discarded"),
                 (("abcd",), "the MAC must be 64 hex digits, upload discarded"),
                 ((good + "00",), "the MAC must be 64 hex digits, upload discarded"),
                 (("0" * 64,), "HMAC mismatch, upload discarded")]
        for args, message in cases:
            writer = yield self.writer(len(data))
            yield writer.callRemote("write", data)
            e = yield self.assertFailure(writer.callRemote("close", *args), pb.Error)
            self.assertEqual(str(e), message)
            yield self.settled()
            self.assertEqual(self.names(), [], args)
        writer = yield self.writer(len(data))
        yield writer.callRemote("write", data)
        result = yield writer.callRemote("close", good)
        self.assertEqual(result["mac"], f"hmac-sha256:{good}")
        self.assertEqual(self.names(), ["t.bin"])

    @defer.inlineCallbacks
    def test_a_mac_algorithm_the_server_does_not_take_is_refused(self) -> Any:
        factory = pb.PBClientFactory()
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.port).connect(factory)
        self.addCleanup(factory.disconnect)
        root = yield factory.getRootObject()
        avatar = yield root.callRemote("authenticate", *self.login)
        e = yield self.assertFailure(avatar.callRemote("upload", "x", 1, "-", mac="md5"),
                                     pb.Error)
        self.assertEqual(str(e), "mac must be one of hmac-sha256, blake2b, not 'md5'")
        self.assertEqual(self.names(), [])
