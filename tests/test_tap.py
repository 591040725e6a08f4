"""Options, the TOML file and what makeService builds."""

from __future__ import annotations

import os
import stat

import pytest
from twisted.python import usage

from cmdserver import tap
from cmdserver.commands.lastlog import LastLog
from cmdserver.service import CmdServerService


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    options = parse()
    assert options["line"] == ["tcp:9999:interface=127.0.0.1"]
    assert options["data-dir"] == str(tmp_path / "cmdserver-data")
    assert options["root"] == []
    assert (options["max-clients"], options["max-per-ip"]) == (100, 10)
    assert (options["idle-timeout"], options["max-line"]) == (300.0, 4096)
    assert options["log-source"] is None and options["audit-log"] is None


def test_repeatable_options(tmp_path):
    options = parse("--line", "tcp:0:interface=127.0.0.1", "--line", f"unix:{tmp_path}/s",
                    "--root", str(tmp_path), "--root", "/tmp")
    assert options["line"] == ["tcp:0:interface=127.0.0.1", f"unix:{tmp_path}/s"]
    assert options["root"] == [str(tmp_path), "/tmp"]


@pytest.mark.parametrize("argv, message", [
    (["--max-clients", "0"], "max-clients"),
    (["--max-clients", "many"], "max-clients"),
    (["--max-per-ip", "-1"], "max-per-ip"),
    (["--idle-timeout", "-5"], "idle-timeout"),
    (["--idle-timeout", "inf"], "idle-timeout"),
    (["--max-line", "1.5"], "max-line"),
    (["--line", "tcp:notaport"], "--line tcp:notaport"),
    (["--line", "bogus:1"], "--line bogus:1"),
    (["--line", "none", "--ssh", "none", "--pb", "none", "--http", "none"], "no front door"),
    (["--pb", "bogus:1"], "--pb bogus:1"),
    (["--ssh", "tcp:x"], "--ssh tcp:x"),
    (["--sftp-max-handles", "0"], "sftp-max-handles"),
    (["--root", "/nonexistent/dir"], "not an existing directory"),
    (["--config", "/nonexistent.toml"], "No such file"),
    (["--frobnicate"], "frobnicate"),
])
def test_invalid_values_are_rejected(argv, message):
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert message in str(e.value)


def test_config_file_and_command_line_wins(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f"""
line = "tcp:0:interface=127.0.0.1"
root = ["{tmp_path}"]
max-clients = 7
max-per-ip = 3
idle-timeout = 12.5
data-dir = "{tmp_path}/state"
""")
    options = parse("--config", str(config), "--max-clients", "9")
    assert options["max-clients"] == 9
    assert options["max-per-ip"] == 3
    assert options["idle-timeout"] == 12.5
    assert options["line"] == ["tcp:0:interface=127.0.0.1"]
    assert options["root"] == [str(tmp_path)]
    assert options["data-dir"] == str(tmp_path / "state")
    options = parse("--config", str(config), "--line", "tcp:1:interface=127.0.0.1")
    assert options["line"] == ["tcp:1:interface=127.0.0.1"]


@pytest.mark.parametrize("body, message", [
    ("max-clients = 0", "max-clients"),
    ("max-clients = true", "max-clients"),
    ("max-clients = 2.5", "max-clients"),
    ("line = 5", "line: expected a string or a list of strings"),
    ("colour = 'blue'", "unknown setting(s): colour"),
    ("this is not toml", "Expected"),
])
def test_bad_config_files(tmp_path, body, message):
    config = tmp_path / "c.toml"
    config.write_text(body)
    with pytest.raises(usage.UsageError) as e:
        parse("--config", str(config))
    assert message in str(e.value)


