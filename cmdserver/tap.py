"""``twistd cmdserver``: options (command line and TOML file) and makeService."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from cmdserver.commands import default_registry
from cmdserver.commands.lastlog import choose_source
from cmdserver.commands.upload import UploadCommand
from cmdserver.core import CommandCore
from cmdserver.doors.line import TOO_MANY, LineFactory, LineSettings
from cmdserver.policy import Policy
from cmdserver.service import CmdServerService, Limits
from cmdserver.upload import Uploads, UploadService, UploadSettings, byte_size, flag
from cmdserver.upload_key import server_key

log = Logger()

NONE = "none"


def positive_int(value: Any) -> int:
    if isinstance(value, bool | float):
        raise ValueError(f"{value!r} is not a whole number")
    number = int(value)
    if number < 1:
        raise ValueError(f"{value!r} is not a positive whole number")
    return number


def non_negative_number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)
    if not 0 <= number < float("inf"):
        raise ValueError(f"{value!r} is not a number of seconds >= 0")
    return number


positive_int.coerceDoc = "A whole number >= 1."  # type: ignore[attr-defined]
non_negative_number.coerceDoc = "Seconds; 0 turns the timeout off."  # type: ignore[attr-defined]

# Every option a TOML file may set too: name -> (default, coerce).  Lists are repeatable.
SETTINGS: dict[str, tuple[Any, Callable[[Any], Any] | None]] = {
    "line": (["tcp:9999:interface=127.0.0.1"], None),
    "root": ([], None),
    "data-dir": ("cmdserver-data", str),
    "max-clients": (100, positive_int),
    "max-per-ip": (10, positive_int),
    "idle-timeout": (300.0, non_negative_number),
    "max-line": (4096, positive_int),
    "log-source": (None, str),
    "audit-log": (None, str),
    # uploads
    "max-upload": (1 << 30, byte_size),
    "overwrite": (False, flag),
}
REPEATABLE = ("line", "root")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve cmdserver's diagnostic commands on the configured front doors. "
        "Every option may also be set in the TOML file given with --config, under "
        "the same name (repeatable options as lists); the command line wins."
    )
    optParameters = [
        ["config", "c", None, "TOML file with settings (same names as these options)."],
        ["data-dir", "d", None,
         "Directory for state: keys, users, uploads; created with mode 0700. "
         "[default: ./cmdserver-data]"],
        ["max-clients", None, None, "Open connections allowed in total, all doors. "
         "[default: 100]", positive_int],
        ["max-per-ip", None, None, "Open connections allowed from one client address. "
         "[default: 10]", positive_int],
        ["idle-timeout", None, None, "Seconds of silence before a client is disconnected. "
         "[default: 300]", non_negative_number],
        ["max-line", None, None, "Longest command line accepted, in bytes. [default: 4096]",
         positive_int],
        ["log-source", None, None, "What lastlog reads: a log file, or 'journal'. [default: "
         "/var/log/syslog, /var/log/messages, the journal, else the audit log]"],
        ["audit-log", None, None, "File for the JSON-lines audit log, or 'none'. "
         "[default: DATA-DIR/audit.log]"],
        ["max-upload", None, None, "Largest upload accepted. [default: 1G]", byte_size],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in REPEATABLE:
            self[name] = []
        self["overwrite"] = None  # a flag the TOML file may set too

    def opt_overwrite(self) -> None:
        """Let an upload replace an existing file (atomically). [default: refuse]"""
        self["overwrite"] = True

    def opt_line(self, endpoint: str) -> None:
        self["line"].append(endpoint)

    def opt_root(self, path: str) -> None:
        self["root"].append(path)

    opt_line.__doc__ = (
        "Endpoint for the line door: tcp:PORT:interface=ADDR, ssl:..., unix:PATH, or "
        "'none'; repeatable. [default: tcp:9999:interface=127.0.0.1]")
    opt_root.__doc__ = (
        "Directory that file commands may touch; repeatable. Relative paths start at "
        "the first. [default: DATA-DIR/files]")

    def postOptions(self) -> None:
        config = load_config(self["config"]) if self["config"] else {}
        for name, (default, coerce) in SETTINGS.items():
            given = self[name]
            if given is None or given == []:
                value = config.get(name, default)
                if coerce is not None and value is not None:
                    try:
                        value = coerce(value)
                    except (TypeError, ValueError) as e:
                        raise usage.UsageError(f"{self['config']}: {name}: {e}") from None
                self[name] = list(value) if name in REPEATABLE else value
        self["data-dir"] = os.path.abspath(self["data-dir"])
        for root in self["root"]:
            if not os.path.isdir(root):
                raise usage.UsageError(f"--root {root}: not an existing directory")
        self["line"] = [e for e in self["line"] if e.lower() != NONE]
        if not self["line"]:
            raise usage.UsageError("no front door is open: give at least one --line endpoint")
        for endpoint in self["line"]:
            check_endpoint("--line", endpoint)


def check_endpoint(option: str, description: str) -> None:
    """Reject a malformed endpoint string now, before anything listens."""
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except Exception as e:  # endpoint parsers raise ValueError, KeyError, OSError...
        raise usage.UsageError(f"{option} {description}: {e}") from None


def load_config(path: str) -> dict[str, Any]:
    """Read the TOML file; unknown keys and wrong types are usage errors."""
    try:
        with open(path, "rb") as f:
            config = tomllib.load(f)
    except OSError as e:
        raise usage.UsageError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"--config {path}: {e}") from None
    unknown = sorted(set(config) - set(SETTINGS))
    if unknown:
        raise usage.UsageError(f"{path}: unknown setting(s): {', '.join(unknown)}")
    for name in REPEATABLE:
        if name in config:
            value = config[name]
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise usage.UsageError(f"{path}: {name}: expected a string or a list of strings")
            config[name] = value
    return config


def prepare_data_dir(path: str) -> None:
    """Create the state directory (0700) or tighten an existing one we own."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)


def makeService(options: Options, reactor: Any = None) -> CmdServerService:
    """Build the whole daemon from parsed options."""
    if reactor is None:
        from twisted.internet import reactor
    data_dir = options["data-dir"]
    prepare_data_dir(data_dir)
    roots = options["root"]
    if not roots:
        roots = [os.path.join(data_dir, "files")]
        os.makedirs(roots[0], mode=0o700, exist_ok=True)
    audit_log = options["audit-log"]
    if audit_log is None:
        audit_log = os.path.join(data_dir, "audit.log")
    elif audit_log.lower() == NONE:
        audit_log = None
    source = choose_source(options["log-source"], audit_log)
    log.info("lastlog reads {source}", source=source.describe())

    registry = default_registry(source)
    uploads = Uploads(UploadSettings(options["max-upload"], options["overwrite"]),
                      server_key(data_dir))
    registry.add(UploadCommand(uploads))
    core = CommandCore(registry, Policy(roots), reactor)
    service = CmdServerService(core, Limits(options["max-clients"], options["max-per-ip"]),
                               audit_log)
    settings = LineSettings(max_line=options["max-line"], idle_timeout=options["idle-timeout"])
    for endpoint in options["line"]:
        service.add_door("line", endpoint, LineFactory(core, settings), refusal=TOO_MANY)
    UploadService(uploads, core.policy.roots, reactor).setServiceParent(service)
    return service
