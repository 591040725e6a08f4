"""Declared commands in the real service: real children, real doors, real process groups.

The config declares ``diskfree`` (``/bin/df -P {path}``), ``snooze`` (``/bin/sleep
30`` with a 1 s deadline) and a few ``/bin/sh -c`` commands with fixed arguments
that leave background children, to check that the whole process group dies on a
deadline, a disconnect, a shutdown and when the program exits.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from typing import Any

import paramiko
from twisted.internet import defer, reactor, task, utils
from twisted.trial import unittest

from cmdserver import client
from cmdserver.cli import main as cli
from cmdserver.client import RemoteCommandError
from cmdserver.commands import declared
from tests.end_to_end.support import LineClient, RunningService, in_thread

PASSWORD = "s3cret-pass"
CONFIG = """
[commands.diskfree]
summary = "Free space of a filesystem inside the roots"
argv = ["/bin/df", "-P", "{path}"]
args.path = { type = "path", help = "a file or directory inside the roots" }
timeout = 10

[commands.snooze]
summary = "Sleep for half a minute"
argv = ["/bin/sleep", "30"]
timeout = 1

[commands.nap]
summary = "Two sleeps in one group"
argv = ["/bin/sh", "-c", "sleep 30 & sleep 30"]
timeout = 2

[commands.hold]
summary = "Two sleeps, no deadline of their own"
argv = ["/bin/sh", "-c", "echo started; sleep 30 & sleep 30"]

[commands.stray]
summary = "Leave a sleep behind"
argv = ["/bin/sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!"]
"""


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    state, ppid, pgrp = data.rsplit(")", 1)[1].split()[:3]
    return state, int(ppid), int(pgrp)


def alive(pid: int) -> bool:
    """Running (a zombie is dead: it only waits to be reaped)."""
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[2] == pgid and stat[0] != "Z":
                members.append(int(entry))
    return members


def sleeping_children() -> list[int]:
    """Live children of this test process running sleep (none should be left)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat[1] == os.getpid() and stat[0] != "Z":
                try:
                    with open(f"/proc/{entry}/comm") as f:
                        comm = f.read().strip()
                except OSError:
                    continue
                if comm in ("sleep", "sh", "dash", "df"):
                    found.append(int(entry))
    return found


def df_shape(lines: list[str]) -> list[tuple[str, ...]]:
    """df -P's lines without the numbers that change from one call to the next."""
    return [(lines[0],)] + [(line.split()[0], line.split()[-1]) for line in lines[1:]]


class DeclaredCase(unittest.TestCase):
    argv: tuple[str, ...] = ()

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        config = os.path.join(self.tmp, "cmdserver.toml")
        with open(config, "w") as f:
            f.write(CONFIG)
        self.spawns = 0  # children started
        self.spawned: list[int] = []  # their pids (a child reaped before spawn returned has none)
        spawn = declared.spawn_in_session

        def recording(*args: Any) -> Any:
            child = spawn(*args)
            self.spawns += 1
            if child.pid is not None:
                self.spawned.append(child.pid)
            return child

        self.patch(declared, "spawn_in_session", recording)
        self.addCleanup(self.kill_leftovers)
        self.before_start()
        self.server = RunningService(self.tmp, "--config", config, *self.argv)
        yield self.server.start()
        self.addCleanup(self.server.stop)
        self.ports = {door.door: port.getHost().port
                      for door, port in zip(self.server.service.doors, self.server.ports,
                                            strict=True)}
        os.makedirs(os.path.join(self.server.root, "sub"))

    def before_start(self) -> None:
        pass

    def kill_leftovers(self) -> None:
        for pid in self.spawned:
            try:
                os.killpg(pid, 9)
            except OSError:
                pass

    def client(self) -> LineClient:
        c = LineClient(("127.0.0.1", self.ports["line"]))
        self.addCleanup(c.close)
        return c

    def local_df(self, path: str) -> defer.Deferred:
        def run() -> list[str]:
            done = subprocess.run(["/bin/df", "-P", path], capture_output=True, text=True,
                                  check=True, env={"LC_ALL": "C", "PATH": os.defpath})
            return done.stdout.splitlines()

        return in_thread(run)

    @defer.inlineCallbacks
    def wait_for(self, predicate: Any, what: str, timeout: float = 5) -> Any:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.fail(f"never happened: {what}")
            yield task.deferLater(reactor, 0.02, lambda: None)


