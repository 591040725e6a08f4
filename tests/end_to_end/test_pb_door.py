"""The PB door end to end: a real service on loopback port 0, real PB clients."""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import shutil
import socket
import tempfile
from types import SimpleNamespace
from typing import Any

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python import threadable
from twisted.spread import pb
from twisted.trial import unittest

from cmdserver import client
from cmdserver.client import LoginError, RemoteCommandError, RemoteError
from cmdserver.commands.lastlog import LastLog
from cmdserver.commands.upload.key import BadKeyError
from tests.end_to_end.pb_server import KEY, PBServer
from tests.helpers import capture_audit


def caught(d: defer.Deferred) -> defer.Deferred:
    """Fires with the remote failure itself (a CopiedFailure), to inspect it."""
    def text(x: Any) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    return d.addCallbacks(lambda r: pytest.fail(f"no failure: {r!r}"), lambda f: SimpleNamespace(
        type=text(f.type), value=text(f.value), traceback=text(f.traceback)))


LOG_LINES = [f"log line {i}" for i in range(1, 21)]


class PBDoorTestBase(unittest.TestCase):
    anonymous = False

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        tmp = self.tmp = tempfile.mkdtemp(prefix="cmdserver-pb-")
        self.addCleanup(shutil.rmtree, tmp, True)
        self.root = os.path.join(tmp, "files")
        self.jail2 = os.path.join(tmp, "other")
        os.makedirs(os.path.join(self.root, "sub"))
        os.makedirs(self.jail2)
        with open(os.path.join(self.root, "a.txt"), "wb") as f:
            f.write(b"hello pb\n")
        with open(os.path.join(self.jail2, "only-here"), "wb") as f:
            f.write(b"x")
        self.log_file = os.path.join(tmp, "syslog")
        with open(self.log_file, "w") as f:
            f.write("\n".join(LOG_LINES) + "\n")
        self.server = PBServer(self.root, self.log_file, self.anonymous, self.jail2)
        yield self.server.start()
        self.factories: list[pb.PBClientFactory] = []
        self.sessions: list[client.Session] = []
        self.audit: list[dict] = capture_audit(self)

    @defer.inlineCallbacks
    def tearDown(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        for session in self.sessions:
            yield session.close()
        for factory in self.factories:
            if factory._broker is not None and not factory._broker.disconnected:
                yield self.disconnect(factory)
        yield self.server.stop()

    @defer.inlineCallbacks
    def session(self, user: str = "ops", password: str = "s3cret") -> Any:
        s = yield client.connect("127.0.0.1", self.server.port, user, password)
        self.sessions.append(s)
        return s

    @defer.inlineCallbacks
    def raw_root(self) -> Any:
        factory = pb.PBClientFactory()
        self.factories.append(factory)
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port).connect(factory)
        root = yield factory.getRootObject()
        return root

    def disconnect(self, factory: pb.PBClientFactory) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        assert factory._broker is not None  # connected
        factory._broker.notifyOnDisconnect(lambda: d.callback(None))
        factory.disconnect()
        return d

    def audited(self, command: str) -> list[dict]:
        return [e for e in self.audit
                if e.get("log_namespace") == "cmdserver.audit" and e["command"] == command]


