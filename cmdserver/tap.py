"""``twistd cmdserver``: options (command line and TOML file) and makeService."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from cmdserver.auth.credentials import HashPool, ReloadService, open_credentials
from cmdserver.auth.gate import CHECKS_PER_SOURCE, LOGIN_GRACE, GateSettings
from cmdserver.auth.penalty import parse_exempt
from cmdserver.auth.tls import check_host, is_tls, load_ca
from cmdserver.auth.users import DEFAULT_COST, CredentialError
from cmdserver.commands import default_registry
from cmdserver.commands.account import Login, PasswordLogin
from cmdserver.commands.declared import ConfigError, DeclaredCommandsService, declared_commands
from cmdserver.commands.lastlog import choose_source
from cmdserver.commands.upload.command import UploadCommand
from cmdserver.commands.upload.engine import (
    Uploads,
    UploadService,
    UploadSettings,
    byte_size,
    flag,
    mac_names,
)
from cmdserver.commands.upload.key import server_key
from cmdserver.core import (
    DEFAULT_MAX_CALLS_PER_ADDRESS,
    DEFAULT_MAX_CALLS_PER_SESSION,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    CommandCore,
)
from cmdserver.doors import BUILDERS, DoorEnv, builder
from cmdserver.doors.http.door import DEFAULT_ENDPOINT as HTTP_ENDPOINT
from cmdserver.doors.pb.door import DEFAULT_ENDPOINT as PB_ENDPOINT
from cmdserver.policy import DEFAULT_SCAN_ALLOW, Policy, ScanPolicy, default_max_in_flight
from cmdserver.service import CmdServerService, DataDirLock, Limits, StartupError, reason
from cmdserver.workers import DEFAULT_PER_ADDRESS, DEFAULT_THREADS

log = Logger()

NONE = "none"
LINE_AUTH_MODES = ("required", "optional", "off")


def whole_number(value: Any, minimum: int, what: str) -> int:
    """``value`` as an int of at least ``minimum`` (``what`` names the range in errors)."""
    if isinstance(value, bool | float):
        raise ValueError(f"{value!r} is not a whole number")
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a whole number") from None
    if number < minimum:
        raise ValueError(f"{value!r} is not {what}")
    return number


def positive_int(value: Any) -> int:
    return whole_number(value, 1, "a positive whole number")


def non_negative_number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not 0 <= number < float("inf"):
        raise ValueError(f"{value!r} is not a number of seconds >= 0")
    return number


def line_auth_mode(value: Any) -> str:
    if value not in LINE_AUTH_MODES:
        raise ValueError(f"{value!r} is not one of {', '.join(LINE_AUTH_MODES)}")
    return value


def greeting_text(value: Any) -> str:
    """One line of printable text: a newline would split it, a control or format
    character (ESC, bidi overrides) would act on the client's terminal."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    for i, c in enumerate(value):
        if not c.isprintable():
            raise ValueError(f"{value!r} is not one line of printable text "
                             f"({c!r} at character {i + 1})")
    return value


def bcrypt_cost(value: Any) -> int:
    cost = positive_int(value)
    if not 4 <= cost <= 31:
        raise ValueError(f"{value!r} is not a bcrypt cost from 4 to 31")
    return cost


def poll_interval(value: Any) -> float:
    return non_negative_number(value)


def non_negative_int(value: Any) -> int:
    """A whole number >= 0 (0 turns a limit off)."""
    return whole_number(value, 0, "a whole number >= 0")


def positive_number(value: Any) -> float:
    number = non_negative_number(value)
    if number == 0:
        raise ValueError(f"{value!r} is not a number of seconds > 0")
    return number


