"""[commands.NAME] tables in the TOML file: accepted, refused with one line, served."""

from __future__ import annotations

import pytest
from twisted.python import usage

from cmdserver import tap
from cmdserver.commands.declared import DeclaredCommand

DISKFREE = """
[commands.diskfree]
summary = "Free space of a filesystem inside the roots"
argv = ["/bin/df", "-P", "{path}"]
args.path = { type = "path" }
timeout = 10
"""


def parse_config(tmp_path, body: str, *argv: str) -> tap.Options:
    config = tmp_path / "c.toml"
    config.write_text(body)
    options = tap.Options()
    options.parseOptions(["--config", str(config), "--data-dir", str(tmp_path / "data"),
                          "--line", "tcp:0:interface=127.0.0.1", "--ssh", "none",
                          "--pb", "none", "--http", "none", *argv])
    return options


def test_commands_table_is_accepted_and_served(tmp_path):
    options = parse_config(tmp_path, DISKFREE + """
[commands.snooze]
summary = "Sleep a while"
argv = ["/bin/sleep", "30"]
timeout = 1
doors = ["line", "ssh"]
max_output = "64K"
""")
    diskfree, snooze = options["commands"]
    assert isinstance(diskfree, DeclaredCommand)
    assert (diskfree.name, diskfree.usage, diskfree.timeout) == ("diskfree", "diskfree PATH", 10)
    assert (snooze.timeout, snooze.doors, snooze.max_output) == (
        1, frozenset({"line", "ssh"}), 65536)
    service = tap.makeService(options)
    assert service.core.registry.get("diskfree") is diskfree
    assert service.core.registry.get("snooze") is snooze
    assert service.getServiceNamed("declared-commands").commands == [diskfree, snooze]


def test_no_commands_no_service(tmp_path):
    options = parse_config(tmp_path, "max-clients = 5\n")
    assert options["commands"] == []
    service = tap.makeService(options)
    with pytest.raises(KeyError):
        service.getServiceNamed("declared-commands")


def table(name: str = "diskfree", argv: str = '["/bin/df", "-P", "{path}"]',
          args: str = 'args.path = { type = "path" }', extra: str = "") -> str:
    return f'[commands.{name}]\nsummary = "s"\nargv = {argv}\n{args}\n{extra}\n'


BUILT_INS = ["help", "ping", "stats", "ls", "comphash", "lastlog", "portscan", "upload",
             "login", "whoami", "exit", "quit"]


@pytest.mark.parametrize("body, message", [
    (table(args='args.path = { type = "file" }'), "unknown type 'file'"),
    (table(extra="shell = true"), "commands.diskfree: unknown key(s): shell"),
    (table(args='args.path = { type = "path", mode = 1 }'), "unknown key(s) for a path: mode"),
    (table(argv='["/bin/df", "-P"]'), "commands.diskfree.args.path: not used by any {path}"),
    (table(argv='["/bin/df", "{path}", "{dir}"]'), "placeholder {dir} is not declared"),
    (table(argv='["/bin/df", "--path={path}"]'), "must be a whole argv element"),
    (table(argv='["df", "{path}"]'), "argv[0]: 'df' is not an absolute path"),
    (table(argv='["/nonexistent/df", "{path}"]'), "/nonexistent/df is not an existing file"),
    (table(argv='["TMP/data.txt", "{path}"]'), "data.txt is not executable"),
    *[(table(name=name), f"'{name}' is a built-in command") for name in BUILT_INS],
    (table(name="DiskFree"), "plain lowercase word"),
    (table(name='"disk free"'), "plain lowercase word"),
    (table(args='args.path = { type = "word", pattern = "[a-" }'), "bad regular expression"),
    (table(args='args.path = { type = "int", min = 9, max = 1 }'),
     "min 9 is greater than max 1"),
    (table(argv='["/bin/df", "{observer}"]', args='args.observer = { type = "path" }'),
     "'observer' is reserved"),
    ("commands = 5\n", "commands: expected a table"),
])
def test_bad_commands_stop_the_start_with_one_line(tmp_path, body, message):
    (tmp_path / "data.txt").write_text("not a program\n")  # mode 0644
    with pytest.raises(usage.UsageError) as e:
        parse_config(tmp_path, body.replace("TMP", str(tmp_path)))
    text = str(e.value)
    assert message in text
    assert text.startswith(str(tmp_path / "c.toml") + ": commands")
    assert "\n" not in text