class PBCommandsTests(PBDoorTestBase):
    @defer.inlineCallbacks
    def test_ping(self) -> Any:
        s = yield self.session()
        self.assertEqual((yield s.ping()), "pong")
        [event] = self.audited("ping")
        self.assertEqual((event["user"], event["door"], event["outcome"]), ("ops", "pb", "ok"))
        self.assertTrue(event["peer"].startswith("127.0.0.1:"), event["peer"])

    @defer.inlineCallbacks
    def test_help(self) -> Any:
        s = yield self.session()
        commands = yield s.help()
        self.assertEqual(commands["ping"], "Answer pong: a cheap liveness probe.")
        self.assertIn("comphash", commands)
        self.assertNotIn("exit", commands)  # text doors only
        self.assertNotIn("login", commands)  # PB logs in with authenticate
        one = yield s.help("ls")
        self.assertEqual(one["usage"], "ls [PATH]")
        e = yield self.assertFailure(s.help("nosuch"), RemoteCommandError)
        self.assertEqual(str(e), "no such command: nosuch")

    @defer.inlineCallbacks
    def test_whoami(self) -> Any:
        s = yield self.session()
        self.assertEqual((yield s.whoami()), "ops")
        [event] = self.audited("whoami")
        self.assertEqual((event["user"], event["door"]), ("ops", "pb"))

    @defer.inlineCallbacks
    def test_stats(self) -> Any:
        s = yield self.session()
        yield s.ping()
        stats = yield s.stats()
        self.assertEqual(stats["connections_by_door"], {"pb": 1})
        self.assertEqual(stats["commands"]["ping"], 1)
        self.assertEqual(stats["in_flight"], 1)  # stats itself

    @defer.inlineCallbacks
    def test_lastlog(self) -> Any:
        s = yield self.session()
        self.assertEqual((yield s.lastlog(3)), LOG_LINES[-3:])
        self.assertEqual((yield s.lastlog()), LOG_LINES[-10:])

    @defer.inlineCallbacks
    def test_lastlog_streams_to_observer(self) -> Any:
        s = yield self.session()
        streamed: list[str] = []
        lines = yield s.lastlog(4, on_line=streamed.append)
        self.assertEqual(lines, LOG_LINES[-4:])
        self.assertEqual(streamed, ["Begin lastlog", *LOG_LINES[-4:]])

    @defer.inlineCallbacks
    def test_comphash(self) -> Any:
        s = yield self.session()
        self.assertEqual((yield s.comphash("a.txt")), hashlib.sha256(b"hello pb\n").hexdigest())
        md5 = hashlib.md5(b"hello pb\n").hexdigest()
        self.assertEqual((yield s.comphash("a.txt", "md5")), md5)

    @defer.inlineCallbacks
    def test_ls(self) -> Any:
        s = yield self.session()
        self.assertEqual((yield s.ls()), ["a.txt", "sub"])
        self.assertEqual((yield s.ls("sub")), [])

    @defer.inlineCallbacks
    def test_per_user_roots(self) -> Any:
        s = yield self.session("jailed", "pw2")
        self.assertEqual((yield s.ls()), ["only-here"])
        e = yield self.assertFailure(s.ls(self.root), RemoteCommandError)
        self.assertEqual(str(e), "path outside allowed roots")

    @defer.inlineCallbacks
    def test_portscan(self) -> Any:
        if "portscan" not in self.server.core.registry:
            raise unittest.SkipTest("portscan is not in this build")
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.addCleanup(listener.close)
        open_port = listener.getsockname()[1]
        s = yield self.session()
        result = yield s.portscan("127.0.0.1", [open_port])
        self.assertEqual(result["open"], [open_port])
        self.assertIsInstance(result["elapsed"], float)
        streamed: list[str] = []
        result = yield s.portscan("127.0.0.1", str(open_port), on_line=streamed.append)
        self.assertEqual(result["open"], [open_port])
        self.assertEqual(streamed, [f"Connected to port {open_port}"])

    @defer.inlineCallbacks
    def test_portscan_bad_spec(self) -> Any:
        s = yield self.session()
        with self.assertRaises(RemoteError):
            yield s.portscan("127.0.0.1", "-1 2")
        if "portscan" in self.server.core.registry:
            yield self.assertFailure(s.portscan("127.0.0.1", "70000"), RemoteCommandError)