# Every option a TOML file may set too: name -> (default, coerce).  Lists are repeatable.
SETTINGS: dict[str, tuple[Any, Callable[[Any], Any] | None]] = {
    "line": (["tcp:9999:interface=127.0.0.1"], None),
    "root": ([], None),
    "data-dir": ("cmdserver-data", str),
    "max-clients": (100, positive_int),
    "max-per-ip": (10, positive_int),
    "idle-timeout": (300.0, non_negative_number),
    "max-line": (4096, positive_int),
    "greeting": (None, greeting_text),
    "log-source": (None, str),
    "audit-log": (None, str),
    # credentials, login and TLS (docs/security.md)
    "line-auth": (None, line_auth_mode),
    "bcrypt-cost": (DEFAULT_COST, bcrypt_cost),
    "users-poll-interval": (2.0, poll_interval),
    "tls-client-ca": (None, str),
    "login-penalty": (1.0, non_negative_number),
    "login-penalty-max": (60.0, non_negative_number),
    "penalty-exempt": ([], None),
    "login-grace": (LOGIN_GRACE, positive_number),
    "login-threads": (2, positive_int),
    # portscan: targets and limits (see docs/security.md)
    "scan-allow": (list(DEFAULT_SCAN_ALLOW), None),
    "scan-max-ports": (65535, positive_int),
    "scan-concurrency": (ScanPolicy.DEFAULT_CONCURRENCY, positive_int),
    "scan-timeout": (1.0, positive_number),
    "scan-max-in-flight": (None, positive_int),
    "ssh": ("tcp:2222:interface=127.0.0.1", str),
    "sftp-max-handles": (64, positive_int),
    # Perspective Broker door
    "pb": (PB_ENDPOINT, str),
    "pb-anonymous": (False, flag),
    # HTTP door: JSON API, XML-RPC, metrics
    "http": ([HTTP_ENDPOINT], None),
    "http-host": ([], None),
    "metrics-public": (False, flag),
    # every command: its deadline and output cap (per command: [command-limits.NAME])
    "command-timeout": (DEFAULT_TIMEOUT, non_negative_number),
    "max-output": (DEFAULT_MAX_OUTPUT, byte_size),
    # work in flight: per client address and per PB connection; the file-work threads
    "max-calls-per-ip": (DEFAULT_MAX_CALLS_PER_ADDRESS, non_negative_int),
    "max-calls-per-connection": (DEFAULT_MAX_CALLS_PER_SESSION, positive_int),
    "worker-threads": (DEFAULT_THREADS, positive_int),
    "worker-threads-per-ip": (DEFAULT_PER_ADDRESS, positive_int),
    # uploads
    "max-upload": (1 << 30, byte_size),
    "overwrite": (False, flag),
    "upload-macs": ("hmac-sha256,blake2b", mac_names),
}
REPEATABLE = ("line", "root", "scan-allow", "http", "http-host", "penalty-exempt")
COMMANDS = "commands"  # the TOML file's [commands.NAME] tables (commands/declared.py)


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
         "[default: 100]"],
        ["max-per-ip", None, None, "Open connections allowed from one client address. "
         "[default: 10]"],
        ["idle-timeout", None, None, "Seconds of silence before a client is disconnected; "
         "0 turns it off. [default: 300]"],
        ["max-line", None, None, "Longest command line accepted, in bytes. [default: 4096]"],
        ["greeting", None, None, "A line the line doors send on connect, before any reply; "
         "one line of printable text. [default: none]"],
        ["log-source", None, None, "What lastlog reads: a log file, or 'journal'. [default: "
         "/var/log/syslog, /var/log/messages, the journal, else the audit log]"],
        ["audit-log", None, None, "File for the JSON-lines audit log, or 'none'. "
         "[default: DATA-DIR/audit.log]"],
        ["line-auth", None, None, "Login on the line door: required, optional or off. "
         "[default: off on endpoints bound to a loopback address only, else required]"],
        ["bcrypt-cost", None, None, "bcrypt cost for passwords the daemon hashes (the "
         "first-run admin). [default: 12]"],
        ["users-poll-interval", None, None, "Seconds between checks for a changed users "
         "file or key file (SIGHUP reloads at once too). [default: 2]"],
        ["tls-client-ca", None, None, "PEM file of the CA whose client certificates the "
         "ssl: line doors require; the certificate's common name is the user."],
        ["login-penalty", None, None, "Seconds the first failed login from an address "
         "costs it; each further one doubles it; 0 turns penalties off. [default: 1]"],
        ["login-penalty-max", None, None, "The longest an address is penalised at once, in "
         "seconds. [default: 60]"],
        ["login-grace", None, None, "Seconds a connection that must log in has to do so, "
         f"on every door. [default: {LOGIN_GRACE:g}]"],
        ["login-threads", None, None, "Threads that check passwords (bcrypt), apart from "
         "those of file work. [default: 2]"],
        ["scan-max-ports", None, None, "Most ports one portscan may probe. [default: 65535]"],
        ["scan-concurrency", None, None, "Connects in flight per portscan. [default: "
         f"{ScanPolicy.DEFAULT_CONCURRENCY}]"],
        ["scan-timeout", None, None, "Seconds a portscan waits for one connect. [default: 1]"],
        ["scan-max-in-flight", None, None, "Connects in flight over all portscans at once. "
         "[default: 4096, or half the open-files limit if lower]"],
        ["ssh", None, None, "Endpoint for the SSH door (shell, exec, SFTP), or 'none'. "
         "[default: tcp:2222:interface=127.0.0.1]"],
        ["sftp-max-handles", None, None, "Files and directories one SFTP session may "
         "have open at once. [default: 64]"],
        ["pb", None, None, "Endpoint for the Perspective Broker door, or 'none'. "
         f"[default: {PB_ENDPOINT}]"],
        ["max-upload", None, None, "Largest upload accepted (upload and SFTP). "
         "[default: 1G]"],
        ["upload-macs", None, None, "MAC algorithms an upload may name, comma-separated: "
         "hmac-sha256, blake2b; others are refused. [default: hmac-sha256,blake2b]"],
        ["command-timeout", None, None, "Seconds a command may run before it is stopped "
         "(0: no deadline); [command-limits.NAME] in the TOML file sets one command's. "
         f"[default: {DEFAULT_TIMEOUT:g}]"],
        ["max-output", None, None, "Bytes of output one command may write before it is "
         "stopped (0: no cap). [default: 16M]"],
        ["max-calls-per-ip", None, None, "Commands running at once from one client "
         "address, over every door; more are refused (0: no limit). [default: "
         f"{DEFAULT_MAX_CALLS_PER_ADDRESS}]"],
        ["max-calls-per-connection", None, None, "Commands running at once on one "
         f"connection; more are refused. [default: {DEFAULT_MAX_CALLS_PER_SESSION}]"],
        ["worker-threads", None, None, "Threads for file work (ls, comphash, uploads, "
         f"SFTP). [default: {DEFAULT_THREADS}]"],
        ["worker-threads-per-ip", None, None, "Of those, the most one client address "
         "may hold; its further work waits its turn. [default: "
         f"{DEFAULT_PER_ADDRESS}]"],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in REPEATABLE:
            self[name] = []
        self["pb-anonymous"] = None  # so a TOML value applies unless the flag is given
        self["metrics-public"] = None
        self["overwrite"] = None  # a flag the TOML file may set too

    def opt_overwrite(self) -> None:
        """Let an upload replace an existing file (atomically). [default: refuse]"""
        self["overwrite"] = True

    def opt_line(self, endpoint: str) -> None:
        self["line"].append(endpoint)

    def opt_http(self, endpoint: str) -> None:
        """Endpoint for the HTTP door (JSON API, XML-RPC, /metrics), or 'none';
        repeatable. [default: tcp:9898:interface=127.0.0.1]"""
        self["http"].append(endpoint)

    def opt_http_host(self, name: str) -> None:
        """A name clients use for the HTTP door (its Host header); repeatable. localhost
        and the endpoint's address are always allowed."""
        self["http-host"].append(name)

    def opt_metrics_public(self) -> None:
        """Serve the HTTP door's /metrics without a login. [default: login required]"""
        self["metrics-public"] = True

    def opt_root(self, path: str) -> None:
        self["root"].append(path)

    def opt_scan_allow(self, cidr: str) -> None:
        self["scan-allow"].append(cidr)

    def opt_penalty_exempt(self, cidr: str) -> None:
        self["penalty-exempt"].append(cidr)

    opt_penalty_exempt.__doc__ = (
        "Network (CIDR), address or 'local' (UNIX sockets) never penalised for failed "
        "logins nor held to the per-address bound on checks; repeatable. [default: none]")

    opt_scan_allow.__doc__ = (
        "Network (CIDR) portscan may target; repeatable; replaces the default. "
        "[default: 127.0.0.0/8 and ::1/128]")
    def opt_pb_anonymous(self) -> None:
        """Also serve the classic anonymous PB root (ls, ls_boom), inside the roots."""
        self["pb-anonymous"] = True

    opt_line.__doc__ = (
        "Endpoint for the line door: tcp:PORT:interface=ADDR, ssl:..., unix:PATH, or "
        "'none'; repeatable. [default: tcp:9999:interface=127.0.0.1]")
    opt_root.__doc__ = (
        "Directory that file commands may touch; repeatable. Relative paths start at "
        "the first. [default: DATA-DIR/files]")

    def postOptions(self) -> None:
        config = load_config(self["config"]) if self["config"] else {}
        self["command-limits"] = config.pop("command-limits", {})
        try:
            self[COMMANDS] = declared_commands(config.pop(COMMANDS, {}))
        except ConfigError as e:
            raise usage.UsageError(f"{self['config']}: {e}") from None
        for name, (default, coerce) in SETTINGS.items():
            value, where = self[name], f"--{name}"
            if value is None or value == []:
                value, where = config.get(name, default), f"{self['config']}: {name}"
            if coerce is not None and value is not None:
                try:
                    value = coerce(value)
                except (TypeError, ValueError) as e:
                    raise usage.UsageError(f"{where}: {e}") from None
            self[name] = list(value) if name in REPEATABLE else value
        self["data-dir"] = os.path.abspath(self["data-dir"])
        for root in self["root"]:
            if not os.path.isdir(root):
                raise usage.UsageError(f"--root {root}: not an existing directory")
        self["line"] = [e for e in self["line"] if e.lower() != NONE]
        if self["ssh"].lower() == NONE:
            self["ssh"] = None
        if self["pb"].lower() == NONE:
            self["pb"] = None
        self["http"] = [e for e in self["http"] if e.lower() != NONE]
        if not (self["line"] or self["ssh"] or self["pb"] or self["http"]):
            raise usage.UsageError("no front door is open: give a --line, --ssh, --pb or "
                                   "--http endpoint")
        for endpoint in self["line"]:
            check_endpoint("--line", endpoint)
        for endpoint in self["http"]:
            check_endpoint("--http", endpoint)
        for name in self["http-host"]:
            try:
                check_host(name)
            except CredentialError as e:
                raise usage.UsageError(f"--http-host: {e}") from None
        if self["tls-client-ca"]:
            if not any(is_tls(e) for e in self["line"]):
                raise usage.UsageError("--tls-client-ca needs an ssl: --line endpoint")
            try:
                load_ca(self["tls-client-ca"])
            except CredentialError as e:
                raise usage.UsageError(str(e)) from None
        try:
            self["scan-policy"] = ScanPolicy(
                self["scan-allow"], self["scan-max-ports"], self["scan-concurrency"],
                self["scan-timeout"], self["scan-max-in-flight"] or default_max_in_flight())
        except ValueError as e:
            raise usage.UsageError(f"--scan-allow: {e}") from None
        try:
            parse_exempt(self["penalty-exempt"])
        except ValueError as e:
            raise usage.UsageError(f"--penalty-exempt: {e}") from None
        if self["login-penalty-max"] < self["login-penalty"]:
            raise usage.UsageError("--login-penalty-max is less than --login-penalty")
        if self["ssh"]:
            check_endpoint("--ssh", self["ssh"])
        if self["pb"]:
            check_endpoint("--pb", self["pb"])


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
    limits = config.pop("command-limits", {})
    config["command-limits"] = check_command_limits(path, limits)
    unknown = sorted(set(config) - set(SETTINGS) - {"command-limits", COMMANDS})
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


