"""Declared commands with Twisted doubles: the child's argv, checks before anything is
spawned, streaming, exit statuses, cancel, deadline, output cap and config errors."""

from __future__ import annotations

import json
import os
from typing import Any, cast

import pytest
from twisted.internet import defer
from twisted.logger import ILogObserver
from twisted.trial import unittest

from cmdserver.audit import audit_publisher
from cmdserver.commands import declared
from cmdserver.commands.base import ListSink
from cmdserver.commands.declared import (
    CHILD_ENV,
    RESERVED_NAMES,
    ConfigError,
    DeclaredCommand,
    DeclaredCommandsService,
    declared_commands,
)
from cmdserver.commands.params import Int
from cmdserver.core import TextReply
from cmdserver.errors import CommandError
from tests.helpers import ProcessReactor, make_context, make_core

DISKFREE = {"summary": "Free space of a filesystem inside the roots",
            "argv": ["/bin/df", "-P", "{path}"], "args": {"path": {"type": "path"}},
            "timeout": 10}
PICK = {"summary": "Every type", "argv": ["/bin/echo", "{n}", "--", "{color}", "{word}"],
        "args": {"n": {"type": "int", "min": 1, "max": 5, "default": 2, "help": "how many"},
                 "color": {"type": "choice", "values": ["red", "blue"], "default": "red"},
                 "word": {"type": "word", "default": "x"}}}


class DeclaredCommandTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = ProcessReactor()
        self.root = os.path.realpath(self.mktemp())
        os.makedirs(os.path.join(self.root, "sub"))
        self.core = make_core(self.root, reactor=self.reactor)
        self.add("diskfree", DISKFREE)
        self.out = ListSink()
        self.ctx = make_context(self.core, out=self.out)
        self.events: list[dict] = []
        observer = cast(ILogObserver, self.events.append)
        audit_publisher.addObserver(observer)
        self.addCleanup(audit_publisher.removeObserver, observer)

    def add(self, name: str, table: dict[str, Any]) -> DeclaredCommand:
        command = DeclaredCommand(name, table)
        self.core.registry.add(command)
        return command

    def line(self, text: str) -> Any:
        return self.core.run_line(self.ctx, text)

    def test_path_is_resolved_in_the_jail_and_passed_as_one_element(self) -> None:
        os.makedirs(os.path.join(self.root, "a b"))
        d = self.line('diskfree "sub/../a b"')
        [child] = self.reactor.processes
        self.assertEqual(child.executable, "/bin/df")
        self.assertEqual(child.args, ["/bin/df", "-P", os.path.join(self.root, "a b")])
        self.assertEqual(child.env, CHILD_ENV)
        self.assertEqual(child.env, {"PATH": os.defpath, "LC_ALL": "C"})
        self.assertEqual(child.path, self.root)
        self.assertFalse(child.use_pty)
        self.assertTrue(child.stdin_closed)
        self.assertNoResult(d)

    def test_output_streams_line_by_line(self) -> None:
        d = self.line("diskfree .")
        [child] = self.reactor.processes
        child.out(b"Filesystem 1024-blocks\n/dev/x 10")
        self.assertEqual(self.out.lines, ["Filesystem 1024-blocks"])
        child.out(b"0\n")
        child.out(b"caf\xe9", fd=1)
        self.assertEqual(self.out.lines, ["Filesystem 1024-blocks", "/dev/x 100"])
        child.out(b"df: a warning\n", fd=2)
        child.exit(0)
        self.assertEqual(self.out.lines, ["Filesystem 1024-blocks", "/dev/x 100",
                                          "caf\N{REPLACEMENT CHARACTER}"])
        self.assertEqual(self.successResultOf(d), TextReply([], True))

    def test_value_is_a_dict_for_pb(self) -> None:
        d = self.core.call(self.ctx, "diskfree", path="sub")
        [child] = self.reactor.processes
        self.assertEqual(child.args[-1], os.path.join(self.root, "sub"))
        child.out(b"one\ntwo\n")
        child.out(b"careful\n", fd=2)
        child.exit(0)
        self.assertEqual(self.successResultOf(d), {"exit_status": 0, "output": ["one", "two"],
                                                   "stderr": ["careful"]})

    def test_non_zero_exit_is_an_error_with_the_status(self) -> None:
        d = self.line("diskfree .")
        self.reactor.processes[0].exit(3)
        self.assertEqual(self.successResultOf(d),
                         TextReply(["Error: diskfree exited with status 3"], False))
        d = self.core.call(self.ctx, "diskfree", path=".")
        child = self.reactor.processes[1]
        child.out(b"\ndf: /x: No such file or directory\nmore\n", fd=2)
        child.exit(1)
        self.assertEqual(str(self.failureResultOf(d, CommandError).value),
                         "diskfree exited with status 1: df: /x: No such file or directory")

    def test_killed_by_a_signal(self) -> None:
        d = self.line("diskfree .")
        self.reactor.processes[0].exit(None, 9)
        self.assertEqual(self.successResultOf(d).lines,
                         ["Error: diskfree was killed by signal 9"])

    def test_ok_status_makes_other_statuses_a_result(self) -> None:
        self.add("check", {"summary": "A check", "argv": ["/bin/true"], "ok_status": [0, 1, 2]})
        d = self.line("check")
        self.reactor.processes[0].exit(2)
        self.assertEqual(self.successResultOf(d),
                         TextReply(["check: exit status 2"], True))
        d = self.core.call(self.ctx, "check")
        self.reactor.processes[1].exit(3)
        self.failureResultOf(d, CommandError)

    def test_refused_values_spawn_nothing(self) -> None:
        for line, message in [
            ("diskfree ../..", "Error: path outside allowed roots"),
            ("diskfree /etc", "Error: path outside allowed roots"),
            ("diskfree -rf", "Error: path: a value may not start with '-'"),
            ("diskfree --", "Error: path: a value may not start with '-'"),
            ("diskfree", "Error: usage: diskfree PATH"),
            ("diskfree a b", "Error: usage: diskfree PATH"),
        ]:
            self.assertEqual(self.successResultOf(self.line(line)).lines, [message], line)
        refused: list[dict[str, Any]] = [{"path": "-rf"}, {"path": "../.."}, {"path": 3}, {}]
        for kwargs in refused:
            self.failureResultOf(self.core.call(self.ctx, "diskfree", **kwargs), CommandError)
        self.assertEqual(self.reactor.processes, [])

    def test_typed_arguments(self) -> None:
        self.add("pick", PICK)
        self.assertEqual(self.successResultOf(self.line("help pick")).lines, [
            "Usage: pick [N] [COLOR] [WORD]", "  Every type",
            "    n: how many (1..5)", "    color: red|blue"])
        d = self.line("pick")
        self.assertEqual(self.reactor.processes[0].args, ["/bin/echo", "2", "--", "red", "x"])
        self.reactor.processes[0].exit(0)
        self.successResultOf(d)
        self.line("pick 5 blue a.b:c=d")
        self.assertEqual(self.reactor.processes[1].args,
                         ["/bin/echo", "5", "--", "blue", "a.b:c=d"])
        for line in ["pick 6", "pick 0", "pick -1", "pick x", "pick 1 green", "pick 1 red '*'",
                     "pick 1 red 'a b'", "pick 1 red -x", "pick 1 red ''"]:
            self.assertFalse(self.successResultOf(self.line(line)).ok, line)
        refused: list[dict[str, Any]] = [{"n": -1}, {"n": "1"}, {"n": True}, {"color": "green"},
                                         {"word": "$x"}, {"observer": None, "n": 1}]
        for kwargs in refused:
            self.failureResultOf(self.core.call(self.ctx, "pick", **kwargs), CommandError)
        self.assertEqual(len(self.reactor.processes), 2)

    def test_dash_rule_holds_for_numbers_given_as_values(self) -> None:
        command = self.add("num", {"summary": "n", "argv": ["/bin/echo", "{n}"],
                                   "args": {"n": {"type": "int"}}})
        int_type = command.params[0].type
        assert isinstance(int_type, Int)
        self.assertEqual(int_type.min, 0)  # no allow_dash: no negative numbers
        self.failureResultOf(self.core.call(self.ctx, "num", n=-1), CommandError)
        with self.assertRaises(CommandError):  # the last check, should a value get past bind
            command.run(self.ctx, n=-1)
        self.add("neg", {"summary": "n", "argv": ["/bin/echo", "{n}"],
                         "args": {"n": {"type": "int", "min": -5, "allow_dash": True}}})
        self.line("neg -5")
        self.assertEqual(self.reactor.processes[-1].args, ["/bin/echo", "-5"])

    def test_custom_pattern_and_allow_dash(self) -> None:
        self.add("unit", {"summary": "u", "argv": ["/bin/echo", "{u}"],
                          "args": {"u": {"type": "word", "pattern": "[a-z]+\\.service"}}})
        self.assertFalse(self.successResultOf(self.line("unit ssh.servicex")).ok)
        self.assertFalse(self.successResultOf(self.line("unit ../ssh.service")).ok)
        self.line("unit ssh.service")
        self.assertEqual(self.reactor.processes[-1].args, ["/bin/echo", "ssh.service"])
        self.add("opt", {"summary": "o", "argv": ["/bin/echo", "{o}"],
                         "args": {"o": {"type": "choice", "values": ["-a", "-b"],
                                        "allow_dash": True}}})
        self.line("opt -b")
        self.assertEqual(self.reactor.processes[-1].args, ["/bin/echo", "-b"])

    def test_order_and_literal_braces(self) -> None:
        command = self.add("tailf", {
            "summary": "t", "argv": ["/bin/echo", "{{print}}", "{lines}", "{file}"],
            "order": ["file", "lines"],
            "args": {"lines": {"type": "int", "default": 10}, "file": {"type": "path"}}})
        self.assertEqual(command.usage, "tailf FILE [LINES]")
        self.line("tailf sub")
        self.assertEqual(self.reactor.processes[-1].args,
                         ["/bin/echo", "{print}", "10", os.path.join(self.root, "sub")])

    def test_cancel_kills_the_child_and_drops_later_output(self) -> None:
        d = self.line("diskfree .")
        [child] = self.reactor.processes
        child.out(b"first\n")
        d.cancel()
        self.assertEqual(child.signals, ["KILL"])
        self.assertEqual(self.successResultOf(d).lines, ["Error: cancelled"])
        child.out(b"late\n")
        child.exit(None, 9)
        self.assertEqual(self.out.lines, ["first"])

    def test_cancel_while_the_path_is_resolved_spawns_nothing(self) -> None:
        waiting: list[defer.Deferred] = []

        def later(f: Any, *args: Any) -> defer.Deferred:
            d: defer.Deferred = defer.Deferred()
            d.addCallback(lambda _: f(*args))
            waiting.append(d)
            return d

        self.core._run_in_thread = later
        d = self.line("diskfree .")
        d.cancel()
        self.assertEqual(self.successResultOf(d).lines, ["Error: cancelled"])
        waiting[0].callback(None)
        self.assertEqual(self.reactor.processes, [])

    def test_deadline_kills_the_child(self) -> None:
        d = self.line("diskfree .")
        [child] = self.reactor.processes
        self.reactor.advance(9.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(child.signals, ["KILL"])
        self.assertEqual(self.successResultOf(d),
                         TextReply(["Error: deadline exceeded: stopped after 10 s"], False, 124))

    def test_output_cap_kills_the_child(self) -> None:
        self.add("chatty", {"summary": "c", "argv": ["/bin/yes"], "max_output": "1K"})
        d = self.line("chatty")
        [child] = self.reactor.processes
        child.out(b"y\n" * 1000)
        self.reactor.advance(0)
        self.assertEqual(child.signals, ["KILL"])
        self.assertEqual(self.successResultOf(d).lines,
                         ["Error: output limit exceeded: stopped after 1024 bytes"])
        self.assertEqual(len(self.out.lines), 512)

    def test_a_huge_line_is_cut(self) -> None:
        d = self.core.call(self.ctx, "diskfree", path=".")
        child = self.reactor.processes[0]
        child.out(b"x" * (declared.MAX_LINE + 10))
        child.exit(0)
        self.assertEqual([len(x) for x in self.successResultOf(d)["output"]],
                         [declared.MAX_LINE, 10])

    def test_spawn_failure_is_one_line(self) -> None:
        self.reactor.spawn_error = OSError(24, "Too many open files")
        self.assertEqual(self.successResultOf(self.line("diskfree .")).lines,
                         ["Error: diskfree failed: Too many open files"])

    def test_doors(self) -> None:
        self.add("pbonly", {"summary": "p", "argv": ["/bin/true"], "doors": ["pb"]})
        self.assertEqual(self.successResultOf(self.line("pbonly")).lines, ["Command not found."])
        pb_ctx = make_context(self.core, door="pb")
        self.core.call(pb_ctx, "pbonly")
        self.assertEqual(len(self.reactor.processes), 1)
        names = [c.name for c in self.core.registry.commands("line")]
        self.assertIn("diskfree", names)
        self.assertNotIn("pbonly", names)

    def test_help_lists_it(self) -> None:
        lines = self.successResultOf(self.line("help")).lines
        self.assertIn("  diskfree  Free space of a filesystem inside the roots", lines)
        self.assertEqual(self.successResultOf(self.line("help diskfree")).lines,
                         ["Usage: diskfree PATH", "  Free space of a filesystem inside the roots"])
        command = self.core.registry.get("diskfree")
        assert command is not None
        described = command.describe()
        self.assertEqual(described["params"][0]["type"], "path")

    def test_audited_like_every_command(self) -> None:
        d = self.line("diskfree sub")
        child = self.reactor.processes[0]
        child.out(b"a\nb\n")
        child.exit(0)
        self.successResultOf(d)
        self.successResultOf(self.line("diskfree -rf"))
        ok, refused = [e for e in self.events if e["command"] == "diskfree"]
        self.assertEqual((ok["args"], ok["outcome"], ok["result"]),
                         ({"path": "sub"}, "ok", {"exit_status": 0, "lines": 2}))
        self.assertEqual((refused["args"], refused["outcome"]), ({"argv": ["-rf"]}, "refused"))
        json.dumps(ok["args"])

    def test_shutdown_kills_what_runs(self) -> None:
        command = self.core.registry.get("diskfree")
        assert isinstance(command, DeclaredCommand)
        service = DeclaredCommandsService([command], self.reactor)
        service.startService()
        d = self.line("diskfree .")
        [child] = self.reactor.processes
        stopped = service.stopService()
        self.assertEqual(child.signals, ["KILL"])
        self.assertEqual(self.successResultOf(d).lines, ["Error: cancelled"])
        self.assertNoResult(stopped)
        child.exit(None, 9)
        self.successResultOf(stopped)
        self.assertEqual(command.running, set())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_shutdown_waits_for_the_children_a_few_seconds_at_most(self) -> None:
        command = self.core.registry.get("diskfree")
        assert isinstance(command, DeclaredCommand)
        service = DeclaredCommandsService([command], self.reactor)
        service.startService()
        self.line("diskfree .")
        stopped = service.stopService()
        self.reactor.advance(declared.SHUTDOWN_WAIT - 0.1)
        self.assertNoResult(stopped)
        self.reactor.advance(0.1)
        self.successResultOf(stopped)
        self.reactor.processes[0].exit(None, 9)  # reaped late: nothing breaks
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_shutdown_with_nothing_running(self) -> None:
        command = self.core.registry.get("diskfree")
        assert isinstance(command, DeclaredCommand)
        service = DeclaredCommandsService([command], self.reactor)
        service.startService()
        self.successResultOf(service.stopService())


def test_reserved_names_cover_every_built_in_and_pb_entry():
    from cmdserver.commands import default_registry
    from cmdserver.commands.lastlog import LogSource
    from cmdserver.doors.pb.door import PB_ENTRIES

    registry = default_registry(LogSource(None))
    names = {c.name for c in registry.commands()} | {"quit", "login", "upload", "portscan"}
    assert names | PB_ENTRIES <= RESERVED_NAMES


def bad(**changes: Any) -> dict[str, Any]:
    table = json.loads(json.dumps(DISKFREE))
    for key, value in changes.items():
        if value is None:
            del table[key]
        else:
            table[key] = value
    return table


@pytest.mark.parametrize("name, table, message", [
    ("diskfree", bad(argv=["df", "{path}"]), "'df' is not an absolute path"),
    ("diskfree", bad(argv=["/nonexistent/df", "{path}"]), "is not an existing file"),
    ("diskfree", bad(argv=["/etc/passwd", "{path}"]), "/etc/passwd is not executable"),
    ("diskfree", bad(argv=["/bin", "{path}"]), "/bin is not an existing file"),
    ("diskfree", bad(argv=["{path}"]), "the program cannot be a placeholder"),
    ("diskfree", bad(argv=[]), "argv: empty"),
    ("diskfree", bad(argv="/bin/df {path}"), "argv: expected a list of strings"),
    ("diskfree", bad(argv=None), "argv: missing"),
    ("diskfree", bad(argv=["/bin/df", "--path={path}"]), "must be a whole argv element"),
    ("diskfree", bad(argv=["/bin/df", "{path"]), "must be a whole argv element"),
    ("diskfree", bad(argv=["/bin/df", "{Path}"]), "plain lowercase name"),
    ("diskfree", bad(argv=["/bin/df"]), "args.path: not used by any {path} in argv"),
    ("diskfree", bad(argv=["/bin/df", "{path}", "{other}"]),
     "placeholder {other} is not declared in args"),
    ("diskfree", bad(args={"path": {"type": "file"}}), "unknown type 'file'"),
    ("diskfree", bad(args={"path": {}}), "type is missing"),
    ("diskfree", bad(args={"path": "path"}), "expected a table"),
    ("diskfree", bad(args={"path": {"type": "path", "min": 1}}),
     "unknown key(s) for a path: min"),
    ("diskfree", bad(args={"path": {"type": "path", "allow_dash": "yes"}}),
     "not true or false"),
    ("diskfree", bad(shell=True), "unknown key(s): shell"),
    ("diskfree", bad(summary=None), "summary: a one-line summary is required"),
    ("diskfree", bad(summary="two\nlines"), "one printable line"),
    ("diskfree", bad(timeout=-1), "timeout"),
    ("diskfree", bad(timeout="10"), "timeout"),
    ("diskfree", bad(max_output="lots"), "max_output"),
    ("diskfree", bad(doors=["line", "http"]), "doors: http"),
    ("diskfree", bad(doors=[]), "doors: empty"),
    ("diskfree", bad(ok_status=[0, 256]), "ok_status"),
    ("diskfree", bad(order=["path", "path"]), "order: must name every argument once"),
    ("ls", DISKFREE, "'ls' is a built-in command"),
    ("quit", DISKFREE, "'quit' is a built-in command"),
    ("call", DISKFREE, "'call' is a built-in command"),
    ("Disk", DISKFREE, "plain lowercase word"),
    ("disk-free", DISKFREE, "plain lowercase word"),
    ("disk free", DISKFREE, "plain lowercase word"),
    ("diskfree", "df", "expected a table"),
    ("num", {"summary": "n", "argv": ["/bin/echo", "{n}"],
             "args": {"n": {"type": "int", "min": 5, "max": 1}}}, "min 5 is greater than max 1"),
    ("num", {"summary": "n", "argv": ["/bin/echo", "{n}"],
             "args": {"n": {"type": "int", "min": -5}}}, "set allow_dash = true"),
    ("num", {"summary": "n", "argv": ["/bin/echo", "{n}"],
             "args": {"n": {"type": "int", "max": "9"}}}, "not a whole number"),
    ("num", {"summary": "n", "argv": ["/bin/echo", "{n}"],
             "args": {"n": {"type": "int", "min": 1, "max": 5, "default": 9}}},
     "default: n must be 1..5, not 9"),
    ("w", {"summary": "w", "argv": ["/bin/echo", "{w}"],
           "args": {"w": {"type": "word", "pattern": "[a-z"}}}, "bad regular expression"),
    ("w", {"summary": "w", "argv": ["/bin/echo", "{w}"],
           "args": {"w": {"type": "word", "default": "-x"}}}, "may not start with '-'"),
    ("c", {"summary": "c", "argv": ["/bin/echo", "{c}"],
           "args": {"c": {"type": "choice", "values": []}}}, "at least one value"),
    ("c", {"summary": "c", "argv": ["/bin/echo", "{c}"],
           "args": {"c": {"type": "choice", "values": ["-a"]}}}, "set allow_dash = true"),
    ("c", {"summary": "c", "argv": ["/bin/echo", "{c}"],
           "args": {"c": {"type": "choice"}}}, "values: expected a list of strings"),
    ("o", {"summary": "o", "argv": ["/bin/echo", "{observer}"],
           "args": {"observer": {"type": "path"}}}, "'observer' is reserved"),
    ("o", {"summary": "o", "argv": ["/bin/echo", "{a}", "{b}"],
           "args": {"a": {"type": "path", "default": "."}, "b": {"type": "path"}}},
     "a required argument after an optional one"),
])
def test_bad_tables_are_one_line_errors(name, table, message):
    with pytest.raises(ConfigError) as e:
        declared_commands({name: table})
    text = str(e.value)
    assert message in text
    assert text.startswith(f"commands.{name}")
    assert "\n" not in text


def test_commands_must_be_a_table():
    with pytest.raises(ConfigError, match="expected a table"):
        declared_commands(["diskfree"])


def test_a_good_table():
    [command] = declared_commands({"diskfree": DISKFREE})
    assert (command.name, command.usage, command.timeout) == ("diskfree", "diskfree PATH", 10.0)
    assert command.streams and command.max_output is None and command.doors is None
    assert command.child_argv({"path": "/srv/x y"}) == ["/bin/df", "-P", "/srv/x y"]