class DeclaredLineTests(DeclaredCase):
    @defer.inlineCallbacks
    def test_diskfree_gives_dfs_output(self) -> Any:
        expected = yield self.local_df(self.server.root)

        def session() -> tuple[list[str], list[str]]:
            c = self.client()
            c.send(b"diskfree .\nping\n")
            lines = [c.read_line()]
            while lines[-1] != "pong":
                lines.append(c.read_line())
            sub = c.ask("diskfree sub", len(expected))
            return lines[:-1], sub

        lines, sub = yield in_thread(session)
        self.assertEqual(df_shape(lines), df_shape(expected))  # no final line on success
        self.assertEqual(df_shape(sub), df_shape(expected))
        self.assertEqual(self.spawns, 2)

    @defer.inlineCallbacks
    def test_help_lists_it_and_shows_its_usage(self) -> Any:
        def session() -> tuple[list[str], list[str]]:
            c = self.client()
            c.send(b"help\n")
            lines = [c.read_line()]
            while not lines[-1].startswith("Type 'help"):
                lines.append(c.read_line())
            return lines, c.ask("help diskfree", 3)

        listing, usage = yield in_thread(session)
        self.assertIn("  diskfree  Free space of a filesystem inside the roots", listing)
        self.assertIn("  snooze    Sleep for half a minute", listing)
        self.assertEqual(usage, ["Usage: diskfree PATH",
                                 "  Free space of a filesystem inside the roots",
                                 "    path: a file or directory inside the roots"])

    @defer.inlineCallbacks
    def test_refused_arguments_spawn_nothing(self) -> Any:
        def session() -> list[str]:
            c = self.client()
            return [c.ask(line)[0] for line in
                    ["diskfree ../..", "diskfree -rf", "diskfree /etc", "diskfree",
                     "diskfree a b", "snooze now", "ping"]]

        lines = yield in_thread(session)
        self.assertEqual(lines, ["Error: path outside allowed roots",
                                 "Error: path: a value may not start with '-'",
                                 "Error: path outside allowed roots",
                                 "Error: usage: diskfree PATH",
                                 "Error: usage: diskfree PATH",
                                 "Error: usage: snooze",
                                 "pong"])
        self.assertEqual(self.spawns, 0)
        self.assertEqual(sleeping_children(), [])

    @defer.inlineCallbacks
    def test_deadline_kills_the_child_within_two_seconds(self) -> Any:
        def session() -> tuple[list[str], float]:
            c = self.client()
            started = time.monotonic()
            reply = c.ask("snooze")
            return reply, time.monotonic() - started

        reply, took = yield in_thread(session)
        self.assertEqual(reply, ["Error: deadline exceeded: stopped after 1 s"])
        self.assertLess(took, 2)
        [pid] = self.spawned
        yield self.wait_for(lambda: not alive(pid), "sleep killed", 1)
        self.assertEqual(sleeping_children(), [])

    @defer.inlineCallbacks
    def test_deadline_kills_the_whole_group(self) -> Any:
        c = yield in_thread(self.client)
        c.send(b"nap\n")
        yield self.wait_for(lambda: self.spawned and len(group_members(self.spawned[0])) >= 2,
                            "the sleeps started")
        leader = self.spawned[0]
        self.assertEqual(os.getpgid(leader), leader)  # it leads its own group...
        self.assertEqual(os.getsid(leader), leader)  # ...and session
        reply = yield in_thread(c.read_line)
        self.assertEqual(reply, "Error: deadline exceeded: stopped after 2 s")
        yield self.wait_for(lambda: group_members(leader) == [], "the group is gone", 2)

    @defer.inlineCallbacks
    def test_disconnect_kills_the_whole_group(self) -> Any:
        c = yield in_thread(self.client)
        c.send(b"hold\n")
        self.assertEqual((yield in_thread(c.read_line)), "started")
        yield self.wait_for(lambda: len(group_members(self.spawned[0])) >= 2,
                            "the sleeps started")
        c.reset()
        yield self.wait_for(lambda: group_members(self.spawned[0]) == [], "the group is gone", 2)

    @defer.inlineCallbacks
    def test_shutdown_kills_the_whole_group(self) -> Any:
        c = yield in_thread(self.client)
        c.send(b"hold\n")
        self.assertEqual((yield in_thread(c.read_line)), "started")
        leader = self.spawned[0]
        yield self.wait_for(lambda: len(group_members(leader)) >= 2, "the sleeps started")
        yield self.server.stop()
        self.assertFalse(alive(leader))  # stopService waited for it
        yield self.wait_for(lambda: group_members(leader) == [], "the group is gone", 1)
        self.assertEqual(sleeping_children(), [])

    @defer.inlineCallbacks
    def test_what_the_program_leaves_behind_dies_with_it(self) -> Any:
        c = yield in_thread(self.client)
        reply = yield in_thread(c.ask, "stray\nping", 2)
        stray = int(reply[0])
        self.assertEqual(reply[1], "pong")  # success: nothing after the output
        yield self.wait_for(lambda: not alive(stray), "the stray sleep is killed", 2)

    @defer.inlineCallbacks
    def test_audited_with_the_arguments(self) -> Any:
        import json

        c = yield in_thread(self.client)
        yield in_thread(c.ask, "diskfree -rf")
        audit = os.path.join(self.server.data_dir, "audit.log")
        yield self.server.stop()
        with open(audit) as f:
            [event] = [e for e in map(json.loads, f) if e["event"] == "command"]
        self.assertEqual((event["command"], event["args"], event["outcome"]),
                         ("diskfree", {"argv": ["-rf"]}, "refused"))