def check_command_limits(path: str, table: Any) -> dict[str, dict[str, Any]]:
    """``[command-limits.NAME]``: ``timeout`` (seconds) and ``max-output`` (bytes) of
    one command; the names are checked against the registry in makeService."""
    if not isinstance(table, dict):
        raise usage.UsageError(f"{path}: command-limits: expected a table of commands")
    checked: dict[str, dict[str, Any]] = {}
    for name, limits in table.items():
        where = f"{path}: command-limits.{name}"
        if not isinstance(limits, dict):
            raise usage.UsageError(f"{where}: expected a table")
        unknown = sorted(set(limits) - {"timeout", "max-output"})
        if unknown:
            raise usage.UsageError(f"{where}: unknown setting(s): {', '.join(unknown)}")
        try:
            checked[name] = {
                key: non_negative_number(value) if key == "timeout" else byte_size(value)
                for key, value in limits.items()}
        except (TypeError, ValueError) as e:
            raise usage.UsageError(f"{where}: {e}") from None
    return checked


def apply_command_limits(registry: Any, limits: dict[str, dict[str, Any]]) -> None:
    """Give the named commands their own deadline and output cap."""
    for name, values in limits.items():
        command = registry.get(name)
        if command is None:
            raise usage.UsageError(f"command-limits.{name}: no such command")
        if "timeout" in values:
            command.timeout = values["timeout"]
        if "max-output" in values:
            command.max_output = values["max-output"]