def test_make_service(tmp_path):
    data = tmp_path / "data"
    options = parse("--data-dir", str(data), "--line", "tcp:0:interface=127.0.0.1",
                    "--line", f"unix:{tmp_path}/sock", "--log-source", "/var/log/x",
                    "--max-clients", "5", "--max-per-ip", "2")
    service = tap.makeService(options)
    assert isinstance(service, CmdServerService)
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert os.path.isdir(data / "files")
    assert service.core.policy.roots == [os.path.realpath(data / "files")]
    assert [(d.door, d.description) for d in service.doors] == [
        ("line", "tcp:0:interface=127.0.0.1"), ("line", f"unix:{tmp_path}/sock"),
        ("ssh", "tcp:2222:interface=127.0.0.1"), ("pb", "tcp:9876:interface=127.0.0.1"),
        ("http", "tcp:9898:interface=127.0.0.1")]
    assert (service.limits.max_total, service.limits.max_per_host) == (5, 2)
    assert service.audit is not None and service.audit.path == str(data / "audit.log")
    lastlog = service.core.registry.get("lastlog")
    assert isinstance(lastlog, LastLog) and lastlog.source.path == "/var/log/x"
    # Every door shares the one core and the one set of limits.
    line_doors = [d for d in service.doors if d.door == "line"]
    assert {d.factory.wrappedFactory.core for d in line_doors} == {service.core}
    assert {id(d.factory.limits) for d in service.doors} == {id(service.limits)}


def test_the_ssh_door_gets_the_sftp_limits(tmp_path):
    options = parse("--data-dir", str(tmp_path), "--line", "none", "--pb", "none",
                    "--http", "none", "--ssh", "tcp:0:interface=127.0.0.1", "--max-upload", "5M",
                    "--sftp-max-handles", "16")
    [door] = tap.makeService(options).doors
    settings = door.factory.wrappedFactory.settings
    assert (settings.max_upload, settings.sftp_max_handles) == (5 << 20, 16)
    assert parse("--data-dir", str(tmp_path))["sftp-max-handles"] == 64


def test_existing_data_dir_is_tightened(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)
    tap.makeService(parse("--data-dir", str(data), "--audit-log", "none"))
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700


def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    data = tmp_path / "file" / "data"
    with pytest.raises(SystemExit) as e:
        tap.makeService(parse("--data-dir", str(data), "--audit-log", "none"))
    assert str(e.value) == f"cmdserver: --data-dir {data}: Not a directory"


def test_an_audit_log_that_cannot_be_opened_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        tap.makeService(parse("--data-dir", str(tmp_path), "--audit-log", str(tmp_path)))
    assert str(e.value) == f"cmdserver: --audit-log {tmp_path}: Is a directory"


def test_audit_log_off_and_own_log_fallback(tmp_path, monkeypatch):
    from cmdserver.commands import lastlog

    monkeypatch.setattr(lastlog, "SYSLOG_FILES", ())
    monkeypatch.setattr(lastlog, "journal_works", lambda: False)
    service = tap.makeService(parse("--data-dir", str(tmp_path), "--audit-log", "none"))
    assert service.audit is None
    service = tap.makeService(parse("--data-dir", str(tmp_path)))
    command = service.core.registry.get("lastlog")
    assert isinstance(command, LastLog) and command.source.path == str(tmp_path / "audit.log")


def test_given_roots_are_used(tmp_path):
    service = tap.makeService(parse("--data-dir", str(tmp_path / "d"), "--root", str(tmp_path)))
    assert service.core.policy.roots == [os.path.realpath(tmp_path)]
    assert not os.path.exists(tmp_path / "d" / "files")


def test_help_documents_every_option():
    text = str(tap.Options())
    for name in tap.SETTINGS:
        assert f"--{name}" in text
    assert "--config" in text


def test_http_options(tmp_path):
    options = parse()
    assert options["http"] == ["tcp:9898:interface=127.0.0.1"]
    assert options["http-host"] == [] and options["metrics-public"] is False
    options = parse("--http", "tcp:0:interface=127.0.0.1", "--http", f"unix:{tmp_path}/h",
                    "--http-host", "cmd.example.org", "--metrics-public")
    assert options["http"] == ["tcp:0:interface=127.0.0.1", f"unix:{tmp_path}/h"]
    assert (options["http-host"], options["metrics-public"]) == (["cmd.example.org"], True)
    assert parse("--http", "none")["http"] == []
    config = tmp_path / "c.toml"
    config.write_text('http = "tcp:0"\nhttp-host = ["a.example"]\nmetrics-public = true\n')
    options = parse("--config", str(config))
    assert (options["http"], options["http-host"], options["metrics-public"]) == (
        ["tcp:0"], ["a.example"], True)
    for argv, message in ((["--http", "bogus:1"], "--http bogus:1"),
                          (["--http-host", "not a name"], "--http-host: invalid host name")):
        with pytest.raises(usage.UsageError) as e:
            parse(*argv)
        assert message in str(e.value)


