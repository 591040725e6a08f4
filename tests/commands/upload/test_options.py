"""Upload options (--max-upload, --overwrite, TOML), the server key and the client helpers."""

from __future__ import annotations

import io
import os

import pytest
from twisted.python import usage

from cmdserver.cli import build_parser
from cmdserver.cli.upload import MAX_PREAMBLE_LINES, Progress, UploadFailed, file_hmac, wait_ready
from cmdserver.commands.upload.engine import byte_size
from cmdserver.commands.upload.key import BadKeyError, parse_key, read_key_file, server_key
from cmdserver.tap import Options
from tests.helpers.upload import KEY, mac_of


def parse(args: list[str], tmp_path) -> Options:
    options = Options()
    options.parseOptions(["--data-dir", str(tmp_path / "data"), *args])
    return options


def test_defaults(tmp_path):
    options = parse([], tmp_path)
    assert options["max-upload"] == 1 << 30
    assert options["overwrite"] is False


def test_command_line(tmp_path):
    options = parse(["--max-upload", "512M", "--overwrite"], tmp_path)
    assert options["max-upload"] == 512 << 20
    assert options["overwrite"] is True


def test_toml(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('max-upload = "2GiB"\noverwrite = true\n')
    options = parse(["--config", str(config)], tmp_path)
    assert options["max-upload"] == 2 << 30
    assert options["overwrite"] is True
    options = parse(["--config", str(config), "--max-upload", "1000"], tmp_path)
    assert options["max-upload"] == 1000


@pytest.mark.parametrize("toml", ['max-upload = "lots"', "max-upload = -1",
                                  'overwrite = "yes"', "max-upload = true"])
def test_bad_toml(tmp_path, toml):
    config = tmp_path / "c.toml"
    config.write_text(toml + "\n")
    with pytest.raises(usage.UsageError):
        parse(["--config", str(config)], tmp_path)


def test_bad_command_line(tmp_path):
    with pytest.raises(usage.UsageError):
        parse(["--max-upload", "1X"], tmp_path)


@pytest.mark.parametrize("text,value", [("0", 0), ("1048576", 1 << 20), ("1k", 1024),
                                        ("512M", 512 << 20), ("1GiB", 1 << 30),
                                        (" 2 G ", 2 << 30), (7, 7)])
def test_byte_size(text, value):
    assert byte_size(text) == value


def test_server_key_created_once_0600(tmp_path):
    key = server_key(str(tmp_path))
    path = tmp_path / "hmac.key"
    assert len(key) == 32
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert server_key(str(tmp_path)) == key
    assert read_key_file(str(path)) == key
    assert sorted(os.listdir(tmp_path)) == ["hmac.key"]


def test_parse_key():
    assert parse_key("00" * 32) == bytes(32)
    assert parse_key(b"ab" * 16 + b"\n") == b"\xab" * 16
    raw = bytes(range(200, 232))
    assert parse_key(raw) == raw
    with pytest.raises(BadKeyError):
        parse_key("abcd")
    with pytest.raises(BadKeyError):
        parse_key("not hex at all, not bytes")


def test_file_hmac_matches_and_reports_progress():
    data = os.urandom(3 * (1 << 20) + 5)
    seen: list[int] = []
    assert file_hmac(io.BytesIO(data), KEY, len(data), seen.append) == mac_of(data)
    assert seen[-1] == len(data)


def test_progress_is_silent_off_a_terminal():
    stream = io.StringIO()
    bar = Progress("sending", 100, stream)
    bar.update(50)
    bar.update(100, final=True)
    assert stream.getvalue() == ""


def test_progress_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = Progress("sending", 4 << 20, stream)
    bar.update(4 << 20, final=True)
    assert "100%" in stream.getvalue() and "ETA" in stream.getvalue()
    assert bar.render(1 << 20, 1.0).endswith("4.0 MiB 1.0 MiB/s ETA 0:03")


def test_cli_arguments():
    args = build_parser().parse_args(["upload", "f", "--as", "n", "--port", "1"])
    assert (args.file, args.name, args.port, args.host) == ("f", "n", 1, "127.0.0.1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["upload", "f", "--key-file", "k", "--key-env",
                                            "V"])


def test_upload_macs(tmp_path):
    assert parse([], tmp_path)["upload-macs"] == ("hmac-sha256", "blake2b")
    assert parse(["--upload-macs", "hmac-sha256"], tmp_path)["upload-macs"] == ("hmac-sha256",)
    config = tmp_path / "c.toml"
    config.write_text('upload-macs = ["blake2b", "hmac-sha256"]\n')
    assert parse(["--config", str(config)], tmp_path)["upload-macs"] == ("blake2b",
                                                                         "hmac-sha256")
    for bad in ("md5", "", "hmac-sha256,sha1"):
        with pytest.raises(usage.UsageError):
            parse(["--upload-macs", bad], tmp_path)


def test_cli_upload_options():
    args = build_parser(only_upload=True).parse_args(["upload", "f"])
    assert (args.mac, args.sha256, args.mac_first) == ("hmac-sha256", False, False)
    args = build_parser().parse_args(["upload", "f", "--mac", "blake2b", "--sha256",
                                      "--mac-first"])
    assert (args.mac, args.sha256, args.mac_first) == ("blake2b", True, True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["upload", "f", "--mac", "md5"])


@pytest.mark.parametrize("before", [
    [],  # the line door greets no one unless told to
    ["cmdserver 0.1.0 ready; type 'help' for the commands."],
    ["Ready for anything: type 'help'", "Logged in as ops"],  # a greeting, the login's answer
])
def test_the_client_waits_for_its_ready_line(before):
    lines = [*before, "Ready for 42 bytes", "more"]
    reader = io.BytesIO("".join(f"{line}\r\n" for line in lines).encode())
    wait_ready(reader, 42)
    assert reader.readline() == b"more\r\n"  # nothing read past it


@pytest.mark.parametrize("lines, message", [
    (["Error: login failed"], "Error: login failed"),
    (["Welcome", "Error: target exists: a.bin"], "Error: target exists: a.bin"),
    (["Command not found."], "Command not found."),
    ([], "Error: the server closed the connection"),
    (["chatter"] * MAX_PREAMBLE_LINES, "Error: the server did not answer the upload command"),
])
def test_the_client_reports_what_came_instead(lines, message):
    reader = io.BytesIO("".join(f"{line}\r\n" for line in lines).encode())
    with pytest.raises(UploadFailed) as e:
        wait_ready(reader, 42)
    assert str(e.value) == message
