"""help, ping, stats and exit as the text doors print them."""

from __future__ import annotations

import json

from twisted.trial import unittest

from cmdserver.commands.basic import format_duration
from cmdserver.core import TextReply
from tests.helpers import make_context, make_core


class EndRecorder:
    def __init__(self) -> None:
        self.ended = 0

    def end_session(self) -> None:
        self.ended += 1


class BasicCommandTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.core = make_core(self.mktemp())
        self.session = EndRecorder()
        self.ctx = make_context(self.core, session=self.session)

    def lines(self, line: str) -> list[str]:
        return self.successResultOf(self.core.run_line(self.ctx, line)).lines

    def test_help_lists_every_command_once(self) -> None:
        lines = self.lines("help")
        self.assertEqual(lines[0], "Commands:")
        names = [line.split()[0] for line in lines[1:-1]]
        self.assertEqual(names, [c.name for c in self.core.registry.commands()])
        self.assertEqual(names, sorted(names))
        self.assertLessEqual({"comphash", "exit", "help", "lastlog", "ls", "ping", "stats"},
                             set(names))
        self.assertNotIn("quit", names)  # aliases are not listed twice
        self.assertEqual(lines[-1], "Type 'help COMMAND' for its usage.")

    def test_help_name_shows_usage(self) -> None:
        self.assertEqual(self.lines("help ls"), [
            "Usage: ls [PATH]",
            "  List the names in a directory inside the allowed roots.",
            "    path: the directory (default: the first root)",
        ])

    def test_help_for_an_alias(self) -> None:
        self.assertEqual(self.lines("help quit")[0], "Usage: exit")

    def test_help_errors(self) -> None:
        self.assertEqual(self.lines("help nosuch"), ["Error: no such command: nosuch"])
        self.assertEqual(self.lines("help a b"), ["Error: usage: help [COMMAND]"])

    def test_ping(self) -> None:
        self.assertEqual(self.lines("ping"), ["pong"])

    def test_stats_text(self) -> None:
        self.core.stats.connection_opened("line")
        self.core.reactor.advance(3725)
        self.lines("ping")
        lines = self.lines("stats")
        self.assertEqual(lines, [
            "uptime: 01:02:05",
            "connections: 1 open (line 1), 1 since start, 0 refused",
            "commands in flight: 1",
            "commands run: ping 1, stats 1",
            "command errors: 0",
            "commands not found: 0",
            "file operations: none",
            "logins: 0 ok, 0 failed, 0 refused; 0 penalties",
        ])

    def test_stats_count_unknown_commands_file_operations_and_logins(self) -> None:
        self.lines("nosuch")
        reply = self.core.run_text(self.ctx, "nosuch either")
        assert isinstance(reply, TextReply)
        self.assertEqual(reply.ok, False)
        session = self.core.open_session("line", "10.0.0.1:2")
        self.core.login(session, "ops", "password", "ok")
        self.core.login(session, "ghost", "password", "failed")
        self.core.login(session, "eve", "key", "failed")
        self.core.login(session, "eve", "password", "refused", "too many logins at once")
        self.core.audit_penalty(session, "eve", "10.0.0.1", 2.0, 2)
        self.core.stats.refused, self.core.stats.refused_penalised = 3, 2
        for name in ("put", "get", "put"):
            self.core.audit_operation(self.ctx, name, {"path": "a"}, "ok", 0.0)
        lines = self.lines("stats")
        self.assertEqual(lines[5:], ["commands not found: 2", "file operations: get 1, put 2",
                                     "logins: 1 ok, 2 failed, 1 refused; 1 penalties"])
        self.assertTrue(lines[1].endswith("3 refused (2 for login penalties)"), lines[1])
        value = self.successResultOf(self.core.call(self.ctx, "stats"))
        self.assertEqual((value["not_found"], value["file_operations"], value["logins"],
                          value["login_failures"], value["logins_refused"], value["penalties"],
                          value["refused"], value["refused_penalised"]),
                         (2, {"get": 1, "put": 2}, 1, 2, 1, 1, 3, 2))

    def test_stats_value(self) -> None:
        value = self.successResultOf(self.core.call(self.ctx, "stats"))
        self.assertEqual(value["connections"], 0)
        self.assertEqual(value["commands"], {"stats": 1})
        self.assertEqual(value["in_flight"], 1)
        self.assertEqual((value["not_found"], value["logins"], value["login_failures"],
                          value["file_operations"]), (0, 0, 0, {}))

    def test_stats_json_is_the_value_on_one_line(self) -> None:
        self.core.stats.connection_opened("line")
        [line] = self.lines("stats --json")
        value = json.loads(line)
        self.assertEqual(value["connections_by_door"], {"line": 1})
        self.assertEqual(value["commands"], {"stats": 1})
        self.assertEqual(set(value), set(self.successResultOf(
            self.core.call(self.ctx, "stats"))))
        self.assertEqual(self.lines("stats --json=false")[0], "uptime: 00:00:00")
        self.assertEqual(self.lines("stats --json=maybe"),
                         ["Error: json is true or false, not 'maybe'; usage: stats [--json]"])
        self.assertEqual(self.lines("help stats")[0], "Usage: stats [--json]")
        # Named values: a boolean, and the value is that line.
        text = self.successResultOf(self.core.call(self.ctx, "stats", json=True))
        self.assertEqual(json.loads(text)["commands"]["stats"], 4)  # refusals do not run
        failure = self.failureResultOf(self.core.call(self.ctx, "stats", json="yes"))
        self.assertEqual(failure.value.message, "json must be true or false")

    def test_exit_and_quit_end_the_session(self) -> None:
        self.assertEqual(self.lines("exit"), ["bye !"])
        self.assertEqual(self.lines("quit"), ["bye !"])
        self.assertEqual(self.session.ended, 2)

    def test_exit_takes_no_arguments(self) -> None:
        self.assertEqual(self.lines("exit now"), ["Error: usage: exit"])
        self.assertEqual(self.session.ended, 0)


def test_format_duration():
    assert format_duration(0) == "00:00:00"
    assert format_duration(59.9) == "00:00:59"
    assert format_duration(86400 * 3 + 3600 * 4 + 65) == "3d 04:01:05"