def test_login_gate_options(tmp_path):
    from cmdserver.auth.credentials import HashPool
    from cmdserver.auth.gate import GateSettings

    data = str(tmp_path / "data")
    defaults = parse("--data-dir", data)
    assert (defaults["login-penalty"], defaults["login-penalty-max"],
            defaults["penalty-exempt"], defaults["login-grace"],
            defaults["login-threads"]) == (1.0, 60.0, [], 30.0, 2)
    options = parse("--data-dir", data, "--login-penalty", "2", "--login-penalty-max", "90",
                    "--penalty-exempt", "10.0.0.0/8", "--penalty-exempt", "local",
                    "--login-grace", "45", "--login-threads", "3", "--audit-log", "none")
    service = tap.makeService(options)
    # One gate for every door: the core's, and the limits every door passes through.
    assert service.core.gate.settings == GateSettings(2.0, 90.0, ("10.0.0.0/8", "local"),
                                                      45.0, 2)
    assert {d.factory.gate for d in service.doors} == {service.core.gate}
    [pool] = [s for s in service if isinstance(s, HashPool)]
    assert pool.size == 3


def test_login_gate_options_in_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('penalty-exempt = "192.0.2.0/24"\nlogin-penalty = 0\n')
    options = parse("--config", str(config))
    assert (options["penalty-exempt"], options["login-penalty"]) == (["192.0.2.0/24"], 0)


@pytest.mark.parametrize("argv, message", [
    (["--penalty-exempt", "10.0.0.0/33"], "--penalty-exempt"),
    (["--penalty-exempt", "somewhere"], "--penalty-exempt"),
    (["--login-penalty", "-1"], "login-penalty"),
    (["--login-penalty", "10", "--login-penalty-max", "5"], "--login-penalty-max"),
    (["--login-grace", "0"], "login-grace"),
    (["--login-threads", "0"], "login-threads"),
])
def test_login_gate_bad_values(argv, message):
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert message in str(e.value)


def line_greetings(service: CmdServerService) -> list[str]:
    return [d.factory.wrappedFactory.settings.greeting for d in service.doors
            if d.door == "line"]


def test_no_greeting_unless_given(tmp_path):
    options = parse("--data-dir", str(tmp_path / "a"), "--line", "tcp:0:interface=127.0.0.1",
                    "--ssh", "none", "--pb", "none", "--http", "none")
    assert options["greeting"] is None
    assert line_greetings(tap.makeService(options)) == [""]


def test_greeting_reaches_every_line_door(tmp_path):
    text = "cmdserver on build-7 \u00e9t\u00e9 \u2014 type 'help'"
    options = parse("--data-dir", str(tmp_path / "b"), "--line", "tcp:0:interface=127.0.0.1",
                    "--line", f"unix:{tmp_path}/s", "--greeting", text,
                    "--pb", "none", "--http", "none", "--ssh", "tcp:0:interface=127.0.0.1")
    service = tap.makeService(options)
    assert line_greetings(service) == [text, text]
    # The SSH shell keeps its own greeting.
    [ssh] = [d for d in service.doors if d.door == "ssh"]
    assert ssh.factory.wrappedFactory.settings.greeting.startswith("cmdserver ")


def test_greeting_in_toml_and_an_empty_one_wins(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('greeting = "hello from the file"\n')
    assert parse("--config", str(config))["greeting"] == "hello from the file"
    assert parse("--config", str(config), "--greeting", "")["greeting"] == ""


@pytest.mark.parametrize("text, shown", [
    ("two\nlines", r"'\n' at character 4"),
    ("ready\r", r"'\r' at character 6"),
    ("\x1b[2Jready", r"'\x1b' at character 1"),
    ("tab\there", r"'\t' at character 4"),
    ("evil \u202egnp", r"'\u202e' at character 6"),
    ("c1 \x9b2J", r"'\x9b' at character 4"),
])
def test_a_greeting_must_be_one_printable_line(text, shown):
    with pytest.raises(usage.UsageError) as e:
        parse("--greeting", text)
    assert str(e.value) == f"--greeting: {text!r} is not one line of printable text ({shown})"


def test_a_greeting_in_toml_must_be_text(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("greeting = 5\n")
    with pytest.raises(usage.UsageError) as e:
        parse("--config", str(config))
    assert str(e.value) == f"{config}: greeting: 5 is not a string"