def door_endpoints(options: Options, door: str) -> list[str]:
    """The endpoints a door listens on (none: the door is off)."""
    value = options[door]
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def prepare_data_dir(path: str) -> None:
    """Create the state directory (0700) or tighten an existing one we own."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    if st.st_uid == os.getuid() and st.st_mode & 0o077:
        os.chmod(path, 0o700)


def open_data_dir(path: str) -> None:
    """The daemon's data directory, made ready; one line and exit if it cannot be
    made, or if another daemon runs on it (the lock is taken for good when the
    service starts: twistd may fork after makeService)."""
    try:
        prepare_data_dir(path)
    except OSError as e:
        raise SystemExit(f"cmdserver: --data-dir {path}: {reason(e)}") from None
    try:
        DataDirLock(path).check()
    except StartupError as e:
        raise SystemExit(f"cmdserver: {e}") from None


def check_audit_log(path: str) -> None:
    """Stop with one line now if the audit log cannot be opened for appending."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))
    except OSError as e:
        raise SystemExit(f"cmdserver: --audit-log {path}: {reason(e)}") from None


def makeService(options: Options, reactor: Any = None) -> CmdServerService:
    """Build the whole daemon from parsed options."""
    if reactor is None:
        from twisted.internet import reactor
    data_dir = options["data-dir"]
    open_data_dir(data_dir)
    roots = options["root"]
    if not roots:
        roots = [os.path.join(data_dir, "files")]
        os.makedirs(roots[0], mode=0o700, exist_ok=True)
    audit_log = options["audit-log"]
    if audit_log is None:
        audit_log = os.path.join(data_dir, "audit.log")
    elif audit_log.lower() == NONE:
        audit_log = None
    if audit_log is not None:
        check_audit_log(audit_log)
    source = choose_source(options["log-source"], audit_log)
    log.info("lastlog reads {source}", source=source.describe())

    registry = default_registry(source)
    uploads = Uploads(UploadSettings(options["max-upload"], options["overwrite"],
                                     options["upload-macs"]), server_key(data_dir))
    registry.add(UploadCommand(uploads))
    gate = GateSettings(options["login-penalty"], options["login-penalty-max"],
                        tuple(options["penalty-exempt"]), options["login-grace"],
                        CHECKS_PER_SOURCE)
    core = CommandCore(registry, Policy(roots, options["scan-policy"]), reactor,
                       timeout=options["command-timeout"], max_output=options["max-output"],
                       max_calls_per_address=options["max-calls-per-ip"],
                       max_calls_per_session=options["max-calls-per-connection"],
                       worker_threads=options["worker-threads"],
                       worker_threads_per_address=options["worker-threads-per-ip"],
                       gate=gate)
    hashing = HashPool(options["login-threads"], reactor)
    credentials, portal = open_credentials(data_dir, options["bcrypt-cost"], core, hashing)
    credentials.on_revoked = core.end_token_sessions  # a revoked token's sessions end
    uploads.user_keys = credentials.hmac_key  # a user's own key beats the server's
    service = CmdServerService(core, Limits(options["max-clients"], options["max-per-ip"]),
                               audit_log, portal, DataDirLock(data_dir))
    hashing.setServiceParent(service)
    reloader = ReloadService(credentials, options["users-poll-interval"], clock=reactor)
    reloader.setServiceParent(service)
    service.hangup.add(reloader.on_sighup)
    core.registry.add(Login(PasswordLogin(portal)))
    declared = options.get(COMMANDS) or []
    for command in declared:
        core.registry.add(command)
    if declared:
        DeclaredCommandsService(declared, reactor).setServiceParent(service)
    apply_command_limits(core.registry, options.get("command-limits", {}))
    env = DoorEnv(service, options, credentials, uploads, reactor)
    for door in BUILDERS:
        for endpoint in door_endpoints(options, door):
            built = builder(door)(env, endpoint)
            service.add_door(door, endpoint, built.factory, built.refusal, built.endpoint)
    # The start-up sweep of stale temporary files covers the users' own roots too.
    user_roots = [r for user in credentials.users.values() for r in user.roots or ()]
    sweep = list(dict.fromkeys([*core.policy.roots, *user_roots]))
    UploadService(uploads, sweep, reactor).setServiceParent(service)
    return service