class PBErrorTests(PBDoorTestBase):
    @defer.inlineCallbacks
    def test_command_error_is_clean_remote_failure(self) -> Any:
        root = yield self.raw_root()
        avatar = yield root.callRemote("authenticate", "ops", "s3cret")
        failure = yield caught(avatar.callRemote("ls", "../.."))
        self.assertEqual(failure.type, "cmdserver.doors.pb.errors.CommandFailed")
        self.assertEqual(failure.value, "path outside allowed roots")
        self.assertNotIn("File ", failure.traceback)
        self.assertNotIn(".py", failure.traceback)

    @defer.inlineCallbacks
    def test_errors_as_client_exceptions(self) -> Any:
        s = yield self.session()
        e = yield self.assertFailure(s.comphash("nope.bin"), RemoteCommandError)
        self.assertEqual(str(e), "no such file or directory: nope.bin")
        e = yield self.assertFailure(s.comphash("a.txt", "crc"), RemoteCommandError)
        self.assertIn("algo must be one of", str(e))
        e = yield self.assertFailure(s.comphash(""), RemoteCommandError)
        self.assertEqual(str(e), "Please provide a path.")
        e = yield self.assertFailure(s.lastlog(0), RemoteCommandError)
        self.assertEqual(str(e), "n must be 1..1000, not 0")
        e = yield self.assertFailure(s.ls("a.txt"), RemoteCommandError)
        self.assertEqual(str(e), "not a directory: a.txt")

    @defer.inlineCallbacks
    def test_bad_arguments_and_unknown_method(self) -> Any:
        s = yield self.session()
        e = yield self.assertFailure(s.avatar.callRemote("lastlog", "ten"), pb.Error)
        self.assertEqual(str(e), "n must be an integer; usage: lastlog(n=10)")
        f = yield caught(s.avatar.callRemote("lastlog", 1, 2, 3))
        self.assertEqual(f.type, "cmdserver.doors.pb.errors.BadArguments")
        self.assertEqual(f.value, "usage: lastlog(n=10)")
        f = yield caught(s.avatar.callRemote("comphash"))
        self.assertEqual((f.type, f.value),
                         ("cmdserver.doors.pb.errors.BadArguments", "Please provide a path."))
        f = yield caught(s.avatar.callRemote("__init__"))
        self.assertEqual(f.type, "cmdserver.doors.pb.errors.UnknownMethod")
        self.assertEqual(f.value, "Command not found.")
        f = yield caught(s.avatar.callRemote("comphash", "a.txt", observer="not a ref"))
        self.assertEqual(f.type, "cmdserver.doors.pb.errors.BadArguments")
        # The connection is still good.
        self.assertEqual((yield s.ping()), "pong")

    @defer.inlineCallbacks
    def test_internal_error_is_generic(self) -> Any:
        s = yield self.session()
        command = self.server.core.registry.get("ls")
        self.patch(command, "run", lambda ctx, path=None: 1 / 0)
        f = yield caught(s.avatar.callRemote("ls"))
        self.assertEqual(f.type, "cmdserver.doors.pb.errors.InternalError")
        self.assertEqual(f.value, "internal error (see the server log)")
        self.assertNotIn("ZeroDivision", f.traceback)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class PBLoginTests(PBDoorTestBase):
    @defer.inlineCallbacks
    def test_wrong_password_and_unknown_user(self) -> Any:
        e1 = yield self.assertFailure(
            client.connect("127.0.0.1", self.server.port, "ops", "wrong"), LoginError)
        e2 = yield self.assertFailure(
            client.connect("127.0.0.1", self.server.port, "nobody", "x"), LoginError)
        self.assertEqual(str(e1), "login failed")
        self.assertEqual(str(e1), str(e2))

    @defer.inlineCallbacks
    def test_too_many_failures_close_the_connection(self) -> Any:
        root = yield self.raw_root()
        gone: defer.Deferred = defer.Deferred()
        root.broker.notifyOnDisconnect(lambda: gone.callback(None))
        for _ in range(4):
            yield self.assertFailure(root.callRemote("authenticate", "ops", "no"), pb.Error)
        self.assertFalse(root.broker.disconnected)
        fifth = root.callRemote("authenticate", "ops", "s3cret-but-too-late")
        yield gone  # the server hangs up after the fifth failure
        yield self.assertFailure(fifth, pb.Error)

    @defer.inlineCallbacks
    def test_stock_challenge_login_is_refused_clearly(self) -> Any:
        factory = pb.PBClientFactory()
        self.factories.append(factory)
        yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port).connect(factory)
        e = yield self.assertFailure(
            factory.login(UsernamePassword(b"ops", b"s3cret")), pb.Error)
        self.assertIn("challenge login is not supported", str(e))

    @defer.inlineCallbacks
    def test_anonymous_root_is_off_by_default(self) -> Any:
        root = yield self.raw_root()
        f = yield caught(root.callRemote("ls", self.root))
        self.assertEqual(f.type, "cmdserver.doors.pb.errors.LoginRequired")
        self.assertEqual(f.value, "login required")
        self.assertEqual(self.audited("ls"), [])