class DeclaredDoorsTests(DeclaredCase):
    """The same command through PB and SSH exec gives the same result."""

    argv = ("--pb", "tcp:0:interface=127.0.0.1", "--ssh", "tcp:0:interface=127.0.0.1",
            "--bcrypt-cost", "4")

    def before_start(self) -> None:
        self.patch(sys, "stdin", io.StringIO(PASSWORD + "\n"))
        data = os.path.join(self.tmp, "data")
        self.assertEqual(cli(["useradd", "ops", "--password-stdin", "--cost", "4",
                              "--data-dir", data]), 0)

    @defer.inlineCallbacks
    def test_pb_call(self) -> Any:
        expected = yield self.local_df(self.server.root)
        session = yield client.connect("127.0.0.1", self.ports["pb"], "ops", PASSWORD)
        self.addCleanup(session.close)
        value = yield session.avatar.callRemote("diskfree", ".")
        self.assertEqual(set(value), {"exit_status", "output", "stderr"})
        self.assertEqual(value["exit_status"], 0)
        self.assertEqual(df_shape(value["output"]), df_shape(expected))
        value = yield session.avatar.callRemote("call", "diskfree", path=".")
        self.assertEqual(df_shape(value["output"]), df_shape(expected))
        commands = yield session.help()
        self.assertEqual(commands["diskfree"], "Free space of a filesystem inside the roots")
        for args in [("-rf",), ("../..",)]:
            yield self.assertFailure(session.avatar.callRemote("diskfree", *args),
                                     Exception)
        self.assertEqual(self.spawns, 2)
        e = yield self.assertFailure(session._call("snooze"), RemoteCommandError)
        self.assertEqual(str(e), "deadline exceeded: stopped after 1 s")

    @defer.inlineCallbacks
    def test_cmdserver_call(self) -> Any:
        # The console script has no table of commands: the server parses the words.
        expected = yield self.local_df(self.server.root)
        argv = ["-m", "cmdserver.cli", "call", "--port", str(self.ports["pb"]), "--user",
                "ops", "diskfree", "."]
        env = {**os.environ, "CMDSERVER_PASSWORD": PASSWORD}
        out, err, code = yield utils.getProcessOutputAndValue(sys.executable, argv, env=env)
        self.assertEqual(code, 0, err)
        self.assertEqual(df_shape(out.decode().splitlines()), df_shape(expected))
        argv[-1] = "../.."
        out, err, code = yield utils.getProcessOutputAndValue(sys.executable, argv, env=env)
        self.assertEqual((out, err, code), (b"", b"Error: path outside allowed roots\n", 1))
        argv[-2:] = ["snooze"]
        out, err, code = yield utils.getProcessOutputAndValue(sys.executable, argv, env=env)
        self.assertEqual((err, code), (b"Error: deadline exceeded: stopped after 1 s\n", 124))

    @defer.inlineCallbacks
    def test_ssh_exec(self) -> Any:
        expected = yield self.local_df(self.server.root)

        def run(command: str) -> tuple[bytes, bytes, int]:
            ssh = paramiko.SSHClient()
            ssh.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            ssh.connect("127.0.0.1", self.ports["ssh"], username="ops", password=PASSWORD,
                        allow_agent=False, look_for_keys=False, timeout=10)
            try:
                _, stdout, stderr = ssh.exec_command(command, timeout=10)
                out, err = stdout.read(), stderr.read()
                return out, err, stdout.channel.recv_exit_status()
            finally:
                ssh.close()

        out, err, status = yield in_thread(run, "diskfree .")
        self.assertEqual((err, status), (b"", 0))
        self.assertEqual(df_shape(out.decode().splitlines()), df_shape(expected))
        out, err, status = yield in_thread(run, "diskfree ../..")
        self.assertEqual((out, err, status), (b"", b"Error: path outside allowed roots\n", 1))
        out, err, status = yield in_thread(run, "snooze")
        self.assertEqual((err, status), (b"Error: deadline exceeded: stopped after 1 s\n", 124))
        self.assertEqual(self.spawns, 2)
