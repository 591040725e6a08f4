"""The real service on loopback, driven through real sockets."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from typing import cast

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from cmdserver.commands.lastlog import LastLog
from tests.end_to_end.support import LineClient, RunningService, in_thread

GREETING = "cmdserver on build-7; type 'help' for the commands."


class ServiceCase(unittest.TestCase):
    """A started service with a small log file; tests talk to it through sockets."""

    argv: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def setUp(self):  # type: ignore[override]  # trial waits on a returned Deferred
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.log = os.path.join(self.tmp, "syslog")
        with open(self.log, "w") as f:
            f.writelines(f"log line {i}\n" for i in range(20))
        self.server = RunningService(self.tmp, "--log-source", self.log, *self.argv)
        yield self.server.start()
        self.addCleanup(self.server.stop)

    def client(self) -> LineClient:
        c = LineClient(self.server.address)
        self.addCleanup(c.close)
        return c

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout: float = 10):
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail("condition not reached")
            yield task.deferLater(reactor, 0.02, lambda: None)


class LineDoorEndToEnd(ServiceCase):
    @defer.inlineCallbacks
    def test_a_session(self):
        with open(os.path.join(self.server.root, "notes.txt"), "wb") as f:
            f.write(b"hello\n")
        digest = hashlib.sha256(b"hello\n").hexdigest()

        def session():
            c = self.client()
            assert c.ask("ping") == ["pong"]
            assert c.ask("comphash notes.txt") == [f"File hash is : {digest}"]
            assert c.ask("comphash") == ["Please provide a path."]
            assert c.ask("ls") == ["notes.txt"]
            assert c.ask("ls ..") == ["Error: path outside allowed roots"]
            assert c.ask("lastlog 2", 4) == ["Begin lastlog", "log line 18", "log line 19",
                                             "End lastlog"]
            assert c.ask("nosuch") == ["Command not found."]
            c.send(b"help\n")
            help_lines = [c.read_line()]
            while not help_lines[-1].startswith("Type 'help"):
                help_lines.append(c.read_line())
            assert help_lines[0] == "Commands:" and len(help_lines) > 8
            stats = c.ask("stats", 8)
            assert stats[1].startswith("connections: 1 open (line 1)")
            c.send(b"exit\n")
            assert c.read_until_closed() == b"bye !\r\n"

        yield in_thread(session)
        audit = os.path.join(self.server.data_dir, "audit.log")
        yield self.server.stop()
        events = [json.loads(line) for line in open(audit)]
        self.assertEqual([e["command"] for e in events if e["event"] == "command"],
                         ["ping", "comphash", "comphash", "ls", "ls", "lastlog", "nosuch",
                          "help", "stats", "exit"])
        self.assertEqual([events[0]["event"], events[-1]["event"]],
                         ["session-start", "session-end"])
        self.assertEqual(len({e["session"] for e in events}), 1)
        self.assertEqual(events[-1]["result"], {"commands": 8, "file_operations": 0,
                                                "login_failures": 0})
        self.assertEqual({e["peer"].split(":")[0] for e in events}, {"127.0.0.1"})

    @defer.inlineCallbacks
    def test_telnet_style_and_pipelining(self):
        def session():
            c = self.client()
            c.send(b"ping\r\nlastlog 1\r\nping\r\n")
            return c.read_lines(5)

        lines = yield in_thread(session)
        self.assertEqual(lines, ["pong", "Begin lastlog", "log line 19", "End lastlog", "pong"])

    @defer.inlineCallbacks
    def test_piped_commands_with_half_close(self):
        """`printf 'ping\\nlastlog 1\\n' | nc -N host port` gets every answer."""

        def session():
            c = self.client()
            c.send(b"ping\nlastlog 1\nping")
            c.sock.shutdown(socket.SHUT_WR)
            return c.read_until_closed()

        data = yield in_thread(session)
        self.assertEqual(data.decode().split("\r\n"), [
            "pong", "Begin lastlog", "log line 19", "End lastlog", "pong", ""])

    @defer.inlineCallbacks
    def test_netcat_reads_the_first_reply_first(self):
        """`printf 'test\\n' | nc -N host port`: no greeting, the reply is line one."""

        def session():
            c = self.client()
            c.send(b"test\n")
            c.sock.shutdown(socket.SHUT_WR)
            return c.read_until_closed()

        self.assertEqual((yield in_thread(session)), b"Command not found.\r\n")

    @defer.inlineCallbacks
    def test_nothing_is_sent_before_the_first_command(self):
        def session():
            c = self.client()
            c.sock.settimeout(0.5)
            try:
                early = c.sock.recv(4096)
            except TimeoutError:
                early = b""
            c.sock.settimeout(10)
            return early, c.ask("test")

        self.assertEqual((yield in_thread(session)), (b"", ["Command not found."]))

    @defer.inlineCallbacks
    def test_bad_input_over_the_wire(self):
        def session():
            c = self.client()
            c.send(b"\x00\x01\x02\xff\xfe\n")
            first = c.read_line()
            c.send(b"A" * 5000 + b"\n")
            rest = c.read_until_closed()
            return first, rest

        first, rest = yield in_thread(session)
        self.assertEqual(first, "Error: the command is not valid UTF-8")
        self.assertEqual(rest, b"Error: line too long (the limit is 4096 bytes)\r\n")

    @defer.inlineCallbacks
    def test_disconnect_kills_the_running_tail(self):
        _, tails = self.fifo_log()  # tail blocks on it: a command that never ends alone
        c = yield in_thread(self.client)
        yield in_thread(c.send, b"lastlog\n")
        yield self.wait_for(lambda: tails() and self.server.service.core.stats.in_flight == 1)
        c.reset()
        yield self.wait_for(lambda: not tails())
        yield self.wait_for(lambda: self.server.service.core.stats.in_flight == 0)

    def fifo_log(self) -> tuple[str, Callable[[], list[str]]]:
        """lastlog reads a FIFO: tail blocks until the test writes to it."""
        fifo = os.path.join(self.tmp, "fifo")
        os.mkfifo(fifo)
        lastlog = cast(LastLog, self.server.service.core.registry.get("lastlog"))
        lastlog.source = type(lastlog.source)(fifo)

        def tails() -> list[str]:
            found = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        if fifo.encode() in f.read():
                            found.append(pid)
                except OSError:
                    pass
            return found

        return fifo, tails

    @defer.inlineCallbacks
    def test_fin_from_a_client_that_left_cancels_its_command(self):
        # Ctrl-C in nc: a FIN, and the socket is closed; the command must not run on.
        fifo, tails = self.fifo_log()
        c = yield in_thread(self.client)
        yield in_thread(c.send, b"lastlog\n")
        yield self.wait_for(lambda: tails() and self.server.service.core.stats.in_flight == 1)
        c.close()  # nothing unread: a FIN, not a reset
        yield self.wait_for(lambda: self.server.service.core.stats.in_flight == 0)
        yield self.wait_for(lambda: not tails())

    @defer.inlineCallbacks
    def test_fin_from_a_client_that_still_reads_gets_every_answer(self):
        # printf 'lastlog\nping\n' | nc -N: a FIN, then the answers are read.
        fifo, tails = self.fifo_log()
        c = yield in_thread(self.client)
        yield in_thread(c.send, b"lastlog\nping\n")
        c.sock.shutdown(socket.SHUT_WR)
        yield self.wait_for(lambda: tails() and self.server.service.core.stats.in_flight == 1)
        yield task.deferLater(reactor, 0.2, lambda: None)  # the probe went out meanwhile
        self.assertEqual(self.server.service.core.stats.in_flight, 1)

        def feed():
            with open(fifo, "wb") as f:
                f.write(b"one\ntwo\n")

        yield in_thread(feed)
        received = yield in_thread(c.read_until_closed)
        self.assertEqual(received, b"Begin lastlog\r\none\r\ntwo\r\nEnd lastlog\r\npong\r\n")


class LimitsEndToEnd(ServiceCase):
    argv = ("--max-per-ip", "2", "--max-clients", "3")

    @defer.inlineCallbacks
    def test_per_address_and_total_limits(self):
        stats = self.server.service.core.stats
        limits = self.server.service.limits

        def open_two():
            a, b = self.client(), self.client()
            return a, b, a.ask("ping"), b.ask("ping")

        a, b, *replies = yield in_thread(open_two)
        self.assertEqual(replies, [["pong"], ["pong"]])

        def refused():
            c = self.client()
            return c.read_until_closed()

        self.assertEqual((yield in_thread(refused)), b"Too many connections. bye !\r\n")
        # Another loopback address is another client address...
        other = yield in_thread(LineClient, self.server.address, socket.AF_INET, 10,
                                "127.0.0.2")
        self.addCleanup(other.close)
        self.assertEqual((yield in_thread(other.ask, "ping")), ["pong"])
        # ...until the total is reached.
        third = yield in_thread(LineClient, self.server.address, socket.AF_INET, 10,
                                "127.0.0.3")
        self.addCleanup(third.close)
        self.assertEqual((yield in_thread(third.read_until_closed)),
                         b"Too many connections. bye !\r\n")
        # Counts stay exact however clients leave: a reset, a clean close.
        a.reset()
        b.close()
        yield self.wait_for(lambda: limits.total == 1)
        self.assertEqual(dict(limits.per_host), {"127.0.0.2": 1})
        self.assertEqual(stats.refused, 2)
        c = yield in_thread(self.client)
        self.assertEqual((yield in_thread(c.ask, "ping")), ["pong"])


class IdleEndToEnd(ServiceCase):
    argv = ("--idle-timeout", "0.3")

    def test_idle_client_is_told_and_disconnected(self):
        def session():
            c = self.client()
            return c.read_until_closed()

        d = in_thread(session)
        d.addCallback(self.assertEqual,
                      b"Timeout: idle for 0.3 s, closing the connection.\r\n")
        return d

    def test_a_busy_client_stays(self):
        def session():
            c = self.client()
            for _ in range(6):
                time.sleep(0.1)
                assert c.ask("ping") == ["pong"]

        return in_thread(session)


class UnixSocketEndToEnd(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unix_endpoint(self):
        tmp = tempfile.mkdtemp(prefix="cmds", dir="/tmp")  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, tmp, True)
        path = os.path.join(tmp, "line.sock")
        server = RunningService(tmp, "--line", f"unix:{path}:mode=600")
        yield server.start()
        self.addCleanup(server.stop)

        def session():
            c = LineClient(path, socket.AF_UNIX)
            try:
                return c.ask("ping")
            finally:
                c.close()

        self.assertEqual((yield in_thread(session)), ["pong"])


class GreetingEndToEnd(ServiceCase):
    argv = ("--greeting", GREETING)

    @defer.inlineCallbacks
    def test_the_greeting_comes_first(self):
        def session():
            c = self.client()
            c.send(b"test\nping\n")
            c.sock.shutdown(socket.SHUT_WR)
            return c.read_until_closed()

        data = yield in_thread(session)
        self.assertEqual(data.decode().split("\r\n"),
                         [GREETING, "Command not found.", "pong", ""])

    @defer.inlineCallbacks
    def test_every_connection_is_greeted_once(self):
        def session():
            c = self.client()
            first = c.read_line()  # before anything is sent
            return first, c.ask("ping"), c.ask("test")

        self.assertEqual((yield in_thread(session)),
                         (GREETING, ["pong"], ["Command not found."]))
        self.assertEqual((yield in_thread(session))[0], GREETING)