class PBAnonymousRootTests(PBDoorTestBase):
    anonymous = True

    @defer.inlineCallbacks
    def test_remote_ls(self) -> Any:
        root = yield self.raw_root()
        self.assertEqual((yield root.callRemote("ls", self.root)), ["a.txt", "sub"])
        self.assertEqual((yield root.callRemote("ls", "sub")), [])
        self.assertEqual((yield root.callRemote("ls", "missing")), [])
        self.assertEqual((yield root.callRemote("ls", "/etc")), [])
        self.assertEqual((yield root.callRemote("ls", "a.txt")), [])
        [event, *_] = self.audited("ls")
        self.assertEqual((event["user"], event["door"]), ("anonymous", "pb"))

    @defer.inlineCallbacks
    def test_remote_ls_boom(self) -> Any:
        root = yield self.raw_root()
        self.assertEqual((yield root.callRemote("ls_boom", self.root)), ["a.txt", "sub"])
        f = yield caught(root.callRemote("ls_boom", "/etc"))
        self.assertEqual(f.type, "cmdserver.doors.pb.errors.CommandFailed")
        self.assertEqual(f.value, "path outside allowed roots")
        f = yield caught(root.callRemote("ls_boom", "missing"))
        self.assertEqual(f.value, "no such file or directory: missing")

    @defer.inlineCallbacks
    def test_login_still_works(self) -> Any:
        s = yield self.session()
        self.assertEqual((yield s.ping()), "pong")


class PBCancelTests(PBDoorTestBase):
    @defer.inlineCallbacks
    def test_disconnect_cancels_running_command(self) -> Any:
        fifo = os.path.join(self.root, "fifo")
        os.mkfifo(fifo)
        lastlog = self.server.core.registry.get("lastlog")
        assert isinstance(lastlog, LastLog)
        self.patch(lastlog, "source", type(lastlog.source)(fifo))  # tail blocks on it
        root = yield self.raw_root()
        avatar = yield root.callRemote("authenticate", "ops", "s3cret")
        started: list[str] = []
        avatar.callRemote("lastlog", 5).addErrback(lambda f: started.append("lost"))
        while self.server.core.stats.in_flight == 0:
            yield task.deferLater(reactor, 0.01, lambda: None)
        yield self.disconnect(self.factories[0])
        while self.server.core.stats.in_flight:
            yield task.deferLater(reactor, 0.01, lambda: None)
        [event] = self.audited("lastlog")
        self.assertEqual(event["outcome"], "cancelled")
        self.assertEqual(started, ["lost"])


def file_mac(data: bytes) -> str:
    return hmac.new(KEY, data, hashlib.sha256).hexdigest()


