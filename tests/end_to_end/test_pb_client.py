"""The PB client API from outside: ``cmdserver call``, the blocking session, and the
PB door as ``twistd cmdserver`` options build it (--pb, --pb-anonymous)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

from twisted.internet import defer, error, reactor, task, threads, utils
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python import usage
from twisted.spread import pb
from twisted.trial import unittest

from cmdserver import client, tap
from cmdserver.cli.call import safe
from tests.end_to_end.pb_server import PBServer

# Doors other builds may open by default, kept off so these tests bind nothing fixed.
OTHER_DOORS_OFF = [arg for name in ("ssh", "http") if name in tap.SETTINGS
                   for arg in (f"--{name}", "none")]


def pb_door(service: Any) -> Any:
    [door] = [d for d in service.doors if d.door == "pb"]
    return door


class CallCLITests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.tmp = tempfile.mkdtemp(prefix="cmdserver-pb-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        root = os.path.join(self.tmp, "files")
        os.makedirs(os.path.join(root, "d"))
        log_file = os.path.join(self.tmp, "log")
        with open(log_file, "w") as f:
            f.write("one\ntwo\n")
        self.server = PBServer(root, log_file)
        yield self.server.start()
        self.addCleanup(lambda: self.server.stop())

    def call(self, *args: str, password: str = "s3cret") -> defer.Deferred:
        argv = ["-m", "cmdserver.cli", "call", "--port", str(self.server.port), "--user", "ops",
                "--password-env", "PB_TEST_PW", *args]
        env = {**os.environ, "PB_TEST_PW": password}
        return utils.getProcessOutputAndValue(sys.executable, argv, env=env)

    @defer.inlineCallbacks
    def test_call_prints_result(self) -> Any:
        out, err, code = yield self.call("ping")
        self.assertEqual((out, code), (b"pong\n", 0), err)
        out, err, code = yield self.call("ls")
        self.assertEqual((out, code), (b"d\n", 0), err)
        out, err, code = yield self.call("lastlog", "1")  # as the line door prints it
        self.assertEqual((out, code), (b"Begin lastlog\ntwo\nEnd lastlog\n", 0), err)
        # No table of its own: the server parses the words, options included.
        out, err, code = yield self.call("help", "ls")
        self.assertEqual((out.splitlines()[0], code), (b"Usage: ls [PATH]", 0), err)
        out, err, code = yield self.call("comphash", "--algo", "md5", "d")
        self.assertEqual((err, code), (b"Error: is a directory: d\n", 1))
        out, err, code = yield self.call("whoami")
        self.assertEqual((out, code), (b"ops\n", 0), err)

    @defer.inlineCallbacks
    def test_call_json(self) -> Any:
        out, err, code = yield self.call("--json", "stats")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["connections_by_door"], {"pb": 1})

    @defer.inlineCallbacks
    def test_call_errors(self) -> Any:
        out, err, code = yield self.call("ls", "../..")
        self.assertEqual((out, err, code), (b"", b"Error: path outside allowed roots\n", 1))
        out, err, code = yield self.call("ping", password="bad")
        self.assertEqual((err, code), (b"Error: login failed\n", 1))
        out, err, code = yield self.call("lastlog", "x")
        self.assertEqual((err, code),
                         (b"Error: not a number: x; usage: lastlog [N]   (1..1000)\n", 1))
        self.assertNotIn(b"Traceback", err)

    @defer.inlineCallbacks
    def test_call_password_from_cmdserver_password_else_a_clear_error(self) -> Any:
        argv = ["-m", "cmdserver.cli", "call", "--port", str(self.server.port), "--user", "ops",
                "ping"]
        env = {k: v for k, v in os.environ.items() if k != "CMDSERVER_PASSWORD"}
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, argv, env={**env, "CMDSERVER_PASSWORD": "s3cret"})
        self.assertEqual((out, code), (b"pong\n", 0), err)
        # No variable and no terminal to prompt on (stdin is a pipe): one line, status 2.
        out, err, code = yield utils.getProcessOutputAndValue(sys.executable, argv, env=env)
        self.assertEqual(
            (out, err, code),
            (b"", b"Error: no password: set CMDSERVER_PASSWORD (no terminal to ask on)\n", 2))

    @defer.inlineCallbacks
    def test_call_cannot_connect(self) -> Any:
        yield self.server.stop()
        out, err, code = yield self.call("ping")
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith(b"Error: cannot connect to 127.0.0.1:"), err)

    @defer.inlineCallbacks
    def test_connection_limit_counts_pb(self) -> Any:
        yield self.server.stop()
        self.server = PBServer(self.server.root, os.devnull, max_clients=1)
        yield self.server.start()
        first = yield client.connect("127.0.0.1", self.server.port, "ops", "s3cret")
        self.addCleanup(first.close)
        yield self.assertFailure(
            client.connect("127.0.0.1", self.server.port, "ops", "s3cret"),
            error.ConnectionLost)
        stats = yield first.stats()
        self.assertEqual((stats["connections"], stats["refused"]), (1, 1))

    @defer.inlineCallbacks
    def test_a_closed_connection_is_one_clear_error(self) -> Any:
        session = yield client.connect("127.0.0.1", self.server.port, "ops", "s3cret")
        stopped = self.server.stop()  # the server goes away: connections are dropped
        yield stopped
        for _ in range(100):
            if not session.avatar.broker.connected:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        failure = yield self.assertFailure(session.ping(), client.ConnectionClosed)
        self.assertEqual(str(failure), "the connection to the server is closed")
        self.assertIsInstance(failure, client.RemoteError)

    def test_cli_escapes_control_characters(self) -> None:
        self.assertEqual(safe("a\x1b[2Jb\x9bc"), "a\\x1b[2Jb\\x9bc")
        self.assertEqual(safe("plain"), "plain")

    @defer.inlineCallbacks
    def test_blocking_session(self) -> Any:
        def script() -> Any:
            with client.connect_blocking("127.0.0.1", self.server.port, "ops", "s3cret") as s:
                return s.ping(), s.ls()

        result = yield threads.deferToThread(script)
        self.assertEqual(result, ("pong", ["d"]))

    @defer.inlineCallbacks
    def test_blocking_session_refuses_reactor_thread(self) -> Any:
        yield task.deferLater(reactor, 0, lambda: None)  # now on the running reactor
        self.assertRaises(RuntimeError, client.connect_blocking, "127.0.0.1", 1, "u", "p")


class TapPBOptionsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="cmdserver-pb-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def options(self, *args: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions([*OTHER_DOORS_OFF, "--data-dir", self.tmp, "--audit-log", "none",
                              "--log-source", "/dev/null", *args])
        return options

    def test_defaults(self) -> None:
        options = tap.Options()
        options.parseOptions(["--data-dir", self.tmp])
        self.assertEqual(options["pb"], "tcp:9876:interface=127.0.0.1")
        self.assertFalse(options["pb-anonymous"])
        service = tap.makeService(options)
        self.assertEqual(pb_door(service).description, "tcp:9876:interface=127.0.0.1")

    def test_pb_none(self) -> None:
        doors = [d.door for d in tap.makeService(self.options("--pb", "none")).doors]
        self.assertEqual(doors, ["line"])
        e = self.assertRaises(usage.UsageError, self.options, "--pb", "none", "--line", "none")
        self.assertIn("no front door is open", str(e))

    def test_bad_endpoint(self) -> None:
        e = self.assertRaises(usage.UsageError, self.options, "--pb", "tcp:notaport")
        self.assertTrue(str(e).startswith("--pb tcp:notaport:"))

    def test_toml(self) -> None:
        config = os.path.join(self.tmp, "c.toml")
        with open(config, "w") as f:
            f.write('pb = "tcp:0:interface=127.0.0.1"\npb-anonymous = true\n')
        options = self.options("--config", config)
        self.assertEqual((options["pb"], options["pb-anonymous"]),
                         ("tcp:0:interface=127.0.0.1", True))
        with open(config, "w") as f:
            f.write('pb-anonymous = "yes"\n')
        e = self.assertRaises(usage.UsageError, self.options, "--config", config)
        self.assertIn("pb-anonymous: 'yes' is not true or false", str(e))

    @defer.inlineCallbacks
    def test_classic_remote_ls_client_against_makeservice(self) -> Any:
        root = os.path.join(self.tmp, "files")
        os.makedirs(os.path.join(root, "logs"))
        service = tap.makeService(self.options(
            "--line", "none", "--pb", "tcp:0:interface=127.0.0.1", "--pb-anonymous"))
        service.startService()
        self.addCleanup(service.stopService)
        port = (yield pb_door(service).listening).getHost().port
        # The classic example, unchanged but for the port.
        factory = pb.PBClientFactory()
        # Twisted's own PBClientFactory fails connectTCP's type bound (Broker.factory is None).
        reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[type-var]
        remote = yield factory.getRootObject()
        listing = yield remote.callRemote("ls", root)
        self.assertEqual(listing, ["logs"])
        self.assertEqual((yield remote.callRemote("ls", "/")), [])
        yield self.assertFailure(remote.callRemote("ls_boom", "/"), pb.Error)
        disconnected: defer.Deferred = defer.Deferred()
        assert factory._broker is not None  # connected
        factory._broker.notifyOnDisconnect(lambda: disconnected.callback(None))
        factory.disconnect()
        yield disconnected

    @defer.inlineCallbacks
    def test_login_through_the_daemons_portal(self) -> Any:
        # With the daemon's own password checker (first-run admin) login works; a
        # daemon without one refuses every login cleanly.
        cost = ["--bcrypt-cost", "4"] if "bcrypt-cost" in tap.SETTINGS else []
        service = tap.makeService(self.options("--line", "none",
                                               "--pb", "tcp:0:interface=127.0.0.1", *cost))
        service.startService()
        self.addCleanup(service.stopService)
        port = (yield pb_door(service).listening).getHost().port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        wrong = yield self.assertFailure(client.connect_endpoint(endpoint, "admin", "x"),
                                         client.LoginError)
        self.assertEqual(str(wrong), "login failed")
        password_file = os.path.join(self.tmp, "initial-admin-password")
        if not os.path.exists(password_file):
            self.assertEqual(service.portal.listCredentialsInterfaces(), [])
            return
        with open(password_file) as f:
            password = f.read().strip()
        session = yield client.connect_endpoint(endpoint, "admin", password)
        self.assertEqual((yield session.ping()), "pong")
        yield session.close()