class PBUploadTests(PBDoorTestBase):
    def leftovers(self) -> list[str]:
        return [n for n in os.listdir(self.root) if n.startswith(".upload-")]

    @defer.inlineCallbacks
    def test_upload_file_good(self) -> Any:
        data = os.urandom(300_000)
        local = os.path.join(self.tmp, "local")
        with open(local, "wb") as f:
            f.write(data)
        s = yield self.session()
        result = yield s.upload_file(local, "up.bin", KEY)
        mac = hmac.new(KEY, data, "sha256").hexdigest()
        self.assertEqual(result, {"name": "up.bin", "size": len(data), "sha256": None,
                                  "mac": f"hmac-sha256:{mac}"})
        with open(os.path.join(self.root, "up.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(self.leftovers(), [])
        [event] = self.audited("upload")
        self.assertEqual((event["outcome"], event["args"]),
                         ("ok", {"name": "up.bin", "size": len(data), "mac": "hmac-sha256"}))

    @defer.inlineCallbacks
    def test_upload_file_reads_and_hashes_off_the_reactor_thread(self) -> Any:
        data = os.urandom(5 * client.CHUNK + 7)
        local = os.path.join(self.tmp, "local")
        with open(local, "wb") as out:
            out.write(data)
        on_reactor: list[tuple[str, bool]] = []  # (what, whether on the reactor's thread)

        class WatchedFile(io.BufferedReader):
            def read(self, n: int | None = -1) -> bytes:
                on_reactor.append(("read", threadable.isInIOThread()))
                return super().read(n)

        class WatchedMac:
            def __init__(self, inner: Any) -> None:
                self.inner = inner

            def update(self, chunk: bytes) -> None:
                on_reactor.append(("update", threadable.isInIOThread()))
                self.inner.update(chunk)

            def hexdigest(self) -> str:
                return str(self.inner.hexdigest())

        new_mac = client.new_mac
        self.patch(client, "new_mac", lambda *args: WatchedMac(new_mac(*args)))
        # The client's open(): its module global, ahead of the builtin.
        vars(client)["open"] = lambda path, mode: WatchedFile(io.FileIO(path, mode))
        self.addCleanup(vars(client).pop, "open")
        s = yield self.session()
        self.assertTrue(threadable.isInIOThread())
        result = yield s.upload_file(local, "up.bin", KEY)
        self.assertEqual(result["mac"], f"hmac-sha256:{file_mac(data)}")
        self.assertEqual(on_reactor, [("read", False), ("update", False)] * 6)
        with open(os.path.join(self.root, "up.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def test_upload_file_of_a_file_that_shrinks_fails_and_leaves_nothing(self) -> Any:
        local = os.path.join(self.tmp, "local")
        with open(local, "wb") as out:
            out.write(os.urandom(3 * client.CHUNK))

        class Shrinking(io.BufferedReader):
            reads = 0

            def read(self, n: int | None = -1) -> bytes:
                self.reads += 1
                return super().read(n) if self.reads < 3 else b""

        vars(client)["open"] = lambda path, mode: Shrinking(io.FileIO(path, mode))
        self.addCleanup(vars(client).pop, "open")
        s = yield self.session()
        e = yield self.assertFailure(s.upload_file(local, "shrunk.bin", KEY), OSError)
        self.assertEqual(str(e), f"{local}: the file shrank while it was sent")
        while self.server.core.stats.in_flight:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(os.path.exists(os.path.join(self.root, "shrunk.bin")))
        self.assertEqual(self.leftovers(), [])

    @defer.inlineCallbacks
    def test_upload_file_takes_the_key_as_hmac_key_prints_it(self) -> Any:
        local = os.path.join(self.tmp, "local")
        with open(local, "wb") as f:
            f.write(b"payload")
        s = yield self.session()
        result = yield s.upload_file(local, "hex.bin", KEY.hex() + "\n")
        # The bytes of a key file, as open(path, "rb").read() gives them: the same key.
        yield s.upload_file(local, "hex-bytes.bin", (KEY.hex() + "\n").encode())
        self.assertEqual(result["name"], "hex.bin")
        e = yield self.assertFailure(s.upload_file(local, "no.bin", "not hex"), BadKeyError)
        self.assertEqual(str(e), "the key is not hex")
        e = yield self.assertFailure(s.upload_file(local, "no.bin", b"short"), BadKeyError)
        self.assertEqual(str(e), "the key is too short (5 bytes, at least 16)")
        self.assertFalse(os.path.exists(os.path.join(self.root, "no.bin")))

    @defer.inlineCallbacks
    def test_upload_empty_file(self) -> Any:
        local = os.path.join(self.tmp, "local")
        open(local, "wb").close()
        s = yield self.session()
        result = yield s.upload_file(local, "empty", KEY)
        self.assertEqual(result["size"], 0)
        self.assertEqual(os.path.getsize(os.path.join(self.root, "empty")), 0)

    @defer.inlineCallbacks
    def test_upload_bad_hmac(self) -> Any:
        local = os.path.join(self.tmp, "local")
        with open(local, "wb") as f:
            f.write(b"payload")
        s = yield self.session()
        e = yield self.assertFailure(s.upload_file(local, "bad.bin", b"wrong key " * 4),
                                     RemoteCommandError)
        self.assertEqual(str(e), "HMAC mismatch, upload discarded")
        self.assertFalse(os.path.exists(os.path.join(self.root, "bad.bin")))
        self.assertEqual(self.leftovers(), [])
        [event] = self.audited("upload")
        self.assertEqual(event["outcome"], "error")

    @defer.inlineCallbacks
    def test_upload_refused_before_start(self) -> Any:
        s = yield self.session()
        e = yield self.assertFailure(s.avatar.callRemote("upload", "../x", 1, "00"), pb.Error)
        self.assertEqual(str(e), "path outside allowed roots")
        e = yield self.assertFailure(s.avatar.callRemote("upload", "a.txt", 1, "00"), pb.Error)
        self.assertEqual(str(e), "target exists: a.txt")
        e = yield self.assertFailure(s.avatar.callRemote("upload", "n", -1, "00"), pb.Error)
        self.assertEqual(str(e), "SIZE must be a whole number of bytes: -1")
        e = yield self.assertFailure(s.avatar.callRemote("upload", "n", "1", "00"), pb.Error)
        self.assertEqual(str(e), "SIZE must be a whole number of bytes: 1")
        self.assertEqual(self.server.uploads.started, [])

    @defer.inlineCallbacks
    def test_writer_limits(self) -> Any:
        s = yield self.session()
        writer = yield s.avatar.callRemote("upload", "big.bin", 10, file_mac(b"0123456789"))
        e = yield self.assertFailure(writer.callRemote("write", b"x" * 65537), pb.Error)
        self.assertEqual(str(e), "chunk of 65537 bytes is over the 65536-byte limit, "
                                 "upload discarded")
        e = yield self.assertFailure(writer.callRemote("write", b"x"), pb.Error)
        self.assertEqual(str(e), "upload is already closed")
        self.assertEqual(self.server.uploads.started[0].events, ["abort"])

        writer = yield s.avatar.callRemote("upload", "big.bin", 3, file_mac(b"abc"))
        e = yield self.assertFailure(writer.callRemote("write", b"abcd"), pb.Error)
        self.assertEqual(str(e), "more than the announced 3 bytes, upload discarded")

        writer = yield s.avatar.callRemote("upload", "big.bin", 3, file_mac(b"abc"))
        yield writer.callRemote("write", b"ab")
        e = yield self.assertFailure(writer.callRemote("close"), pb.Error)
        self.assertEqual(str(e), "short upload: 2 of 3 bytes, upload discarded")

        writer = yield s.avatar.callRemote("upload", "big.bin", 3, file_mac(b"abc"))
        e = yield self.assertFailure(writer.callRemote("write", "abc"), pb.Error)
        self.assertEqual(str(e), "write takes bytes, upload discarded")
        self.assertFalse(os.path.exists(os.path.join(self.root, "big.bin")))
        self.assertEqual(self.leftovers(), [])
        self.assertEqual([e["outcome"] for e in self.audited("upload")], ["error"] * 4)

    @defer.inlineCallbacks
    def test_disconnect_mid_upload_aborts(self) -> Any:
        root = yield self.raw_root()
        avatar = yield root.callRemote("authenticate", "ops", "s3cret")
        writer = yield avatar.callRemote("upload", "half.bin", 100, file_mac(b"x" * 100))
        yield writer.callRemote("write", b"x" * 50)
        self.assertEqual(len(self.leftovers()), 1)
        yield self.disconnect(self.factories[0])
        while self.server.core.stats.in_flight:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.server.uploads.started[0].events, ["abort"])
        self.assertEqual(self.leftovers(), [])
        self.assertFalse(os.path.exists(os.path.join(self.root, "half.bin")))
        [event] = self.audited("upload")
        self.assertEqual(event["outcome"], "cancelled")
